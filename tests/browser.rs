//! The web page in a real browser: Debian's headless Chromium driven over
//! WebDriver (chromedriver) against an agent on the testbed. alice, bound
//! to the operating role in team-a only, signs in through the one-time
//! link `dormant ui` makes, sees team-a's targets and none of team-b's,
//! puts a vcluster to sleep and wakes it, watching the wake until it is
//! ready; bob can do nothing to team-a's target from the page or by hand;
//! a form without its CSRF token is refused; axe-core finds no serious or
//! critical accessibility violation.
//!
//! Needs `chromium`, `chromium-driver` (Debian) and npm's `axe-core`;
//! `hack/test.sh` installs them. `DORMANT_UPDATE_SCREENSHOTS=1` writes the
//! README's screenshots into `docs/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser_support;
mod self_service;
mod support;

use std::time::{Duration, Instant};

use browser_support::{Browser, axe_script};
use fantoccini::Locator;
use self_service::*;
use support::*;
use testbed::Cluster;
use testbed::vcluster::{VCluster, VClusterOptions};

fn replicas(c: &Cluster, ns: &str) -> (String, String) {
    (
        jsonpath(c, "statefulset", "dev", Some(ns), "{.spec.replicas}"),
        jsonpath(c, "statefulset", "dev", Some(ns), "{.status.readyReplicas}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_sleeps_and_wakes_her_vcluster_from_the_page_and_bob_cannot_touch_it() {
    let axe = axe_script();
    let c = Cluster::shared();
    let w = tokio::task::block_in_place(|| World::start("browser", &["--default-sleep-after=1h"]));
    let a = c.namespace("team-a", &[("dormant-test", &w.id)]).unwrap();
    let vc = tokio::task::block_in_place(|| {
        let vc = VCluster::create(c, &a, "dev", VClusterOptions::default()).unwrap();
        vc.wait_serving(c, Duration::from_secs(60)).unwrap();
        vc
    });
    let b = tokio::task::block_in_place(|| w.team_namespace("team-b"));
    // alice: the chart's operator role in team-a only. bob: in team-b only.
    bind(c, &a, "dormant-operator", "alice");
    let (bob, _, bob_token) = token_user(c, &b, "bob");
    bind(c, &b, "dormant-operator", &bob);

    // `dormant ui` with alice's kubeconfig makes a one-time link.
    let out = tokio::task::block_in_place(|| w.cli(&c.alice.kubeconfig, &["ui", "--no-open"]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let link = stdout.lines().next().unwrap().to_string();
    assert!(link.starts_with(&format!("{}/dormant/ui/link?ticket=", w.url)), "{link}");

    let browser = Browser::start().await;
    let page = &browser.client;
    page.goto(&link).await.unwrap();
    assert!(browser.text("h1").await.contains("alice"), "the link says whom it signs in");
    browser.click("#continue").await;
    page.wait().for_element(Locator::Css("#targets")).await.unwrap();
    assert_eq!(browser.text("#user").await, "alice");
    let rows: Vec<String> = {
        let mut v = Vec::new();
        for r in page.find_all(Locator::Css("#targets tbody tr")).await.unwrap() {
            v.push(r.attr("data-target").await.unwrap().unwrap_or_default());
        }
        v
    };
    assert_eq!(rows, [format!("vcluster/{a}/dev")], "alice sees team-a's vcluster and nothing of team-b's");
    let row = browser.text("#targets tbody tr").await;
    assert!(row.contains("awake") && row.contains("USD/h"), "state and savings: {row}");
    let violations = browser.accessibility_violations(&axe).await;
    assert!(violations.is_empty(), "axe on the list: {violations:?}");
    browser.screenshot("page-list.png").await;

    // The link works once: its confirmation again, then the same ticket.
    let (code, answer) = tokio::task::block_in_place(|| {
        let ticket = link.split("ticket=").nth(1).unwrap().to_string();
        let (_, confirm) =
            w.raw(None, &request("GET", &format!("/dormant/ui/link?ticket={ticket}"), &[], ""));
        let pre = confirm
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
            .and_then(|c| c.split(';').next())
            .unwrap()
            .to_string();
        let csrf = confirm.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
        let form = format!("ticket={ticket}&csrf={csrf}");
        w.raw(
            None,
            &request(
                "POST",
                "/dormant/ui/link",
                &[("Cookie", &pre), ("Content-Type", "application/x-www-form-urlencoded")],
                &form,
            ),
        )
    });
    assert_eq!(code, 401, "{answer}");
    assert!(answer.contains("used already"), "{answer}");

    // The detail page, and the sleep button.
    browser.click(&format!("#targets a[href='/dormant/ui/targets/vcluster/{a}/dev']")).await;
    page.wait().for_element(Locator::Css("#live")).await.unwrap();
    assert!(browser.text("#settings").await.contains("agent setting --default-sleep-after"));
    let violations = browser.accessibility_violations(&axe).await;
    assert!(violations.is_empty(), "axe on the detail page: {violations:?}");
    browser.screenshot("page-detail.png").await;
    browser.click("#sleep").await;
    let started = Instant::now();
    loop {
        let (spec, _) = tokio::task::block_in_place(|| replicas(c, &a));
        if spec == "0" && !vc.is_serving() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the vcluster did not go to sleep\n{}",
            w.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let started = Instant::now();
    while browser.text("#state").await != "asleep" {
        assert!(started.elapsed() < Duration::from_secs(30), "the page never said asleep");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Wake: the page follows it until it is ready.
    browser.click("#wake").await;
    let mut seen: Vec<String> = Vec::new();
    let started = Instant::now();
    loop {
        let status = browser.text("#status").await;
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "awake and ready" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the wake never got ready: {seen:?}\n{}",
            w.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen.len() >= 2, "the page showed no progress before ready: {seen:?}");
    assert_eq!(tokio::task::block_in_place(|| replicas(c, &a)), ("1".to_string(), "1".to_string()));
    assert!(vc.is_serving(), "the vcluster's API server is back");
    let notes = event_notes(c, &a, "WakeRequested");
    assert!(notes.contains("alice (groups team-a) asked to wake it through dormant's web page"), "{notes}");

    // A form sent with her session but without its CSRF token.
    let session = page
        .get_all_cookies()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.name() == "__Secure-dormant-session")
        .map(|k| k.value().to_string())
        .expect("the session cookie");
    let cookie = format!("__Secure-dormant-session={session}");
    let (code, answer) = tokio::task::block_in_place(|| {
        w.raw(
            None,
            &request(
                "POST",
                &format!("/dormant/ui/targets/vcluster/{a}/dev/sleep"),
                &[("Cookie", &cookie), ("Content-Type", "application/x-www-form-urlencoded")],
                "",
            ),
        )
    });
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("CSRF"), "{answer}");
    // Nor does the JSON API take the session without the token.
    let (code, _) = tokio::task::block_in_place(|| {
        w.raw(
            None,
            &request(
                "POST",
                &format!("/dormant/v1/targets/vcluster/{a}/dev/sleep"),
                &[("Cookie", &cookie), ("Content-Type", "application/json")],
                "{}",
            ),
        )
    });
    assert_eq!(code, 403);
    assert_eq!(tokio::task::block_in_place(|| replicas(c, &a)).0, "1", "nothing slept");

    // bob signs in with a token: he sees team-b's target only, and
    // team-a's page refuses him.
    browser.click("header form button").await;
    page.wait().for_element(Locator::Css("#token")).await.unwrap();
    page.find(Locator::Css("#token")).await.unwrap().send_keys(&bob_token).await.unwrap();
    browser.click("form.signin button").await;
    page.wait().for_element(Locator::Css("#targets")).await.unwrap();
    assert_eq!(browser.text("#user").await, bob);
    let list = browser.text("#targets").await;
    assert!(list.contains(&b) && !list.contains(&a), "{list}");
    page.goto(&format!("{}/dormant/ui/targets/vcluster/{a}/dev", w.url)).await.unwrap();
    let problem = browser.text("#problem").await;
    assert!(problem.contains(&format!("{bob} may not get")), "{problem}");
    assert!(page.find(Locator::Css("#sleep")).await.is_err(), "no buttons for bob");
    // By hand, with his token.
    let bearer = format!("Bearer {bob_token}");
    let (code, answer) = tokio::task::block_in_place(|| {
        w.raw(
            None,
            &request(
                "POST",
                &format!("/dormant/v1/targets/vcluster/{a}/dev/sleep"),
                &[("Authorization", &bearer), ("Content-Type", "application/json")],
                "{}",
            ),
        )
    });
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains(&format!("{bob} may not sleep")), "{answer}");
    assert_eq!(tokio::task::block_in_place(|| replicas(c, &a)).0, "1", "bob slept nothing");

    browser.stop().await;
    drop(vc);
}
