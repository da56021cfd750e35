//! The web page, rendered on the server: plain HTML from the same models
//! the JSON API answers, every value escaped here, forms that work
//! without JavaScript, and one small script (`assets/app.js`) that follows
//! a wake or a sleep until it is done. The assets are compiled into the
//! binary; there is no build step.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::authn::Identity;
use super::model::{Explanation, TargetSummary, short};

pub const SCRIPT: &str = include_str!("assets/app.js");
pub const STYLE: &str = include_str!("assets/app.css");

/// Where the page lives.
pub const BASE: &str = "/dormant/ui/";

/// `s` safe inside HTML text and double-quoted attributes.
pub fn escape(s: &str) -> String {
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

/// The page's path for a target (`vcluster/team-a/dev` → `targets/vcluster/team-a/dev`).
pub fn target_path(target: &str) -> String {
    format!("{BASE}targets/{target}")
}

fn layout(title: &str, who: Option<&Identity>, csrf: Option<&str>, body: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{} · dormant</title>\n<link rel=\"stylesheet\" href=\"{BASE}assets/app.css\">\n<script src=\"{BASE}assets/app.js\" defer></script>\n</head>\n<body>\n<header>\n<p class=\"brand\"><a href=\"{BASE}\">dormant</a></p>\n",
        escape(title)
    );
    if let (Some(who), Some(csrf)) = (who, csrf) {
        let _ = writeln!(
            h,
            "<form method=\"post\" action=\"{BASE}signout\" class=\"who\"><span>Signed in as <strong id=\"user\">{}</strong></span> <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Sign out</button></form>",
            escape(&who.user),
            escape(csrf)
        );
    }
    let _ = write!(h, "</header>\n<main>\n{body}</main>\n</body>\n</html>\n");
    h
}

/// Sign in with a token, bound to the browser's pre-session by `csrf`.
pub fn signin(csrf: &str, problem: Option<&str>) -> String {
    let mut b = String::from("<h1>Sign in</h1>\n");
    if let Some(p) = problem {
        let _ = writeln!(b, "<p class=\"problem\" role=\"alert\">{}</p>", escape(p));
    }
    let _ = write!(
        b,
        "<p>Sign in with your own Kubernetes credentials: run <code>dormant ui</code>, which opens a one-time link signed with your kubeconfig's, or paste a bearer token the cluster accepts (for example from <code>kubectl create token</code>).</p>\n<form method=\"post\" action=\"{BASE}signin\" class=\"signin\">\n<input type=\"hidden\" name=\"csrf\" value=\"{}\">\n<label for=\"token\">Bearer token</label>\n<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\n<button type=\"submit\">Sign in</button>\n</form>\n",
        escape(csrf)
    );
    layout("Sign in", None, None, &b)
}

/// The confirmation a one-time link opens on: signing in takes a click, so
/// a link fetched by a preview or a scanner signs nobody in.
pub fn link(who: &Identity, ticket: &str, csrf: &str) -> String {
    let b = format!(
        "<h1>Sign in as {user}</h1>\n<p>This link was made by <code>dormant ui</code> for <strong>{user}</strong>. It works once.</p>\n<form method=\"post\" action=\"{BASE}link\">\n<input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\n<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n<button type=\"submit\" id=\"continue\">Continue as {user}</button>\n</form>\n",
        user = escape(&who.user),
        ticket = escape(ticket),
        csrf = escape(csrf),
    );
    layout("Sign in", None, None, &b)
}

fn money(v: f64, currency: &str) -> String {
    if v >= 1.0 { format!("{v:.2} {currency}/h") } else { format!("{v:.3} {currency}/h") }
}

fn memory(bytes: f64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= GIB { format!("{:.1} GiB", bytes / GIB) } else { format!("{:.0} MiB", bytes / MIB) }
}

/// What sleeping saves, in words.
pub fn saves(t: &TargetSummary) -> String {
    match &t.saves {
        Some(s) if s.cpu_cores > 0.0 || s.memory_bytes > 0.0 => format!(
            "{} ({} CPU, {})",
            money(s.per_hour, &s.currency),
            (s.cpu_cores * 1000.0).round() / 1000.0,
            memory(s.memory_bytes)
        ),
        Some(_) => "nothing requested".into(),
        None => "-".into(),
    }
}

fn idle_for(t: &TargetSummary, now: DateTime<Utc>) -> String {
    t.idle_since.map_or("-".into(), |s| short(now - s))
}

