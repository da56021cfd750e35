//! The cost model: what the resources a sleeping target would have
//! requested cost per hour, accrued into the savings counter while it
//! sleeps.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::SavingsLabels;
use crate::policy::Pricing;
use crate::target::TargetRef;
use crate::target::workload::Requests;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What `requests` cost for one hour at `pricing`.
pub fn hourly_cost(requests: Requests, pricing: &Pricing) -> f64 {
    requests.cpu_cores * pricing.cpu_core_hour + requests.memory_bytes / GIB * pricing.memory_gib_hour
}

#[derive(Debug, Clone)]
struct Running {
    per_hour: f64,
    labels: SavingsLabels,
    accrued_until: DateTime<Utc>,
}

/// Accrues savings for sleeping targets.
#[derive(Debug, Default)]
pub struct Meter {
    running: Mutex<HashMap<TargetRef, Running>>,
}

impl Meter {
    /// Starts (or updates) accruing `per_hour` for `target` from `from`.
    /// An already running meter keeps its accrued time.
    pub fn run(&self, target: &TargetRef, per_hour: f64, labels: SavingsLabels, from: DateTime<Utc>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .entry(target.clone())
            .and_modify(|r| {
                r.per_hour = per_hour;
                r.labels = labels.clone();
            })
            .or_insert(Running { per_hour, labels, accrued_until: from });
    }

    /// Adds what each running target saved since it was last accrued.
    pub fn accrue(
        &self,
        savings: &prometheus_client::metrics::family::Family<
            SavingsLabels,
            prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>,
        >,
        now: DateTime<Utc>,
    ) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for r in running.values_mut() {
            let secs = (now - r.accrued_until).num_milliseconds() as f64 / 1000.0;
            if secs > 0.0 {
                savings.get_or_create(&r.labels).inc_by(r.per_hour * secs / 3600.0);
                r.accrued_until = now;
            }
        }
    }

    /// Stops accruing for `target` (call [`Meter::accrue`] first to count up to now).
    pub fn stop(&self, target: &TargetRef) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(target);
    }

    pub fn is_running(&self, target: &TargetRef) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn two_cores_and_four_gib_for_ninety_minutes() {
        let pricing = Pricing { cpu_core_hour: 0.04, memory_gib_hour: 0.005, currency: "EUR".into() };
        let per_hour = hourly_cost(Requests { cpu_cores: 2.0, memory_bytes: 4.0 * GIB }, &pricing);
        assert!((per_hour - 0.1).abs() < 1e-12);
        let meter = Meter::default();
        let savings = Family::<SavingsLabels, Counter<f64, AtomicU64>>::default();
        let t = TargetRef::namespace("a");
        let labels = SavingsLabels {
            target: "namespace/a".into(),
            kind: "namespace".into(),
            namespace: "a".into(),
            policy: "p".into(),
            currency: "EUR".into(),
        };
        let start = Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, 0).unwrap();
        meter.run(&t, per_hour, labels.clone(), start);
        meter.accrue(&savings, start + chrono::Duration::minutes(30));
        meter.accrue(&savings, start + chrono::Duration::minutes(90));
        meter.stop(&t);
        meter.accrue(&savings, start + chrono::Duration::minutes(600));
        assert!((savings.get_or_create(&labels).get() - 0.15).abs() < 1e-9);
    }
}
