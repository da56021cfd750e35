//! Routing and reading a request: which vcluster it is for (by path prefix
//! `/vcluster/<namespace>/<name>/…` or by host `<name>.<namespace>.<base>`),
//! the path to forward, and what the request does (verb, resource) for the
//! activity record. Pure functions over strings; self-contained (the
//! activity record's [`ResourceRef`] only) so the fuzzer reaches them.

use crate::activity::ResourceRef;

/// A Kubernetes object name (DNS subdomain): no `.`/`..` path tricks.
fn valid_name(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 253
        && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !p.starts_with(['.', '-'])
        && !p.ends_with(['.', '-'])
        && !p.contains("..")
}

/// A path the upstream may see: no `.` or `..` segment, plain or
/// percent-encoded. Kubernetes paths never have one, and under an upstream
/// with a path prefix (`dormant.dev/upstream: https://gateway/vc/team-a`) a
/// `..` could leave that prefix while the request counts for this vcluster.
fn clean_path(path_and_query: &str) -> bool {
    let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
    !path.split('/').any(|segment| dot_segment(segment.as_bytes()))
}

/// `.` or `..`, each dot plain or `%2e`/`%2E` (byte-wise: this runs for
/// every segment of every request).
fn dot_segment(mut s: &[u8]) -> bool {
    let mut dots = 0;
    while !s.is_empty() {
        s = match s {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', e, rest @ ..] if e.eq_ignore_ascii_case(&b'e') => rest,
            _ => return false,
        };
        dots += 1;
    }
    (1..=2).contains(&dots)
}

/// A routed request: the vcluster (namespace and name, each a valid
/// object name) and the upstream path (with its query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub namespace: String,
    pub name: String,
    pub path_and_query: String,
}

/// Routes by path prefix `/vcluster/<namespace>/<name>`.
pub fn by_path(path_and_query: &str) -> Option<Routed> {
    let rest = path_and_query.strip_prefix("/vcluster/")?;
    let (ns, rest) = rest.split_once('/')?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (name, tail) = rest.split_at(end);
    if !valid_name(ns) || !valid_name(name) || !clean_path(tail) {
        return None;
    }
    let tail = if tail.is_empty() || tail.starts_with('?') { format!("/{tail}") } else { tail.to_string() };
    Some(Routed { namespace: ns.to_string(), name: name.to_string(), path_and_query: tail })
}

/// Routes by host name `<name>.<namespace>.<base_domain>` (port ignored).
pub fn by_host(host: &str, base_domain: &str, path_and_query: &str) -> Option<Routed> {
    let host =
        host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
    let prefix = host.strip_suffix(base_domain)?.strip_suffix('.')?;
    let (name, ns) = prefix.split_once('.')?;
    // Origin form only: `*` (OPTIONS *) or anything else that is not a
    // path would be joined onto an upstream's path prefix as is.
    if !valid_name(name)
        || !valid_name(ns)
        || ns.contains('.')
        || !path_and_query.starts_with('/')
        || !clean_path(path_and_query)
    {
        return None;
    }
    Some(Routed {
        namespace: ns.to_string(),
        name: name.to_string(),
        path_and_query: path_and_query.to_string(),
    })
}

/// What a Kubernetes API request does, read from its method and path the
/// way the API server's request-info resolver reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub verb: String,
    pub resource: Option<ResourceRef>,
    /// The path without the query.
    pub path: String,
    pub long_running: bool,
}