/// The targets the caller may see.
pub fn list(who: &Identity, csrf: &str, targets: &[TargetSummary], now: DateTime<Utc>) -> String {
    let mut b = String::from("<h1>Targets</h1>\n");
    if targets.is_empty() {
        b.push_str("<p id=\"empty\">You may see no targets. Someone who administers the cluster can bind you to the ClusterRole <code>dormant-viewer</code> (to look) or <code>dormant-operator</code> (to sleep and wake) in your namespaces.</p>\n");
        return layout("Targets", Some(who), Some(csrf), &b);
    }
    b.push_str("<table id=\"targets\">\n<caption>Virtual clusters and namespaces you may see, and what sleeping them saves</caption>\n<thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Kind</th><th scope=\"col\">Namespace</th><th scope=\"col\">State</th><th scope=\"col\">Idle for</th><th scope=\"col\">Next</th><th scope=\"col\">Last used by</th><th scope=\"col\">Sleeping saves</th></tr></thead>\n<tbody>\n");
    for t in targets {
        let _ = writeln!(
            b,
            "<tr data-target=\"{target}\"><th scope=\"row\"><a href=\"{href}\">{name}</a></th><td>{kind}</td><td>{ns}</td><td><span class=\"state state-{state}\">{state}</span></td><td>{idle}</td><td>{next}</td><td>{by}</td><td>{saves}</td></tr>",
            target = escape(&t.target),
            href = escape(&target_path(&t.target)),
            name = escape(&t.name),
            kind = escape(&t.kind),
            ns = escape(&t.namespace),
            state = escape(&t.state),
            idle = escape(&idle_for(t, now)),
            next = escape(&t.next_text),
            by = escape(t.last_used_by.as_deref().unwrap_or("-")),
            saves = escape(&saves(t)),
        );
    }
    b.push_str("</tbody>\n</table>\n");
    layout("Targets", Some(who), Some(csrf), &b)
}

