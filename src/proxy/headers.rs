//! The headers of a forwarded request and of its answer: what belongs to
//! one connection never passes (RFC 9110 7.6.1), an upgrade keeps what it
//! needs, and the `X-Dormant-Ignore` opt-out goes on as a mark in the user
//! agent. Self-contained (the `http` crate and the vocabulary only) so the
//! fuzzer reaches it.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::vocab::{IGNORE_HEADER, IGNORED_USER_AGENT_MARK};

pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("upgrade")))
        && h.contains_key(header::UPGRADE)
}

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Headers the Connection header names are hop-by-hop too.
    // Removed by name as written: looking a header up by `&str` does not
    // allocate (a `HeaderName` for `keep-alive` would).
    if h.contains_key(header::CONNECTION) {
        let values: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        // Byte-wise: a value with one non-ASCII part still names the others.
        for part in values.iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')) {
            let Ok(name) = std::str::from_utf8(part.trim_ascii()) else { continue };
            if !(keep_upgrade && name.eq_ignore_ascii_case("upgrade")) {
                h.remove(name);
            }
        }
    }
    for n in HOP_BY_HOP {
        if keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE) {
            continue;
        }
        h.remove(n);
    }
}

/// The request headers to send upstream (hop-by-hop and Host removed:
/// `forward` sets the upstream's own; upgrades keep their headers).
pub fn forwardable(h: &HeaderMap, upgrade: bool) -> HeaderMap {
    let mut out = h.clone();
    strip_hop_by_hop(&mut out, upgrade);
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    out.remove(header::HOST);
    if let Some(v) = out.remove(IGNORE_HEADER)
        && v.to_str().is_ok_and(|v| v.eq_ignore_ascii_case("true"))
    {
        // The vcluster's API server may report this request through the
        // audit webhook too: the mark in its user agent tells dormant it
        // does not count there either.
        let ua = match out.get(header::USER_AGENT).map(HeaderValue::as_bytes) {
            Some(ua) => [ua, b" ", IGNORED_USER_AGENT_MARK.as_bytes()].concat(),
            None => IGNORED_USER_AGENT_MARK.as_bytes().to_vec(),
        };
        if let Ok(ua) = HeaderValue::from_bytes(&ua) {
            out.insert(header::USER_AGENT, ua);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_never_pass_and_upgrades_keep_theirs() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.append(header::CONNECTION, HeaderValue::from_static(" X-Other "));
        h.append(header::CONNECTION, HeaderValue::from_bytes(b"x-third, \xe9t\xe9").unwrap());
        h.insert("x-third", HeaderValue::from_static("1"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::HOST, HeaderValue::from_static("proxy"));
        h.insert(IGNORE_HEADER, HeaderValue::from_static("true"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let out = forwardable(&h, false);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out.contains_key(header::ACCEPT));
        // The opt-out goes on as a mark in the user agent.
        assert_eq!(out.get(header::USER_AGENT).unwrap(), IGNORED_USER_AGENT_MARK);
        h.insert(header::USER_AGENT, HeaderValue::from_static("kubectl/v1.37.2 (linux/amd64)"));
        let out = forwardable(&h, false);
        assert_eq!(out.get(header::USER_AGENT).unwrap(), "kubectl/v1.37.2 (linux/amd64) (dormant-ignore)");
        h.insert(IGNORE_HEADER, HeaderValue::from_static("false"));
        let out = forwardable(&h, false);
        assert_eq!(out.get(header::USER_AGENT).unwrap(), "kubectl/v1.37.2 (linux/amd64)");
        assert!(!out.contains_key(IGNORE_HEADER));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(is_upgrade(&h));
        let out = forwardable(&h, true);
        assert_eq!(out.get(header::UPGRADE).unwrap(), "SPDY/3.1");
        assert_eq!(out.get(header::CONNECTION).unwrap(), "Upgrade");
    }
}
