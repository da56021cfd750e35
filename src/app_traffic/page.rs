//! Every answer the app-traffic listener gives itself, made in this one
//! place: a small HTML page for a browser (`Accept: text/html`), one line
//! of text for anything else. None of them names the target, its
//! namespace or its workloads: the app's URL may be public, its cluster is
//! not (the agent's log and Events say which and why).
//!
//! The waiting page (opt-in per target or Service) shows how far the wake
//! is and follows it: its one script (`assets/wait.js`, allowed by its
//! hash in the page's Content-Security-Policy) asks again every two
//! seconds and updates the page in place, then loads the URL once the
//! answer is no longer the waiting page, which is the app. The page is not
//! reloaded while it waits: a page that refreshes itself makes screen
//! readers start over (WCAG 2.2.1; axe-core's `meta-refresh` rule), so the
//! `<meta>` refresh is only the fallback for browsers without script. It
//! is a 503 with `Cache-Control: no-store`, so no cache keeps it and no
//! crawler indexes it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::policy::annotations::{Until, rfc3339};
use crate::proxy::error::full;
use crate::proxy::upstream::ProxyBody;

/// How far a wake is, for the waiting page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Pods ready, and pods wanted, across what the wake brings back (the
    /// target's workloads; a vcluster's control plane).
    pub ready: u32,
    pub wanted: u32,
    /// The app's own endpoints answer (the next refresh is the app).
    pub serving: bool,
    pub elapsed: Duration,
}

/// Why the listener answers instead of the app.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Asleep, and this request does not count as use (a health checker,
    /// an ignore rule, `X-Dormant-Ignore`): it does not wake the app.
    AsleepIgnored,
    /// Put to sleep with requests not to wake it, until then.
    Prevented(Until),
    /// Its policy does not wake it on request.
    WakeOnRequestOff,
    /// Its policy or annotations cannot be read: dormant leaves it as it is.
    Invalid,
    /// Too many requests wait for this Service already.
    Overloaded,
    /// Not awake within the wake timeout.
    Timeout(Duration),
    /// The wake could not be asked for.
    WakeFailed,
    /// No endpoint of the app answered.
    Unreachable,
    /// The target is gone, or no longer one dormant serves.
    Gone,
    /// The waiting page.
    Waiting(Progress),
}

/// Seconds between the waiting page's looks at the wake.
pub const REFRESH_SECS: u64 = 2;

/// The waiting page's script.
const WAIT_SCRIPT: &str = include_str!("assets/wait.js");

/// The waiting page's Content-Security-Policy: its inline style, its one
/// script by hash, and requests to its own origin (the script's).
fn waiting_csp() -> &'static str {
    static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use base64::Engine as _;
        let hash = ring::digest::digest(&ring::digest::SHA256, WAIT_SCRIPT.as_bytes());
        format!(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{}'; connect-src 'self'",
            base64::engine::general_purpose::STANDARD.encode(hash.as_ref())
        )
    });
    &CSP
}

