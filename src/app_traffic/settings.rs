//! The app-traffic flags (part of `dormant agent`'s), every one with a
//! `DORMANT_*` fallback, checked with the others at start.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use clap::Args;

/// `dormant agent`'s app-traffic flags.
#[derive(Debug, Clone, Args)]
pub struct AppTrafficArgs {
    /// Address the app-traffic listeners bind (one port per held Service
    /// port, from --app-traffic-ports); app traffic is not held when unset.
    #[arg(long = "app-traffic-addr", env = "DORMANT_APP_TRAFFIC_ADDR")]
    pub addr: Option<IpAddr>,
    /// The ports held Services may use, `first-last`.
    #[arg(long = "app-traffic-ports", env = "DORMANT_APP_TRAFFIC_PORTS", default_value = "20000-21999")]
    pub ports: String,
    /// Where held Services send their traffic: the agent's addresses
    /// (comma-separated), or `service:<name>`, a Service in the agent's
    /// namespace whose ready endpoints are the agent's pods (the chart's).
    /// Default: --app-traffic-addr, when it is one address.
    #[arg(long = "app-traffic-advertise", env = "DORMANT_APP_TRAFFIC_ADVERTISE")]
    pub advertise: Option<String>,
    /// Requests that may wait for one waking Service port; more get 503.
    #[arg(long = "app-traffic-max-waiting", env = "DORMANT_APP_TRAFFIC_MAX_WAITING", default_value_t = 1000)]
    pub max_waiting: usize,
    /// Connections the listeners hold at once, across all ports; more are
    /// closed at once.
    #[arg(
        long = "app-traffic-max-connections",
        env = "DORMANT_APP_TRAFFIC_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
}

/// Where held Services send their traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdvertiseSetting {
    Addresses(Vec<IpAddr>),
    /// A Service in the agent's namespace.
    Service(String),
}

/// The app-traffic settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTrafficSettings {
    pub bind: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub advertise: AdvertiseSetting,
    pub max_waiting: usize,
    pub max_connections: usize,
}

impl AppTrafficArgs {
    /// Checks the flags, adding what is wrong to `errors`; `None` when app
    /// traffic is off (or a flag is wrong).
    pub fn validate(&self, errors: &mut Vec<String>) -> Option<AppTrafficSettings> {
        let Some(bind) = self.addr else {
            if self.advertise.is_some() {
                errors.push("--app-traffic-advertise needs --app-traffic-addr".into());
            }
            return None;
        };
        let before = errors.len();
        let ports =
            parse_ports(&self.ports).map_err(|e| errors.push(format!("--app-traffic-ports: {e}"))).ok();
        let advertise = match self.advertise.as_deref().map(str::trim) {
            Some(s) if s.starts_with("service:") => {
                let name = s.trim_start_matches("service:").trim();
                if name.is_empty()
                    || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    errors
                        .push(format!("--app-traffic-advertise {s:?}: expected service:<name of a Service>"));
                }
                Some(AdvertiseSetting::Service(name.to_string()))
            }
            Some(list) => {
                let parsed: Result<Vec<IpAddr>, _> =
                    list.split(',').map(|a| a.trim().parse::<IpAddr>()).collect();
                match parsed {
                    Ok(a) if !a.is_empty() => Some(AdvertiseSetting::Addresses(a)),
                    _ => {
                        errors.push(format!(
                            "--app-traffic-advertise {list:?}: expected IP addresses (comma-separated) or service:<name>"
                        ));
                        None
                    }
                }
            }
            None if !bind.is_unspecified() => Some(AdvertiseSetting::Addresses(vec![bind])),
            None => {
                errors.push(format!(
                    "--app-traffic-addr {bind} listens on every address: say which to advertise with --app-traffic-advertise"
                ));
                None
            }
        };
        if let Some(AdvertiseSetting::Addresses(a)) = &advertise
            && let Some(bad) = a.iter().find(|a| a.is_loopback() || a.is_unspecified() || a.is_multicast())
        {
            errors.push(format!(
                "--app-traffic-advertise {bad}: EndpointSlices refuse loopback, unspecified and multicast addresses"
            ));
        }
        if self.max_waiting == 0 {
            errors.push("--app-traffic-max-waiting: must be at least 1".into());
        }
        if self.max_connections == 0 {
            errors.push("--app-traffic-max-connections: must be at least 1".into());
        }
        if errors.len() > before {
            return None;
        }
        Some(AppTrafficSettings {
            bind,
            ports: ports?,
            advertise: advertise?,
            max_waiting: self.max_waiting,
            max_connections: self.max_connections,
        })
    }
}

/// `20000-21999` (or one port).
fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("{s:?}: expected a port range such as 20000-21999");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok(a..=b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn args(addr: Option<&str>, ports: &str, advertise: Option<&str>) -> AppTrafficArgs {
        AppTrafficArgs {
            addr: addr.map(|a| a.parse().unwrap()),
            ports: ports.into(),
            advertise: advertise.map(String::from),
            max_waiting: 1000,
            max_connections: 10_000,
        }
    }

    #[test]
    fn every_bad_flag_is_reported_and_good_ones_read() {
        let mut e = Vec::new();
        assert_eq!(args(None, "20000-21999", None).validate(&mut e), None);
        assert!(e.is_empty());
        let ok = args(Some("0.0.0.0"), "20000-20099", Some("service:dormant-app-traffic"))
            .validate(&mut e)
            .unwrap();
        assert_eq!(
            (ok.ports, ok.advertise),
            (20000..=20099, AdvertiseSetting::Service("dormant-app-traffic".into()))
        );
        let one = args(Some("198.18.0.1"), "20000", None).validate(&mut e).unwrap();
        assert_eq!(one.advertise, AdvertiseSetting::Addresses(vec!["198.18.0.1".parse().unwrap()]));
        assert!(e.is_empty(), "{e:?}");
        for (a, ports, adv, want) in [
            (None, "20000-21999", Some("10.0.0.1"), "needs --app-traffic-addr"),
            (Some("0.0.0.0"), "20000-21999", None, "say which to advertise"),
            (Some("0.0.0.0"), "21999-20000", Some("10.0.0.1"), "port range"),
            (Some("0.0.0.0"), "lots", Some("10.0.0.1"), "port range"),
            (Some("0.0.0.0"), "20000-21999", Some("127.0.0.1"), "refuse loopback"),
            (Some("0.0.0.0"), "20000-21999", Some("service:Bad_Name"), "expected service:<name"),
            (Some("0.0.0.0"), "20000-21999", Some("ten.0.0.1"), "expected IP addresses"),
        ] {
            let mut e = Vec::new();
            assert_eq!(args(a, ports, adv).validate(&mut e), None);
            assert!(e.iter().any(|m| m.contains(want)), "{want}: {e:?}");
        }
    }
}