/// One target: explain's content, and what the caller may do with it.
pub fn detail(
    who: &Identity,
    csrf: &str,
    x: &Explanation,
    now: DateTime<Utc>,
    watch: Option<&str>,
    notice: Option<&str>,
) -> String {
    let t = &x.summary;
    let api_path = format!("/dormant/v1/targets/{}", t.target);
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<p><a href=\"{BASE}\">All targets</a></p>\n<h1>{} <span class=\"kind\">{}</span></h1>",
        escape(&t.name),
        escape(&t.kind)
    );
    if let Some(n) = notice {
        let _ = writeln!(b, "<p class=\"notice\" role=\"status\">{}</p>", escape(n));
    }
    let progress = t.progress.as_ref();
    let _ = writeln!(
        b,
        "<section id=\"live\" data-poll=\"{api}\" data-watch=\"{watch}\" data-state=\"{state}\" aria-live=\"polite\">\n<p>State: <span id=\"state\" class=\"state state-{state}\">{state}</span> <span id=\"status\">{status}</span></p>\n<p><label for=\"progress\">Workloads ready</label> <progress id=\"progress\" max=\"{max}\" value=\"{value}\">{value} of {max}</progress> <span id=\"progress-text\">{value} of {max}</span></p>\n</section>",
        api = escape(&api_path),
        watch = escape(watch.unwrap_or("")),
        state = escape(&t.state),
        status = escape(&status_text(t)),
        max = progress.map_or(0, |p| p.workloads),
        value = progress.map_or(0, |p| p.ready),
    );
    b.push_str("<dl class=\"facts\">\n");
    let mut fact = |k: &str, v: String| {
        let _ = writeln!(b, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(&v));
    };
    fact("Object", x.object.clone());
    fact("Why", t.reason.clone());
    fact(
        "Next",
        t.next.as_ref().map_or(t.next_text.clone(), |n| {
            format!("{} ({} at {})", t.next_text, n.action, n.at.to_rfc3339())
        }),
    );
    fact("Idle for", idle_for(t, now));
    fact("Last used by", t.last_used_by.clone().unwrap_or_else(|| "-".into()));
    if !x.used_by.is_empty() {
        fact("Used by", x.used_by.iter().map(|(w, n)| format!("{w}: {n}")).collect::<Vec<_>>().join(", "));
    }
    for (label, text) in &x.foresight {
        fact(label, text.clone());
    }
    fact("Sleeping saves", saves(t));
    if let Some(u) = &t.prevent_wakeup_until {
        fact("Requests do not wake it until", u.clone());
    }
    if let Some(n) = &x.note {
        fact("Note", n.clone());
    }
    fact("Policy", t.policy.clone().unwrap_or_else(|| "none (agent settings)".into()));
    b.push_str("</dl>\n");
    b.push_str("<h2>Actions</h2>\n<div class=\"actions\">\n");
    let action = |b: &mut String, name: &str, label: &str, extra: &str| {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"{}/{name}\" class=\"action\">\n<input type=\"hidden\" name=\"csrf\" value=\"{}\">\n{extra}<button type=\"submit\" id=\"{name}\">{label}</button>\n</form>\n",
            escape(&target_path(&t.target)),
            escape(csrf)
        );
    };
    action(&mut b, "sleep", "Sleep now", "");
    action(&mut b, "wake", "Wake now", "");
    action(
        &mut b,
        "prevent-wakeup",
        "Sleep and prevent wake-up",
        "<label for=\"until\">Requests do not wake it until (your time zone)</label>\n<input id=\"until\" name=\"until\" type=\"datetime-local\" required>\n<input type=\"hidden\" name=\"tz_offset\" value=\"0\" class=\"tz-offset\">\n",
    );
    b.push_str("</div>\n");
    if x.is_target && !x.settings.is_empty() {
        b.push_str("<h2>Effective policy</h2>\n<table id=\"settings\">\n<caption>Each value and where it comes from</caption>\n<thead><tr><th scope=\"col\">Setting</th><th scope=\"col\">Value</th><th scope=\"col\">From</th></tr></thead>\n<tbody>\n");
        for s in &x.settings {
            let _ = writeln!(
                b,
                "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td></tr>",
                escape(&s.name),
                escape(&s.value),
                escape(&s.from)
            );
        }
        b.push_str("</tbody>\n</table>\n");
    }
    if !x.workloads.is_empty() {
        b.push_str("<h2>Workloads</h2>\n<table id=\"workloads\">\n<caption>What dormant scales for this target</caption>\n<thead><tr><th scope=\"col\">Kind</th><th scope=\"col\">Name</th><th scope=\"col\">Now</th><th scope=\"col\">Before sleep</th></tr></thead>\n<tbody>\n");
        for w in &x.workloads {
            let now_value = match (w.replicas, w.suspend) {
                (Some(r), _) => format!("replicas {r} ({} ready)", w.ready),
                (None, Some(s)) => format!("suspend {s}"),
                _ => String::new(),
            };
            let _ = writeln!(
                b,
                "<tr><td>{}</td><th scope=\"row\">{}{}</th><td>{}</td><td>{}</td></tr>",
                escape(&w.kind),
                escape(&w.name),
                if w.excluded { " (excluded)" } else { "" },
                escape(&now_value),
                escape(w.before_sleep.as_deref().unwrap_or("-"))
            );
        }
        b.push_str("</tbody>\n</table>\n");
    }
    layout(&t.name, Some(who), Some(csrf), &b)
}

/// What the live status line says for a target's summary.
pub fn status_text(t: &TargetSummary) -> String {
    match (t.state.as_str(), &t.progress) {
        ("awake", Some(p)) if p.done => "awake and ready".into(),
        ("awake", Some(p)) => format!("awake, {} of {} workloads ready", p.ready, p.workloads),
        ("waking", Some(p)) => format!("waking: {} of {} workloads ready", p.ready, p.workloads),
        ("sleeping", _) => "going to sleep".into(),
        ("asleep", _) => "asleep".into(),
        ("invalid", _) => "left as it is until its policy or annotations are fixed".into(),
        _ => String::new(),
    }
}

