//! Metrics and dashboards: every dashboard query is real PromQL (parsed by
//! promtool) over metrics the agent really exports with the labels the
//! query uses, and the savings counter equals the hand-computed value.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use support::*;
use testbed::process::free_port;
use testbed::{Bins, Cluster};

fn dashboards() -> Vec<(String, serde_json::Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/dormant/dashboards");
    let mut out: Vec<(String, serde_json::Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every `expr` of every panel, with Grafana's variables replaced by
/// values Prometheus accepts.
fn queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let e = t["expr"].as_str().unwrap();
                let e = e
                    .replace("$__rate_interval", "5m")
                    .replace("$__range", "1h")
                    .replace("$__interval", "1m")
                    .replace("$namespace", ".*");
                out.push((format!("{file}: {}", p["title"].as_str().unwrap()), e));
            }
        }
    }
    out
}

#[test]
fn every_dashboard_is_templated_on_data_source_and_every_query_parses() {
    let promtool = Bins::promtool().unwrap();
    for (file, d) in dashboards() {
        let vars: Vec<&str> =
            d["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
        assert!(vars.contains(&"datasource"), "{file} is not templated on the data source");
        for p in d["panels"].as_array().unwrap() {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file}: {}", p["title"]);
        }
        if file != "health.json" {
            assert!(vars.contains(&"namespace"), "{file} is not templated on the namespace");
        }
    }
    let qs = queries();
    assert!(qs.len() >= 20, "{}", qs.len());
    for (panel, q) in qs {
        let out = std::process::Command::new(&promtool)
            .args(["--experimental", "promql", "format", &q])
            .output()
            .unwrap();
        assert!(out.status.success(), "{panel}: {q}\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Sample name → label names seen on it.
fn scrape(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let labels = out.entry(name.to_string()).or_default();
        if let Some(body) = rest.strip_prefix('{').and_then(|r| r.split_once('}')).map(|(b, _)| b) {
            for kv in body.split("\",") {
                if let Some((k, _)) = kv.split_once('=') {
                    labels.insert(k.trim().to_string());
                }
            }
        }
    }
    out
}

/// Metric names and label names a query uses.
fn referenced(q: &str) -> (Vec<String>, BTreeSet<String>) {
    let mut metrics = Vec::new();
    let bytes: Vec<char> = q.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if q[q.char_indices().nth(i).map(|(b, _)| b).unwrap_or(q.len())..].starts_with("dormant_") {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_') {
                i += 1;
            }
            metrics.push(bytes[start..i].iter().collect());
        } else {
            i += 1;
        }
    }
    let mut labels = BTreeSet::new();
    for part in q.split("by (").skip(1) {
        for l in part.split(')').next().unwrap_or_default().split(',') {
            labels.insert(l.trim().to_string());
        }
    }
    for part in q.split('{').skip(1) {
        for m in part.split('}').next().unwrap_or_default().split(',') {
            if let Some(k) = m.split(['=', '!']).next() {
                labels.insert(k.trim().to_string());
            }
        }
    }
    labels.remove("le");
    labels.retain(|l| !l.is_empty());
    (metrics, labels)
}

#[test]
fn after_a_sleep_and_wake_every_dashboard_metric_exists_with_its_labels_and_savings_add_up() {
    let c = Cluster::shared();
    let id = test_id("metrics");
    install_crd(c);
    let ns = c.namespace("metrics", &[("dormant-test", &id)]).unwrap();
    let broken = c.namespace("broken", &[("dormant-test", &id)]).unwrap();
    kubectl(c, &["annotate", "namespace", &broken, "dormant.dev/sleep-after=soon"]);
    // Known resources at a known price: 2 × (0.5 core + 1 GiB) at
    // 0.1 EUR per core-hour and 0.01 EUR per GiB-hour = 0.12 EUR per hour.
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: api, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: api}}}}
  template:
    metadata: {{labels: {{app: api}}}}
    spec: {{containers: [{{name: api, image: nginx:1.27, resources: {{requests: {{cpu: 500m, memory: 1Gi}}}}}}]}}
