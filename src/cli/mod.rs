//! The command line: `agent`, `status`, `explain`, `sleep`, `wake`, `ui`,
//! `simulate`, `restore`, `migrate`, `policy lint` and `crd`. `status`, `explain`,
//! `sleep`, `wake`, `simulate` and `ui` ask the agent's API as the
//! kubeconfig's user ([`remote`]); with `--direct` all but `ui` read (and
//! annotate) the cluster themselves ([`targets`], the break-glass path).
//! `restore` and `migrate` read the cluster with the kubeconfig's
//! credentials. Every flag
//! has a `DORMANT_*` environment fallback.

pub mod kubeconfig;
pub mod lint;
pub mod migrate;
pub mod remote;
pub mod restore;
pub mod simulate;
pub mod targets;

use clap::{Parser, Subcommand, ValueEnum};

use crate::agent::AgentArgs;
use crate::target::TargetRef;

#[derive(Debug, Parser)]
#[command(
    name = "dormant",
    version,
    about = "Sleep mode for Kubernetes: idle vclusters and namespaces scale to zero and wake on the first request"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (controller, activity receivers, admin port).
    Agent(Box<AgentArgs>),
    /// Every target you may see, with its state, idle time, next transition and policy.
    Status {
        #[arg(short, long, value_enum, default_value = "table", env = "DORMANT_OUTPUT")]
        output: Output,
        #[command(flatten)]
        conn: remote::Connection,
    },
    /// Why a target is in its state: its effective policy and where each
    /// value came from (a SleepPolicy, an annotation, the agent's settings),
    /// its last activity, its next transition.
    Explain {
        /// namespace/<name>, vcluster/<namespace>/<name>, <namespace>/<vcluster> or <namespace>
        target: TargetRef,
        #[command(flatten)]
        conn: remote::Connection,
    },
    /// Put a target to sleep now, whatever its activity.
    Sleep {
        target: TargetRef,
        #[command(flatten)]
        conn: remote::Connection,
        /// Requests do not wake it for this long (`2h`), or `never` (until `dormant wake`).
        #[arg(long, env = "DORMANT_PREVENT_WAKEUP")]
        prevent_wakeup: Option<String>,
        /// Wait until it is asleep, at most this long (`2m`).
        #[arg(long, num_args = 0..=1, default_missing_value = "5m")]
        wait: Option<String>,
    },
    /// Wake a target now.
    Wake {
        target: TargetRef,
        /// Wait until it is awake and ready, at most this long (`2m`).
        #[arg(long, num_args = 0..=1, default_missing_value = "5m")]
        wait: Option<String>,
        #[command(flatten)]
        conn: remote::Connection,
    },
    /// Open the agent's web page, signed in as your kubeconfig's user
    /// through a one-time link.
    Ui {
        /// Print the link only.
        #[arg(long)]
        no_open: bool,
        #[command(flatten)]
        conn: remote::Connection,
    },
    /// Bring sleeping targets back from their records alone, with no agent
    /// running (before an uninstall; the chart's pre-delete hook runs it).
    /// Running it again changes nothing.
    Restore {
        /// Every target.
        #[arg(long, conflicts_with = "target", required_unless_present = "target")]
        all: bool,
        /// One target instead.
        target: Option<TargetRef>,
        /// First stop the agent: scale its Deployment (<namespace>/<name>)
        /// to zero and wait for its Lease to be released, so that it does
        /// not act beside the restore (the chart's pre-delete hook does).
        #[arg(long, value_name = "NAMESPACE/DEPLOYMENT")]
        stop_agent: Option<String>,
        /// The agent's Lease, in the Deployment's namespace.
        #[arg(long, default_value = "dormant-controller", requires = "stop_agent")]
        lease_name: String,
        /// Only targets in these namespaces (comma-separated): the chart's
        /// hook passes its agent's scope, so that uninstalling one release
        /// never wakes what another dormant serves.
        #[arg(long = "namespaces", value_delimiter = ',')]
        only_namespaces: Vec<String>,
        /// Only targets in namespaces whose labels match this selector.
        #[arg(long)]
        namespace_selector: Option<String>,
        /// Never targets in these namespaces (comma-separated).
        #[arg(long, value_delimiter = ',')]
        exclude_namespaces: Vec<String>,
    },
    /// Write a kubeconfig that reaches a vcluster through dormant's proxy
    /// (waking it on the first request) with the vcluster's own credentials.
    Kubeconfig {
        /// <namespace>/<name> (or vcluster/<namespace>/<name>)
        target: TargetRef,
        /// The proxy's URL, e.g. https://dormant-proxy.example.com
        #[arg(long, env = "DORMANT_PROXY_URL")]
        server: String,
        /// The CA that signed the proxy's certificate (PEM file).
        #[arg(long, env = "DORMANT_PROXY_CA")]
        proxy_ca: std::path::PathBuf,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<std::path::PathBuf>,
    },
    /// What a policy would do to targets over the coming days or the past
    /// weeks (replayed from their activity profiles): transitions, awake
    /// hours, cold starts, pre-wakes and money, for the current policy and
    /// SleepPolicy files side by side.
    Simulate(simulate::SimulateArgs),
    /// What vCluster Platform sleep settings (`sleepmode.loft.sh/*`
    /// annotations, a vcluster's `vcluster.yaml` sleepMode) become under
    /// dormant; `--write` adds the `dormant.dev/*` annotations.
    Migrate(migrate::MigrateArgs),
    /// Work with SleepPolicy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the SleepPolicy CustomResourceDefinition (YAML).
    Crd,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check SleepPolicy documents and dormant annotations on any object.
    /// Exits non-zero when anything is wrong.
    Lint {
        /// YAML files; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<String>,
    },
}

/// The SleepPolicy CRD as YAML, exactly as committed under `charts/dormant/crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let crd = crate::policy::SleepPolicy::crd();
    Ok(format!(
        "# Generated by `dormant crd` from src/policy/crd.rs; do not edit.\n{}",
        serde_yaml::to_string(&crd)?
    ))
}