impl Answer {
    /// The metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Answer::AsleepIgnored | Answer::Prevented(_) | Answer::WakeOnRequestOff | Answer::Invalid => {
                "prevented"
            }
            Answer::Overloaded => "overloaded",
            Answer::Timeout(_) => "timeout",
            Answer::WakeFailed | Answer::Unreachable => "upstream-error",
            Answer::Gone => "not-found",
            Answer::Waiting(_) => "waiting-page",
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, String) {
        let asleep = "This app is asleep";
        match self {
            Answer::AsleepIgnored => (
                StatusCode::SERVICE_UNAVAILABLE,
                asleep,
                "It is asleep, and this request does not wake it (health checks and ignored clients never do).".into(),
            ),
            Answer::Prevented(Until::Never) => (
                StatusCode::SERVICE_UNAVAILABLE,
                asleep,
                "It was put to sleep until someone wakes it by hand; requests do not wake it.".into(),
            ),
            Answer::Prevented(Until::Time(at)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                asleep,
                format!("It was put to sleep; requests do not wake it until {}.", rfc3339(*at)),
            ),
            Answer::WakeOnRequestOff => (
                StatusCode::SERVICE_UNAVAILABLE,
                asleep,
                "It is asleep, and its sleep policy does not wake it on requests.".into(),
            ),
            Answer::Invalid => (
                StatusCode::SERVICE_UNAVAILABLE,
                asleep,
                "It is asleep, and its sleep settings cannot be read; dormant leaves it as it is until they are fixed.".into(),
            ),
            Answer::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "This app is waking up",
                "It is waking up, and too many requests are waiting for it already; try again in a few seconds.".into(),
            ),
            Answer::Timeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                "This app did not wake up in time",
                format!(
                    "It was asleep and did not wake up within {}; try again shortly, or ask its owners.",
                    crate::policy::duration::format(*d)
                ),
            ),
            Answer::WakeFailed => (
                StatusCode::BAD_GATEWAY,
                "This app could not be woken",
                "It is asleep, and waking it failed; try again shortly.".into(),
            ),
            Answer::Unreachable => (
                StatusCode::BAD_GATEWAY,
                "This app does not answer",
                "None of its servers answered; try again shortly.".into(),
            ),
            Answer::Gone => (StatusCode::NOT_FOUND, "Not found", "Nothing is served here.".into()),
            Answer::Waiting(p) => (StatusCode::SERVICE_UNAVAILABLE, "This app is waking up", p.line()),
        }
    }

    /// The answer: HTML when `html`, else a line of text.
    pub fn response(&self, html: bool) -> Response<ProxyBody> {
        let (code, title, line) = self.parts();
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        match self {
            Answer::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(5u64));
            }
            Answer::Waiting(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(REFRESH_SECS));
            }
            _ => {}
        }
        let body = if html {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            let csp = match self {
                Answer::Waiting(_) => waiting_csp(),
                _ => "default-src 'none'; style-src 'unsafe-inline'",
            };
            headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
            html_page(
                title,
                &line,
                match self {
                    Answer::Waiting(p) => Some(p),
                    _ => None,
                },
            )
        } else {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            format!("{title}. {line}\n")
        };
        let mut r = Response::new(full(Bytes::from(body)));
        *r.status_mut() = code;
        *r.headers_mut() = headers;
        r
    }
}

impl Progress {
    /// One sentence: where the wake is.
    pub fn line(&self) -> String {
        format!("{} ({} s so far).", self.step(), self.elapsed.as_secs())
    }

    /// Where the wake is, without the time (what changes only when the
    /// wake moves on: the page's live region).
    pub fn step(&self) -> String {
        if self.serving {
            "It is up; loading it now".into()
        } else if self.wanted == 0 || self.ready == 0 && self.elapsed < Duration::from_secs(1) {
            "It was asleep and is starting".into()
        } else {
            format!("It was asleep and is starting: {} of {} ready", self.ready, self.wanted)
        }
    }

    /// How far, from 0 to 100: pods ready, then the app answering.
    pub fn percent(&self) -> u32 {
        if self.serving {
            return 100;
        }
        (self.ready.min(self.wanted) * 90).checked_div(self.wanted).unwrap_or(0) + 5
    }
}

/// Whether the request prefers HTML (a browser navigating).
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("text/html")))
}

fn html_page(title: &str, line: &str, progress: Option<&Progress>) -> String {
    let (head, main) = match progress {
        Some(p) => (
            format!("<noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"></noscript>"),
            format!(
                "<p id=\"dormant-status\" role=\"status\">{step}.</p>\n<p id=\"dormant-elapsed\">{secs} s so far</p>\n<progress id=\"dormant-progress\" max=\"100\" value=\"{pct}\" aria-label=\"Wake progress\">{pct}%</progress>\n<script>{WAIT_SCRIPT}</script>",
                step = escape(&p.step()),
                secs = p.elapsed.as_secs(),
                pct = p.percent()
            ),
        ),
        None => (String::new(), format!("<p role=\"status\">{}</p>", escape(line))),
    };
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; margin: 0; display: grid; place-items: center; min-height: 100vh; background: #f6f7f9; color: #1d2330; }}
main {{ max-width: 32rem; padding: 2rem; }}
h1 {{ font-size: 1.4rem; margin: 0 0 .5rem; }}
progress {{ width: 100%; height: .75rem; }}
</style>
{head}
</head>
<body>
<main>
<h1>{title}</h1>
{main}
</main>
</body>
</html>
"#,
        title = escape(title),
    )
}

