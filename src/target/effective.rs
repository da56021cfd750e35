//! The one way from a target to the policy that governs it: its own
//! annotations read, the winning SleepPolicy found among the stores' read
//! policies, and the two layered over the agent's defaults. The controller,
//! the activity observer and the proxy all ask here, so they agree on every
//! target, and on what an invalid one means:
//!
//! - the controller leaves it exactly as it is (no sleep, no wake) and
//!   says why in an Event and the SleepPolicy's status;
//! - its activity still counts, judged by the built-in rules alone (its own
//!   rules cannot be read), so nothing is lost once it is fixed;
//! - the proxy forwards to it while it is awake, and while it sleeps
//!   refuses at once with the problem (no wake would come).

use std::collections::BTreeMap;
use std::fmt;

use super::{Scope, Stores, Target, TargetObject, TargetRef};
use crate::policy::annotations::{AnnotationError, TargetAnnotations};
use crate::policy::{Defaults, EffectivePolicy, ResolveError, loft, resolve};

/// Why a target is left exactly as it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Invalid {
    /// Its own annotations cannot be read.
    Annotations(Vec<AnnotationError>),
    /// A workload's annotations cannot be read.
    Workload { id: String, errors: Vec<AnnotationError> },
    /// The policy that would govern it cannot be read or does not exist.
    Policy(ResolveError),
    /// A StatefulSet that deletes its PersistentVolumeClaims when scaled
    /// down (`persistentVolumeClaimRetentionPolicy.whenScaled: Delete`):
    /// sleeping it would destroy its data.
    DeletesClaims { id: String },
    /// Its `vcluster.yaml` sleep settings cannot be read.
    VClusterConfig(Vec<loft::ConfigError>),
}

impl Invalid {
    /// Short, stable category (metric label).
    pub fn category(&self) -> &'static str {
        match self {
            Invalid::Annotations(_) => "invalid-annotation",
            Invalid::Workload { .. } => "invalid-workload-annotation",
            Invalid::DeletesClaims { .. } => "deletes-volume-claims",
            Invalid::VClusterConfig(_) => "vcluster-config-invalid",
            Invalid::Policy(e) => e.category(),
        }
    }

    /// The policy at fault, if the problem is an invalid SleepPolicy.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Invalid::Policy(ResolveError::PolicyInvalid { name, .. }) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |e: &[AnnotationError]| e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        match self {
            Invalid::Annotations(e) => write!(f, "{}", join(e)),
            Invalid::Workload { id, errors } => write!(f, "{id}: {}", join(errors)),
            Invalid::Policy(e) => write!(f, "{e}"),
            Invalid::VClusterConfig(e) => {
                write!(f, "{}", e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            }
            Invalid::DeletesClaims { id } => write!(
                f,
                "{id} deletes its PersistentVolumeClaims when scaled down \
                 (spec.persistentVolumeClaimRetentionPolicy.whenScaled: Delete), so sleeping would destroy \
                 its data: set whenScaled to Retain, or exclude it (annotation dormant.dev/exclude: \"true\")"
            ),
        }
    }
}

/// A target with its annotations read and its effective policy.
#[derive(Debug, Clone)]
pub struct Governed {
    pub target: Target,
    pub annotations: TargetAnnotations,
    pub policy: EffectivePolicy,
    /// Annotations the leader writes to take vCluster Platform's forced
    /// sleep over as dormant's own (`loft::Layered::takeover`).
    pub takeover: BTreeMap<&'static str, Option<String>>,
}

/// The effective policy of `r`. `Ok(None)` when it is not a target: gone,
/// outside `scope`, being deleted, or a namespace that no policy or
/// dormant annotation makes one.
pub fn effective(
    stores: &Stores,
    defaults: &Defaults,
    scope: &Scope,
    r: &TargetRef,
) -> Result<Option<Governed>, Invalid> {
    let Some(target) = stores.target(r) else { return Ok(None) };
    if !scope.allows(&r.namespace, &target.namespace_labels) || target.object.is_deleting() {
        return Ok(None);
    }
    let candidates = stores.candidates();
    if let TargetObject::Namespace(ns) = &target.object
        && !stores.is_namespace_target(ns, &candidates, scope)
    {
        return Ok(None);
    }
    let annotations = TargetAnnotations::parse(target.object.annotations()).map_err(Invalid::Annotations)?;
    let policy = resolve(r.kind, &target.namespace_labels, &annotations, &candidates, defaults)
        .map_err(Invalid::Policy)?;
    if !scope.platform_annotations && !policy.platform_annotations {
        return Ok(Some(Governed { target, annotations, policy, takeover: BTreeMap::new() }));
    }
    // vCluster Platform's settings, under dormant's own (by the agent's
    // flag, or the policy's field: the Platform's settings name no policy,
    // so the same one wins again); its forced sleep taken over as dormant's.
    let mut overlay = loft::parse_annotations(target.object.annotations()).map_err(Invalid::Annotations)?;
    // A vcluster's vcluster.yaml (read only with `--vcluster-yaml`), under
    // the annotations.
    if r.kind == super::TargetKind::VCluster
        && let Some(config) = stores.vcluster_config(&r.namespace, &r.name)
    {
        overlay = overlay.over(config.map_err(Invalid::VClusterConfig)?);
    }
    let loft::Layered { annotations, provenance, takeover } =
        loft::layer_under(&annotations, &overlay, chrono::Utc::now());
    let mut policy = resolve(r.kind, &target.namespace_labels, &annotations, &candidates, defaults)
        .map_err(Invalid::Policy)?;
    provenance.attribute(&mut policy);
    Ok(Some(Governed { target, annotations, policy, takeover }))
}
