//! Which targets live in a namespace: the namespace target (if the
//! namespace is one) and every vcluster whose control plane runs there.
//! Rebuilt from the stores at most every refresh interval, so attributing
//! an activity costs one hash lookup.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{Scope, Stores, TargetKind, TargetRef};

type ByNamespace = HashMap<String, Vec<TargetRef>>;

pub struct TargetIndex {
    stores: Stores,
    scope: Scope,
    refresh: Duration,
    built: RwLock<(Instant, Arc<ByNamespace>)>,
}

impl TargetIndex {
    pub fn new(stores: Stores, scope: Scope, refresh: Duration) -> Self {
        let past = Instant::now().checked_sub(refresh * 2).unwrap_or_else(Instant::now);
        TargetIndex { stores, scope, refresh, built: RwLock::new((past, Arc::new(HashMap::new()))) }
    }

    fn map(&self) -> Arc<ByNamespace> {
        {
            let built = self.built.read().unwrap_or_else(|e| e.into_inner());
            if built.0.elapsed() < self.refresh {
                return built.1.clone();
            }
        }
        let mut map: HashMap<String, Vec<TargetRef>> = HashMap::new();
        for t in self.stores.targets(&self.stores.candidates(), &self.scope) {
            map.entry(t.namespace.clone()).or_default().push(t);
        }
        let map = Arc::new(map);
        *self.built.write().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), map.clone());
        map
    }

    /// The targets living in namespace `ns`.
    pub fn in_namespace(&self, ns: &str) -> Vec<TargetRef> {
        self.map().get(ns).cloned().unwrap_or_default()
    }

    /// True when `t` is a known target.
    pub fn contains(&self, t: &TargetRef) -> bool {
        self.map().get(&t.namespace).is_some_and(|v| v.contains(t))
    }

    /// The vcluster targets in `ns`.
    pub fn vclusters(&self, ns: &str) -> Vec<TargetRef> {
        self.in_namespace(ns).into_iter().filter(|t| t.kind == TargetKind::VCluster).collect()
    }
}