/// An answer the page gives instead of a page (403, 404, ...).
pub fn problem(title: &str, message: &str, who: Option<&Identity>, csrf: Option<&str>) -> String {
    let b = format!(
        "<h1>{}</h1>\n<p class=\"problem\" role=\"alert\" id=\"problem\">{}</p>\n<p><a href=\"{BASE}\">All targets</a></p>\n",
        escape(title),
        escape(message)
    );
    layout(title, who, csrf, &b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::authn::Via;
    use crate::api::model::{AgentSettings, Progress, Savings};

    fn alice() -> Identity {
        Identity {
            user: "alice".into(),
            uid: None,
            groups: vec![],
            extra: Default::default(),
            via: Via::Token,
        }
    }

    fn summary(name: &str) -> TargetSummary {
        TargetSummary {
            target: format!("vcluster/team-a/{name}"),
            kind: "vcluster".into(),
            namespace: "team-a".into(),
            name: name.into(),
            state: "awake".into(),
            desired: Some("awake".into()),
            reason: "in use".into(),
            idle_since: None,
            next: None,
            next_text: "asleep in 1h".into(),
            last_used_by: Some("bob <script>".into()),
            policy: None,
            saves: Some(Savings {
                cpu_cores: 0.5,
                memory_bytes: 512.0 * 1024.0 * 1024.0,
                per_hour: 0.0179,
                currency: "USD".into(),
            }),
            prevent_wakeup_until: None,
            progress: Some(Progress { workloads: 2, ready: 1, done: false }),
        }
    }

    #[test]
    fn everything_a_caller_or_cluster_controls_is_escaped() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        let mut evil = alice();
        evil.user = "<img src=x onerror=alert(1)>".into();
        let page = list(&evil, "t\"><script>", &[summary("dev\"><script>alert(1)</script>")], Utc::now());
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
        assert!(!page.contains("bob <script>"), "{page}");
        assert!(page.contains("bob &lt;script&gt;"));
    }

    #[test]
    fn pages_load_only_their_own_script_and_style_and_have_no_inline_script() {
        let x = Explanation {
            summary: summary("dev"),
            object: "StatefulSet team-a/dev".into(),
            is_target: true,
            asleep_since: None,
            last_used_at: None,
            first_seen: None,
            used_by: vec![],
            forced_since: None,
            foresight: vec![],
            note: None,
            settings: vec![],
            workloads: vec![],
            synced_pods: Some(0),
            agent: AgentSettings::new(&Default::default(), &crate::target::Scope::default(), None),
        };
        for page in [
            signin("c", Some("bad token")),
            list(&alice(), "c", &[summary("dev")], Utc::now()),
            list(&alice(), "c", &[], Utc::now()),
            detail(&alice(), "c", &x, Utc::now(), Some("wake"), None),
            problem("Forbidden", "no", Some(&alice()), Some("c")),
        ] {
            assert_eq!(page.matches("<script").count(), 1, "{page}");
            assert!(page.contains("<script src=\"/dormant/ui/assets/app.js\" defer></script>"));
            for handler in ["onclick=", "onload=", "onerror=", "onsubmit=", "onchange="] {
                assert!(!page.contains(handler), "no inline handlers: {page}");
            }
            assert!(!page.contains("style=\""), "no inline style");
            assert!(page.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
        }
    }

    #[test]
    fn every_form_carries_its_csrf_token_and_every_input_a_label() {
        let x = Explanation {
            summary: summary("dev"),
            object: "StatefulSet team-a/dev".into(),
            is_target: true,
            asleep_since: None,
            last_used_at: None,
            first_seen: None,
            used_by: vec![],
            forced_since: None,
            foresight: vec![],
            note: None,
            settings: vec![],
            workloads: vec![],
            synced_pods: Some(0),
            agent: AgentSettings::new(&Default::default(), &crate::target::Scope::default(), None),
        };
        let page = detail(&alice(), "TOKEN", &x, Utc::now(), None, None);
        let forms = page.matches("<form ").count();
        assert_eq!(forms, 4, "sign out, sleep, wake, prevent wake-up");
        assert_eq!(page.matches("name=\"csrf\" value=\"TOKEN\"").count(), forms);
        assert!(page.contains("action=\"/dormant/ui/targets/vcluster/team-a/dev/wake\""));
        assert!(page.contains("<label for=\"until\">") && page.contains("<label for=\"progress\">"));
        assert!(page.contains("data-poll=\"/dormant/v1/targets/vcluster/team-a/dev\""));
        assert!(page.contains("1 of 2"));
    }

    #[test]
    fn the_live_status_says_how_far_a_wake_is() {
        let mut t = summary("dev");
        t.state = "waking".into();
        assert_eq!(status_text(&t), "waking: 1 of 2 workloads ready");
        t.state = "awake".into();
        t.progress = Some(Progress { workloads: 2, ready: 2, done: true });
        assert_eq!(status_text(&t), "awake and ready");
        assert_eq!(saves(&t), "0.018 USD/h (0.5 CPU, 512 MiB)");
    }
}