pub fn request_info(method: &str, path_and_query: &str) -> RequestInfo {
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    // The longest path read here is /apis/G/V/namespaces/N/R/NAME/SUB; more
    // segments change nothing. On the stack: this runs for each request.
    let mut segments = [""; 8];
    let mut n = 0;
    for s in path.split('/').filter(|s| !s.is_empty()).take(segments.len()) {
        segments[n] = s;
        n += 1;
    }
    let (group, rest): (&str, &[&str]) = match &segments[..n] {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (group, rest),
        _ => {
            let verb = match method {
                "GET" | "HEAD" => "get",
                "POST" => "post",
                "PUT" => "put",
                "PATCH" => "patch",
                "DELETE" => "delete",
                other => other,
            };
            return RequestInfo {
                verb: verb.to_ascii_lowercase(),
                resource: None,
                path: path.to_string(),
                long_running: false,
            };
        }
    };
    let (namespace, rest): (&str, &[&str]) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (ns, more),
        _ => ("", rest),
    };
    let (resource, name, subresource) = match rest {
        [] => ("", "", ""),
        [r] => (*r, "", ""),
        [r, n] => (*r, *n, ""),
        [r, n, s, ..] => (*r, *n, *s),
    };
    let verb = match (method, name.is_empty()) {
        ("GET" | "HEAD", _) if watch => "watch",
        ("GET" | "HEAD", true) => "list",
        ("GET" | "HEAD", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => "unknown",
    };
    // As kube-apiserver's long-running check: a watch (a GET with `watch`), or a
    // streaming subresource; a POST that says `watch=true` is no watch.
    let long_running =
        verb == "watch" || matches!(subresource, "exec" | "attach" | "portforward" | "proxy" | "log");
    RequestInfo {
        verb: verb.to_string(),
        resource: (!resource.is_empty()).then(|| ResourceRef {
            group: group.to_string(),
            resource: resource.to_string(),
            subresource: subresource.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        path: path.to_string(),
        long_running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_path_prefix() {
        let r = by_path("/vcluster/team-a/dev/api/v1/namespaces?limit=500").unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("team-a", "dev"));
        assert_eq!(r.path_and_query, "/api/v1/namespaces?limit=500");
        assert_eq!(by_path("/vcluster/team-a/dev").unwrap().path_and_query, "/");
        assert_eq!(by_path("/vcluster/team-a/dev?timeout=32s").unwrap().path_and_query, "/?timeout=32s");
        for bad in [
            "/vcluster/team-a",
            "/vcluster//dev/api",
            "/api/v1/pods",
            "/vcluster/Team/dev/api",
            "/vcluster/a/b%2f/api",
            "/vcluster/a/../api",
            "/vcluster/a/b/../../x/api/v1/pods",
            "/vcluster/a/b/api/./v1",
            "/vcluster/a/b/api/%2e%2E/x",
            "/vcluster/a/b/api/.%2e",
            "/vcluster/a/b/..?watch=1",
            "/vcluster/a/b/api/%2E./x",
        ] {
            assert_eq!(by_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn routes_by_host() {
        let r = by_host("dev.team-a.vc.example.com:8443", "vc.example.com", "/api").unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("team-a", "dev"));
        assert_eq!(r.path_and_query, "/api");
        assert_eq!(by_host("dev.team-a.example.org", "vc.example.com", "/"), None);
        assert_eq!(by_host("vc.example.com", "vc.example.com", "/"), None);
        assert_eq!(by_host("a.b.c.vc.example.com", "vc.example.com", "/"), None);
        assert_eq!(by_host("dev.team-a.vc.example.com", "vc.example.com", "/x/../api"), None);
        assert_eq!(by_host("dev.team-a.vc.example.com", "vc.example.com", "*"), None, "found by the fuzzer");
        // Dots inside a segment are not path steps.
        assert!(by_path("/vcluster/a/b/apis/apps.example.com/v1/x..y?q=..").is_some());
        assert!(by_path("/vcluster/a/b/api/.../%2e%2e%2e/%2f").is_some());
    }

    #[test]
    fn reads_verbs_and_resources_like_the_api_server() {
        for (method, path, verb, res, long) in [
            ("GET", "/api/v1/namespaces", "list", Some(("", "namespaces", "", "", "")), false),
            ("GET", "/api/v1/namespaces/team-a", "get", Some(("", "namespaces", "", "", "team-a")), false),
            (
                "GET",
                "/api/v1/namespaces/team-a/pods?watch=true",
                "watch",
                Some(("", "pods", "", "team-a", "")),
                true,
            ),
            (
                "POST",
                "/api/v1/namespaces/team-a/pods/web-0/exec?command=sh",
                "create",
                Some(("", "pods", "exec", "team-a", "web-0")),
                true,
            ),
            (
                "DELETE",
                "/apis/apps/v1/namespaces/x/deployments",
                "deletecollection",
                Some(("apps", "deployments", "", "x", "")),
                false,
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/x/deployments/web/scale",
                "patch",
                Some(("apps", "deployments", "scale", "x", "web")),
                false,
            ),
            (
                "GET",
                "/apis/apps/v1/namespaces/x/deployments/web/status/more/segments",
                "get",
                Some(("apps", "deployments", "status", "x", "web")),
                false,
            ),
            (
                "GET",
                "/api/v1/namespaces/x/services/web/proxy/deep/path/to/page",
                "get",
                Some(("", "services", "proxy", "x", "web")),
                true,
            ),
            (
                "POST",
                "/api/v1/namespaces/team-a/pods?watch=true",
                "create",
                Some(("", "pods", "", "team-a", "")),
                false,
            ),
            ("GET", "/version", "get", None, false),
            ("GET", "/apis", "get", None, false),
            ("GET", "/api/v1", "get", None, false),
        ] {
            let info = request_info(method, path);
            assert_eq!(info.verb, verb, "{method} {path}");
            assert_eq!(info.long_running, long, "{method} {path}");
            let got = info.resource.map(|r| (r.group, r.resource, r.subresource, r.namespace, r.name));
            let want = res.map(|(g, r, s, ns, n)| {
                (g.to_string(), r.to_string(), s.to_string(), ns.to_string(), n.to_string())
            });
            assert_eq!(got, want, "{method} {path}");
        }
    }
}
