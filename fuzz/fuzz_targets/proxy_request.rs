//! Fuzzes what strangers send to the proxy before anything is forwarded:
//! the path and host it routes by, the request it reads for the activity
//! record, the headers it forwards, and the credentials it reads. Never a
//! panic, and:
//! - a routed request names a vcluster by two valid object names and an
//!   upstream path with no `.`/`..` segment, and routes again the same way;
//! - what is forwarded carries no hop-by-hop header, no `Host` and no
//!   opt-out header (it goes on as a user-agent mark);
//! - a bearer token read from a header is non-empty, has no space, and is
//!   in that header; a ServiceAccount claim names `system:serviceaccount:`
//!   with exactly a namespace and a name.
#![no_main]

#[path = "../../src/vocab.rs"]
#[allow(dead_code)]
mod vocab;
#[path = "../../src/activity/resource.rs"]
mod resource;
mod activity {
    pub use crate::resource::ResourceRef;
}
#[path = "../../src/proxy/route.rs"]
mod route;
#[path = "../../src/proxy/headers.rs"]
mod headers;
#[path = "../../src/auth.rs"]
#[allow(dead_code)]
mod auth;

use http::{HeaderMap, HeaderName, HeaderValue, header};

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn no_dot_segments(pq: &str) -> bool {
    let path = pq.split_once('?').map_or(pq, |(p, _)| p);
    !path.split('/').any(|s| matches!(s.to_ascii_lowercase().replace("%2e", ".").as_str(), "." | ".."))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or_default();
    let pq = lines.next().unwrap_or_default();
    let host = lines.next().unwrap_or_default();

    for r in [route::by_path(pq), route::by_host(host, "vc.example.com", pq)].into_iter().flatten() {
        assert!(valid_name(&r.namespace) && valid_name(&r.name), "{r:?}");
        assert!(r.path_and_query.starts_with('/'), "{r:?}");
        assert!(no_dot_segments(&r.path_and_query), "{r:?}");
    }
    if let Some(r) = route::by_path(pq) {
        let again = format!("/vcluster/{}/{}{}", r.namespace, r.name, r.path_and_query);
        assert_eq!(route::by_path(&again).map(|r| r.path_and_query), Some(r.path_and_query.clone()), "{again}");
    }
    let info = route::request_info(method, pq);
    assert!(!info.long_running || info.verb == "watch" || info.resource.as_ref().is_some_and(|r| !r.subresource.is_empty()));
    assert!(info.resource.as_ref().is_none_or(|r| !r.resource.is_empty()));

    let mut h = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.trim().as_bytes()), HeaderValue::from_bytes(value.trim().as_bytes())) else {
            continue;
        };
        h.append(name, value);
    }
    let upgrade = headers::is_upgrade(&h);
    let out = headers::forwardable(&h, upgrade);
    for name in ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "host", vocab::IGNORE_HEADER] {
        assert!(!out.contains_key(name), "{name} was forwarded");
    }
    if !upgrade {
        assert!(!out.contains_key(header::CONNECTION) && !out.contains_key(header::UPGRADE));
    }
    if h.get(vocab::IGNORE_HEADER).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        let ua = out.get(header::USER_AGENT).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
        assert!(ua.ends_with(vocab::IGNORED_USER_AGENT_MARK.as_bytes()), "the opt-out lost its mark");
    }

    if let Some(token) = auth::bearer_token(&h) {
        assert!(!token.is_empty() && !token.contains(' '));
        let value = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(value.contains(token));
        if let Some((user, groups)) = auth::service_account(token) {
            let rest = user.strip_prefix("system:serviceaccount:").expect("a service account user");
            let parts: Vec<&str> = rest.split(':').collect();
            assert!(parts.len() == 2 && parts.iter().all(|p| !p.is_empty()), "{user}");
            assert_eq!(groups.len(), 3);
        }
    }
});
