//! `dormant status`, `explain`, `sleep`, `wake` and `ui` through the
//! agent's API, as the current kubeconfig context's user: kube's own
//! client is built from the kubeconfig (tokens, client certificates, exec
//! plugins) and pointed at the API's URL with the proxy's CA, so the agent
//! sees exactly who is asking and the cluster's RBAC decides. The agent is
//! found from the ConfigMap the chart publishes (`kube-public/dormant-api`:
//! `url`, `ca.crt`), or from `--server` and `--proxy-ca`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::Utc;
use clap::Args;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use crate::api::model::{Explanation, TargetSummary, short};
use crate::api::{Accepted, Link, TargetList};
use crate::target::TargetRef;

/// Where the API is, and as whom to call it.
#[derive(Debug, Clone, Default, Args)]
pub struct Connection {
    /// The kubeconfig file to use (as kubectl's `--kubeconfig`; default
    /// `$KUBECONFIG`, then `~/.kube/config`).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (as kubectl's `--context`).
    #[arg(long)]
    pub context: Option<String>,
    /// The agent's API URL (its proxy's), e.g. https://dormant-proxy.example.com;
    /// default: what the chart publishes in `--agent-configmap`.
    #[arg(long, env = "DORMANT_PROXY_URL")]
    pub server: Option<String>,
    /// The CA that signed the agent's certificate (PEM file); default: the
    /// published one.
    #[arg(long, env = "DORMANT_PROXY_CA")]
    pub proxy_ca: Option<std::path::PathBuf>,
    /// The ConfigMap (`namespace/name`) the chart publishes the API's URL
    /// and CA in; any authenticated user may read it.
    #[arg(long, env = "DORMANT_AGENT_CONFIGMAP", default_value = "kube-public/dormant-api")]
    pub agent_configmap: String,
    /// Break glass: read and annotate the cluster directly with your own
    /// credentials instead of asking the agent (works without a running
    /// agent, with the built-in defaults rather than the agent's settings;
    /// for cluster admins).
    #[arg(long, env = "DORMANT_DIRECT")]
    pub direct: bool,
}

/// A kube configuration for the host cluster from `c`'s kubeconfig and context.
pub async fn host_config(c: &Connection) -> anyhow::Result<kube::Config> {
    crate::tls::install_default_provider();
    if c.kubeconfig.is_none() && c.context.is_none() {
        return kube::Config::infer().await.context("no Kubernetes configuration found");
    }
    let kc = match &c.kubeconfig {
        Some(p) => Kubeconfig::read_from(p).with_context(|| format!("--kubeconfig {}", p.display()))?,
        None => Kubeconfig::read().context("cannot read the kubeconfig")?,
    };
    let opts = KubeConfigOptions { context: c.context.clone(), cluster: None, user: None };
    kube::Config::from_custom_kubeconfig(kc, &opts).await.context("cannot use the kubeconfig")
}

/// A client for the host cluster, for `--direct`.
pub async fn host_client(c: &Connection) -> anyhow::Result<Client> {
    crate::client::client_from(host_config(c).await?)
}

/// The agent's API, called with the kubeconfig's credentials.
pub struct Agent {
    client: Client,
    /// The API's base URL (for the page's links).
    pub url: String,
}

/// Where the chart says the API is: (URL, CA PEM).
async fn published(config: &kube::Config, configmap: &str) -> anyhow::Result<(String, String)> {
    let (ns, name) = configmap
        .split_once('/')
        .with_context(|| format!("--agent-configmap {configmap:?}: expected namespace/name"))?;
    let client = crate::client::client_from(config.clone())?;
    let cm = Api::<ConfigMap>::namespaced(client, ns).get(name).await.with_context(|| {
        format!(
            "cannot find the agent: failed to read ConfigMap {ns}/{name}, which the chart publishes; pass --server and --proxy-ca, or --direct to work without the agent"
        )
    })?;
    let data = cm.data.unwrap_or_default();
    let url = data.get("url").cloned().filter(|u| !u.is_empty());
    let ca = data.get("ca.crt").cloned().filter(|c| !c.is_empty());
    match (url, ca) {
        (Some(u), Some(c)) => Ok((u, c)),
        _ => bail!("ConfigMap {ns}/{name} has no url and ca.crt; pass --server and --proxy-ca"),
    }
}

