//! `dormant simulate`: what a policy would do to targets over a period,
//! through the agent's own decision core (`foresight::simulate`). The
//! policies are the target's current one (the baseline), SleepPolicy files,
//! or both to compare; the period is the coming days, with the uses the
//! target's activity profile expects, or the past weeks, replayed from the
//! days the profile recorded (`foresight::what_if`).
//!
//! It asks the agent's API, so targets are evaluated with the agent's own
//! settings and the caller sees only the targets RBAC lets them see; with
//! `--direct` it reads the cluster itself, with the built-in defaults.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use chrono::Utc;
use kube::Client;

use super::Output;
use super::remote::{Agent, Connection};
use super::targets::View;
use crate::api::{SimulateRequest, Simulation, Skipped};
use crate::foresight::simulate::render;
use crate::foresight::what_if::{Period, read_policies};
use crate::target::TargetRef;

/// `dormant simulate` flags.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Targets (namespace/<name>, vcluster/<namespace>/<name>, <namespace>/<vcluster> or
    /// <namespace>); none: every target you may see.
    pub targets: Vec<TargetRef>,
    /// A YAML file of SleepPolicy documents: each is simulated as if it
    /// governed the target (its own annotations still apply). Repeatable.
    #[arg(short = 'f', long = "policy")]
    pub policies: Vec<PathBuf>,
    /// Leave the target's current policy out (it is the baseline otherwise).
    #[arg(long, requires = "policies")]
    pub no_current: bool,
    /// The coming days (default 7, at most 366).
    #[arg(long, conflicts_with = "past_weeks")]
    pub days: Option<u32>,
    /// The past weeks instead (at most 52), replayed from the activity profile.
    #[arg(long)]
    pub past_weeks: Option<u32>,
    /// List every transition (local time and UTC) under each table.
    #[arg(long)]
    pub transitions: bool,
    #[arg(short, long, value_enum, default_value = "table", env = "DORMANT_OUTPUT")]
    pub output: Output,
    #[command(flatten)]
    pub conn: Connection,
}

impl SimulateArgs {
    /// The request for the agent (the files read and joined).
    fn request(&self) -> anyhow::Result<SimulateRequest> {
        let mut policies = Vec::new();
        for path in &self.policies {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            // Each file on its own first, so a mistake names its file.
            read_policies(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            policies.push(text);
        }
        Ok(SimulateRequest {
            targets: self.targets.iter().map(ToString::to_string).collect(),
            policies: (!policies.is_empty()).then(|| policies.join("\n---\n")),
            no_current: self.no_current,
            days: self.days,
            past_weeks: self.past_weeks,
        })
    }
}

/// `dormant simulate`: the table (or JSON) per target, and what could not
/// be simulated, for standard error. Any target named and skipped is an
/// error.
pub async fn run(args: &SimulateArgs) -> anyhow::Result<(String, Vec<Skipped>)> {
    let req = args.request()?;
    let sim = if args.conn.direct {
        direct(&super::remote::host_client(&args.conn).await?, &req).await?
    } else {
        Agent::connect(&args.conn).await?.simulate(&req).await?
    };
    if !args.targets.is_empty()
        && let Some(s) = sim.skipped.first()
    {
        bail!("{}: {}", s.target, s.reason);
    }
    let text = match args.output {
        Output::Json => serde_json::to_string_pretty(&sim.items)? + "\n",
        Output::Table => render(&sim.items, args.transitions),
    };
    Ok((text, sim.skipped))
}

/// The break-glass path: reads the cluster with the caller's own
/// credentials and the built-in defaults, as the agent would with no flags.
async fn direct(client: &Client, req: &SimulateRequest) -> anyhow::Result<Simulation> {
    let files = match &req.policies {
        Some(text) => read_policies(text).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Vec::new(),
    };
    let view = View::load(client).await?;
    let targets: Vec<TargetRef> = if req.targets.is_empty() {
        view.stores.targets(&view.stores.candidates(), &view.scope)
    } else {
        req.targets.iter().map(|t| t.parse()).collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let now = Utc::now();
    let evaluated = targets.into_iter().map(|r| (r.clone(), view.evaluate(&r, now))).collect();
    let period = Period::of(req.past_weeks, req.days);
    Ok(Simulation::run(evaluated, &files, &view.defaults, !req.no_current, period, now))
}