/// HTML text escaping.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn body(r: Response<ProxyBody>) -> String {
        let b = futures::executor::block_on(r.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn every_answer_has_its_code_says_why_and_names_nothing_of_the_cluster() {
        let p = Progress { ready: 1, wanted: 3, serving: false, elapsed: Duration::from_secs(4) };
        let cases = [
            (Answer::AsleepIgnored, 503, "prevented"),
            (Answer::Prevented(Until::Never), 503, "prevented"),
            (Answer::WakeOnRequestOff, 503, "prevented"),
            (Answer::Invalid, 503, "prevented"),
            (Answer::Overloaded, 503, "overloaded"),
            (Answer::Timeout(Duration::from_secs(120)), 504, "timeout"),
            (Answer::WakeFailed, 502, "upstream-error"),
            (Answer::Unreachable, 502, "upstream-error"),
            (Answer::Gone, 404, "not-found"),
            (Answer::Waiting(p.clone()), 503, "waiting-page"),
        ];
        for (a, code, outcome) in cases {
            assert_eq!(a.outcome(), outcome, "{a:?}");
            for html in [true, false] {
                let r = a.response(html);
                assert_eq!(r.status().as_u16(), code, "{a:?}");
                assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
                let retry = r.headers().get(header::RETRY_AFTER).is_some();
                assert_eq!(retry, matches!(a, Answer::Overloaded | Answer::Waiting(_)), "{a:?}");
                let ct = r.headers()[header::CONTENT_TYPE].to_str().unwrap().to_string();
                let text = body(r);
                assert_eq!(ct.starts_with("text/html"), html);
                assert!(html == text.starts_with("<!doctype html>"), "{text}");
            }
        }
        let timeout = body(Answer::Timeout(Duration::from_secs(120)).response(false));
        assert_eq!(
            timeout,
            "This app did not wake up in time. It was asleep and did not wake up within 2m; try again shortly, or ask its owners.\n"
        );
    }

    #[test]
    fn the_waiting_page_follows_the_wake_in_place_and_shows_how_far_it_is() {
        let starting = Progress { ready: 1, wanted: 3, serving: false, elapsed: Duration::from_secs(4) };
        let r = Answer::Waiting(starting.clone()).response(true);
        // It is never reloaded as a whole while it waits: no Refresh
        // header, and the <meta> refresh only for browsers without script.
        assert!(r.headers().get("refresh").is_none());
        // Its script runs only because the CSP names its hash.
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_string();
        let page = body(r);
        assert!(page.contains(r#"<noscript><meta http-equiv="refresh" content="2"></noscript>"#), "{page}");
        let script = page.split("<script>").nth(1).and_then(|s| s.split("</script>").next()).unwrap();
        use base64::Engine as _;
        let hash = base64::engine::general_purpose::STANDARD
            .encode(ring::digest::digest(&ring::digest::SHA256, script.as_bytes()).as_ref());
        assert!(
            csp.contains(&format!("script-src 'sha256-{hash}'")) && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert!(
            page.contains(
                r#"<p id="dormant-status" role="status">It was asleep and is starting: 1 of 3 ready.</p>"#
            ),
            "{page}"
        );
        assert!(page.contains(r#"<p id="dormant-elapsed">4 s so far</p>"#), "{page}");
        assert!(page.contains(r#"value="35""#), "{page}");
        assert_eq!(starting.line(), "It was asleep and is starting: 1 of 3 ready (4 s so far).");
        // Other pages carry no script at all.
        let timeout = Answer::Timeout(Duration::from_secs(3)).response(true);
        assert!(!timeout.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src"));
        assert!(!body(timeout).contains("<script"));
        let up = Progress { serving: true, ..starting };
        assert_eq!(up.percent(), 100);
        assert!(up.line().contains("loading it now"));
        assert_eq!(Progress { ready: 0, wanted: 0, serving: false, elapsed: Duration::ZERO }.percent(), 5);
    }

    #[test]
    fn browsers_are_told_apart_by_accept() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(wants_html(&h("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")));
        assert!(wants_html(&h("TEXT/HTML; q=1")));
        assert!(!wants_html(&h("application/json")));
        assert!(!wants_html(&h("*/*")));
        assert!(!wants_html(&HeaderMap::new()));
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