---
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {{name: {id}}}
spec:
  selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}
  sleepAfter: 1h
  pricing: {{cpuCoreHour: 0.1, memoryGiBHour: 0.01, currency: EUR}}
"#
        ),
    )
    .unwrap();
    let per_hour = 2.0 * (0.5 * 0.1 + 1.0 * 0.01);
    wait_until("2 api pods", Duration::from_secs(60), || ready_pods(c, &ns, "app=api") == 2);

    let token_file = c.dir.join(format!("{id}-tokens"));
    std::fs::write(&token_file, "metrics-token\n").unwrap();
    let (audit_port, proxy_port) = (free_port().unwrap(), free_port().unwrap());
    let cert = c.dir.join("apiserver.crt");
    let key = c.dir.join("apiserver.key");
    let flags = [
        format!("--audit-addr=127.0.0.1:{audit_port}"),
        format!("--audit-cert={}", cert.display()),
        format!("--audit-key={}", key.display()),
        format!("--audit-token-file={}", token_file.display()),
        format!("--proxy-addr=127.0.0.1:{proxy_port}"),
        format!("--proxy-cert={}", cert.display()),
        format!("--proxy-key={}", key.display()),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(c, &id, &format!("{id}-system"), &format!("{id}-agent"), &flags);

    // A sleep and a wake of known length.
    let target = format!("namespace/{ns}");
    let out = dormant(c, &["sleep", &target, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let since = chrono::DateTime::parse_from_rfc3339(&annotation(
        c,
        "namespace",
        &ns,
        None,
        "dormant.dev/asleep-since",
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let wake_sent = chrono::Utc::now();
    let out = dormant(c, &["wake", &target, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let awake_seen = chrono::Utc::now();

    // Activity through the webhook (one counted, one ignored), and a proxy
    // request for a vcluster that does not exist.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let batch = format!(
        r#"{{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{},{}]}}"#,
        audit_event(&ns, "mallory"),
        audit_event(&ns, "system:kube-scheduler")
    );
    assert_eq!(rt.block_on(post_audit_host(audit_port, "metrics-token", batch)), 200);
    let nowhere = std::process::Command::new(c.bins.path("kubectl"))
        .args([
            "--server",
            &format!("https://127.0.0.1:{proxy_port}/vcluster/nowhere/none"),
            "--certificate-authority",
        ])
        .arg(&c.ca_file)
        .args(["--token", "x", "get", "--raw", "/version"])
        .output()
        .unwrap();
    // Answered by the proxy (so counted), and refused.
    let said = String::from_utf8_lossy(&nowhere.stderr);
    assert!(!nowhere.status.success() && said.contains("Unauthorized"), "{said}");
    // The gauges by state are refreshed every 5 s.
    std::thread::sleep(Duration::from_secs(6));

    let text = agent.get("/metrics");
    let samples = scrape(&text);
    for (panel, q) in queries() {
        let (metrics, labels) = referenced(&q);
        assert!(!metrics.is_empty(), "{panel}: no dormant metric in {q}");
        for m in &metrics {
            let seen =
                samples.get(m).unwrap_or_else(|| panic!("{panel}: {m} is not exported (query {q})\n{text}"));
            for l in &labels {
                assert!(seen.contains(l), "{panel}: {m} has no label {l:?} (has {seen:?}); query {q}");
            }
        }
    }

    // The savings counter: 0.12 EUR/h for exactly as long as it slept.
    let line = text
        .lines()
        .find(|l| l.starts_with("dormant_savings_total{") && l.contains(&format!("target=\"{target}\"")))
        .unwrap_or_else(|| panic!("no savings series for {target}:\n{text}"));
    assert!(line.contains("currency=\"EUR\"") && line.contains(&format!("policy=\"{id}\"")), "{line}");
    let saved: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let hours = |to: chrono::DateTime<chrono::Utc>| {
        (to - since.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 3_600_000.0
    };
    let (low, high) = (per_hour * hours(wake_sent), per_hour * hours(awake_seen));
    eprintln!("saved {saved:.9} EUR; hand-computed between {low:.9} and {high:.9}");
    assert!(
        saved >= low * 0.999 && saved <= high * 1.001,
        "saved {saved}, expected between {low} and {high}"
    );
}
