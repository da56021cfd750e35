//! Activity: one observed use of a target (who, what, when, from which
//! source), and the ledger that keeps the newest counted activity per target.

pub mod ledger;
pub mod observe;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where an activity was observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A Kubernetes audit webhook (host or vcluster API server).
    Audit,
    /// dormant's own proxy.
    Proxy,
    /// `dormant wake` and other explicit requests.
    Cli,
    /// Someone scaled a sleeping target's workload by hand.
    Scale,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Audit => "audit",
            Source::Proxy => "proxy",
            Source::Cli => "cli",
            Source::Scale => "scale",
        }
    }
}

/// The API resource a request touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceRef {
    /// API group; empty for the core group.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

/// One observed use of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub at: DateTime<Utc>,
    pub source: Source,
    pub user: String,
    pub groups: Vec<String>,
    pub user_agent: String,
    pub verb: String,
    /// Set for resource requests.
    pub resource: Option<ResourceRef>,
    /// The request path (what non-resource rules match).
    pub path: String,
}

impl AsRef<Activity> for Activity {
    fn as_ref(&self) -> &Activity {
        self
    }
}

impl Activity {
    /// `user (agent)`: who used the target, as metrics and `activity-sources` name it.
    pub fn who(&self) -> String {
        format!("{} ({})", self.user, observe::short_agent(&self.user_agent))
    }

    /// `user verb resource (source)`, as written to `dormant.dev/last-activity-by`.
    pub fn summary(&self) -> String {
        let what = match &self.resource {
            Some(r) if r.group.is_empty() => r.resource.clone(),
            Some(r) => format!("{}.{}", r.resource, r.group),
            None => self.path.clone(),
        };
        format!("{} {} {} ({})", self.user, self.verb, what, self.source.as_str())
    }
}
