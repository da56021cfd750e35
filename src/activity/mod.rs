//! Activity: one observed use of a target (who, what, when, from which
//! source). Sources (the audit webhook, the proxy) turn what they see into
//! an [`Activity`] once and hand it to the [`observe::Observer`], which
//! judges whether it counts and records it; the [`ledger`] keeps the newest
//! counted activity per target, and [`flush`] writes it to the target.

pub mod flush;
pub mod ledger;
pub mod observe;
mod resource;

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

pub use resource::ResourceRef;

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
    /// The API server's answer to the request, when known (an audit event
    /// carries it; the proxy learns it only after forwarding).
    pub code: Option<u16>,
    /// Made to a vcluster's own API server (through the proxy, or reported
    /// by the vcluster's audit webhook), not to the host's.
    pub in_vcluster: bool,
}

impl crate::policy::ignore::Request for Activity {
    fn user(&self) -> &str {
        &self.user
    }
    fn groups(&self) -> &[String] {
        &self.groups
    }
    fn user_agent(&self) -> &str {
        &self.user_agent
    }
    fn verb(&self) -> &str {
        &self.verb
    }
    fn resource(&self) -> Option<(&str, &str, &str, &str)> {
        self.resource
            .as_ref()
            .map(|r| (r.group.as_str(), r.resource.as_str(), r.subresource.as_str(), r.name.as_str()))
    }
    fn path(&self) -> &str {
        &self.path
    }
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