impl Agent {
    pub async fn connect(c: &Connection) -> anyhow::Result<Agent> {
        let config = host_config(c).await?;
        let ca_file = match &c.proxy_ca {
            Some(p) => {
                Some(std::fs::read_to_string(p).with_context(|| format!("--proxy-ca {}", p.display()))?)
            }
            None => None,
        };
        let (url, ca) = match (&c.server, ca_file) {
            (Some(s), Some(ca)) => (s.clone(), ca),
            (server, ca) => {
                let (u, published_ca) = published(&config, &c.agent_configmap).await?;
                (server.clone().unwrap_or(u), ca.unwrap_or(published_ca))
            }
        };
        if !url.starts_with("https://") {
            bail!("the agent's URL {url:?} is not https://");
        }
        let cas = crate::tls::certs_from_pem(ca.as_bytes(), "proxy CA").context("the agent's CA")?;
        let mut api = config;
        api.cluster_url =
            url.trim_end_matches('/').parse().with_context(|| format!("the agent's URL {url:?}"))?;
        api.root_cert = Some(cas.iter().map(|c| c.as_ref().to_vec()).collect());
        api.root_cert_file = None;
        api.tls_server_name = None;
        api.accept_invalid_certs = false;
        Ok(Agent { client: crate::client::client_from(api)?, url: url.trim_end_matches('/').to_string() })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let req =
            http::Request::get(path).header(http::header::ACCEPT, "application/json").body(Vec::new())?;
        self.client.request(req).await.map_err(explain_error)
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<T> {
        let req = http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(serde_json::to_vec(&body)?)?;
        self.client.request(req).await.map_err(explain_error)
    }

    pub async fn targets(&self) -> anyhow::Result<Vec<TargetSummary>> {
        Ok(self.get::<TargetList>("/dormant/v1/targets").await?.items)
    }

    pub async fn explanation(&self, r: &TargetRef) -> anyhow::Result<Explanation> {
        self.get(&format!("/dormant/v1/targets/{r}")).await
    }

    pub async fn act(
        &self,
        r: &TargetRef,
        action: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<Accepted> {
        self.post(&format!("/dormant/v1/targets/{r}/{action}"), body).await
    }

    /// What-if runs, computed by the agent.
    pub async fn simulate(
        &self,
        req: &crate::api::SimulateRequest,
    ) -> anyhow::Result<crate::api::Simulation> {
        self.post("/dormant/v1/simulate", serde_json::to_value(req)?).await
    }

    /// A one-time sign-in link for the page.
    pub async fn link(&self) -> anyhow::Result<String> {
        let l: Link = self.post("/dormant/v1/links", serde_json::json!({})).await?;
        Ok(format!("{}{}", self.url, l.path))
    }
}

/// The API's refusals as people read them: code, reason, and the message
/// that says what is missing.
fn explain_error(e: kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow::anyhow!("the agent answered {} {}: {}", s.code, s.reason, s.message),
        other => anyhow::Error::new(other).context("cannot reach the agent's API"),
    }
}

/// `dormant status` rows from the API's summaries.
pub fn rows(items: &[TargetSummary]) -> Vec<super::targets::Row> {
    let now = Utc::now();
    items
        .iter()
        .map(|t| super::targets::Row {
            target: t.target.clone(),
            kind: t.kind.clone(),
            state: t.state.clone(),
            desired: t.desired.clone().unwrap_or_else(|| "-".into()),
            idle_for: t.idle_since.map_or("-".into(), |s| short(now - s)),
            next: t.next_text.clone(),
            policy: t.policy.clone().unwrap_or_else(|| "-".into()),
            reason: t.reason.clone(),
        })
        .collect()
}

pub async fn status(c: &Connection, json_output: bool) -> anyhow::Result<String> {
    let items = Agent::connect(c).await?.targets().await?;
    if json_output {
        Ok(serde_json::to_string_pretty(&rows(&items))? + "\n")
    } else {
        Ok(super::targets::table(&rows(&items)))
    }
}

/// explain's text, from the API's explanation.
pub fn explain_text(x: &Explanation) -> String {
    let now = Utc::now();
    let t = &x.summary;
    let mut out = String::new();
    let _ = writeln!(out, "Target:   {} ({})", t.target, x.object);
    if !x.is_target {
        let _ = writeln!(
            out,
            "Not a target: no SleepPolicy selects this namespace and it carries no dormant.dev/ annotation."
        );
        return out;
    }
    if t.state == "invalid" {
        let _ = writeln!(out, "State:    invalid");
        let _ = writeln!(out, "Problem:  {}", t.reason);
        let _ = writeln!(out, "Dormant leaves this target exactly as it is until this is fixed.");
        return out;
    }
    match x.asleep_since {
        Some(s) => {
            let _ = writeln!(out, "State:    {} since {} ({} ago)", t.state, s.to_rfc3339(), short(now - s));
        }
        None => {
            let _ = writeln!(out, "State:    {}", t.state);
        }
    }
    let _ = writeln!(out, "Desired:  {}: {}", t.desired.as_deref().unwrap_or("-"), t.reason);
    if let Some(n) = &x.note {
        let _ = writeln!(out, "Note:     {n}");
    }
    let next = match &t.next {
        Some(n) => format!(
            "{} at {} (in {})",
            if n.action == "sleep" { "asleep" } else { "awake" },
            n.at.to_rfc3339(),
            short(n.at - now)
        ),
        None => t.next_text.clone(),
    };
    let _ = writeln!(out, "Next:     {next}");
    match (&t.last_used_by, x.last_used_at) {
        (Some(by), Some(at)) => {
            let _ = writeln!(out, "Last use: {} by {by} ({} ago)", at.to_rfc3339(), short(now - at));
        }
        _ => {
            let seen = x.first_seen.map_or("-".to_string(), |f| f.to_rfc3339());
            let _ = writeln!(out, "Last use: none recorded since dormant first saw it at {seen}");
        }
    }
    if !x.used_by.is_empty() {
        let who: Vec<String> = x.used_by.iter().map(|(w, n)| format!("{w}: {n}")).collect();
        let _ = writeln!(out, "Used by:  {} (requests, halved every day)", who.join(", "));
    }
    for (label, text) in &x.foresight {
        let _ = writeln!(out, "{label}: {text}");
    }
    if let Some(since) = x.forced_since {
        let until = match &t.prevent_wakeup_until {
            Some(u) if u == "never" => "; requests never wake it".to_string(),
            Some(u) => format!("; requests do not wake it until {u}"),
            None => String::new(),
        };
        let _ = writeln!(out, "Forced:   asleep by hand since {}{until}", since.to_rfc3339());
    }
    let _ = writeln!(
        out,
        "Policy:   {}",
        t.policy.as_ref().map_or("none (the agent's settings)".to_string(), |n| format!("SleepPolicy {n}"))
    );
    for s in &x.settings {
        let _ = writeln!(out, "  {:<16} {:<40} (from {})", s.name, s.value, s.from);
    }
    let a = &x.agent;
    let _ = writeln!(
        out,
        "Agent:    --default-sleep-after {}, --default-timezone {}, --default-wake-timeout {}{}{}",
        a.default_sleep_after,
        a.default_timezone,
        a.default_wake_timeout,
        a.namespace_selector.as_ref().map_or(String::new(), |s| format!(", --namespace-selector {s}")),
        a.only_namespaces.as_ref().map_or(String::new(), |n| format!(", --namespaces {}", n.join(",")))
    );
    let _ = writeln!(out, "Workloads:");
    for w in &x.workloads {
        let now_value = match (w.replicas, w.suspend) {
            (Some(r), _) => format!("replicas {r} ({} ready)", w.ready),
            (None, Some(s)) => format!("suspend {s}"),
            _ => String::new(),
        };
        let record = w.before_sleep.as_ref().map(|b| format!(", {b} before sleep")).unwrap_or_default();
        let excluded = if w.excluded { " [excluded]" } else { "" };
        let _ = writeln!(out, "  {} {}: {now_value}{record}{excluded}", w.kind, w.name);
    }
    if let Some(n) = x.synced_pods {
        let _ = writeln!(out, "Synced pods: {n}");
    }
    out
}

pub async fn explain(c: &Connection, r: &TargetRef) -> anyhow::Result<String> {
    Ok(explain_text(&Agent::connect(c).await?.explanation(r).await?))
}

/// Polls the target until `done` says so, printing each state it passes.
async fn wait_for(
    agent: &Agent,
    r: &TargetRef,
    timeout: Duration,
    done: impl Fn(&TargetSummary) -> bool,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut last = None;
    loop {
        let t = agent.explanation(r).await?.summary;
        if last.as_ref() != Some(&t.state) {
            writeln!(out, "{r}: {} ({:.1}s)", t.state, started.elapsed().as_secs_f64())?;
            last = Some(t.state.clone());
        }
        if done(&t) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "{r} was not done after {}; see `dormant explain {r}`",
                crate::policy::duration::format(timeout)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `dormant sleep TARGET [--prevent-wakeup D|never] [--wait]`.
pub async fn sleep(
    c: &Connection,
    r: &TargetRef,
    prevent_wakeup: Option<&str>,
    wait: Option<Duration>,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let agent = Agent::connect(c).await?;
    let body = match prevent_wakeup {
        Some(v) => serde_json::json!({ "preventWakeupUntil": v }),
        None => serde_json::json!({}),
    };
    let a = agent.act(r, "sleep", body).await?;
    let note = match a.prevent_wakeup_until.as_deref() {
        None => String::new(),
        Some("never") => "; requests will not wake it until `dormant wake`".into(),
        Some(t) => format!("; requests will not wake it until {t}"),
    };
    writeln!(out, "{r}: sleep requested by {}{note}", a.by)?;
    if let Some(timeout) = wait {
        wait_for(&agent, r, timeout, |t| t.state == "asleep", out).await?;
    }
    Ok(())
}

/// `dormant wake TARGET [--wait]`: with `--wait`, until it is awake and
/// every workload it scales is ready.
pub async fn wake(
    c: &Connection,
    r: &TargetRef,
    wait: Option<Duration>,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let agent = Agent::connect(c).await?;
    let a = agent.act(r, "wake", serde_json::json!({})).await?;
    writeln!(out, "{r}: wake requested by {}", a.by)?;
    if let Some(timeout) = wait {
        let done = |t: &TargetSummary| t.state == "awake" && t.progress.as_ref().is_none_or(|p| p.done);
        wait_for(&agent, r, timeout, done, out).await?;
    }
    Ok(())
}

/// `dormant ui`: a one-time sign-in link for the page, made with the
/// kubeconfig's credentials; opened in a browser unless `open` is false.
pub async fn ui(c: &Connection, open: bool, out: &mut (dyn std::io::Write + Send)) -> anyhow::Result<()> {
    let link = Agent::connect(c).await?.link().await?;
    writeln!(out, "{link}")?;
    if open {
        let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
        match std::process::Command::new(opener)
            .arg(&link)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(_) => writeln!(out, "(opened in your browser; the link works once, for two minutes)")?,
            Err(_) => writeln!(out, "(open it in your browser; it works once, for two minutes)")?,
        }
    }
    Ok(())
}
