//! Wake on application traffic, on the real testbed.
//!
//! Each test runs its agent, its app and its clients in a network namespace
//! of its own (the testbed has no kube-proxy and kwok's pod IPs lead
//! nowhere): inside, kwok's whole pod range `10.244.0.0/16` is local, so an
//! HTTP server on `0.0.0.0:8080` there answers for every pod of the app,
//! and the agent's advertised address `10.250.0.1` is local too. The API
//! server is reached through a forwarder on the namespace's loopback.
//!
//! Nothing routes a Service's traffic here, so the test does what
//! kube-proxy or an ingress controller does: it reads the Service's
//! EndpointSlices (all of them, by `kubernetes.io/service-name`) and sends
//! the request to a ready endpoint. While the namespace sleeps the only
//! one is dormant's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser_support;
mod support;

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::*;
use testbed::Cluster;
use testbed::netns::NetNs;
use testbed::process::{free_port, http_ok};

/// What dormant's slices list: an address of the test's namespace.
const AGENT_ADDRESS: &str = "10.250.0.1";
const APP_PORT: u16 = 8080;
const HOST: &str = "web.example.test";

/// Runs `f` on a thread inside the network namespace at `path`: every
/// socket it makes lives there.
fn in_ns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .unwrap()
}

fn enter(path: &Path) {
    testbed::netns::enter(path).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

/// The test's network namespace, its forwarders, and its app.
struct Net {
    ns: NetNs,
    rt: tokio::runtime::Runtime,
}

impl Net {
    fn new(c: &Cluster, name: &str) -> Net {
        let ns = NetNs::new(name).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let net = Net { ns, rt };
        net.ip(&["route", "add", "local", "10.244.0.0/16", "dev", "lo"]);
        net.ip(&["addr", "add", &format!("{AGENT_ADDRESS}/32"), "dev", "lo"]);
        // The API server, on the same port inside as outside.
        let port: u16 = c.server.rsplit(':').next().unwrap().parse().unwrap();
        let inside = net.ns.listen(port).unwrap();
        net.rt.spawn(testbed::netns::forward(inside, move || TcpStream::connect(("127.0.0.1", port))));
        // The app: one server for every pod IP.
        let path = net.ns.path.clone();
        std::thread::spawn(move || {
            enter(&path);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(app_server());
        });
        net
    }

    fn path(&self) -> &Path {
        &self.ns.path
    }

    fn ip(&self, args: &[&str]) {
        self.ns.ip(args).unwrap();
    }

    /// `curl` inside, with `args`.
    fn curl(&self, args: &[String]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .arg("curl")
            .args(["-sS", "--max-time", "60"])
            .args(args)
            .output()
            .unwrap()
    }

    /// A `dormant agent` inside, serving app traffic on `AGENT_ADDRESS`.
    fn agent(&self, c: &Cluster, scope: &str, identity: &str, extra: &[&str]) -> Agent {
        install_crd(c);
        let lease_ns = format!("{scope}-lease");
        ensure_namespace(c, &lease_ns);
        let admin_port = free_port().unwrap();
        let host_port = free_port().unwrap();
        let host = TcpListener::bind(("127.0.0.1", host_port)).unwrap();
        self.rt.spawn(testbed::netns::forward(host, self.ns.connector(admin_port)));
        let mut args: Vec<String> = vec![
            format!("--net={}", self.path().display()),
            "--".into(),
            dormant_bin().display().to_string(),
            "agent".into(),
            format!("--namespace={lease_ns}"),
            format!("--identity={identity}"),
            format!("--admin-addr=127.0.0.1:{admin_port}"),
            format!("--namespace-selector=dormant-test={scope}"),
            "--lease-duration=3s".into(),
            "--flush-interval=1s".into(),
            "--app-traffic-addr=0.0.0.0".into(),
            format!("--app-traffic-advertise={AGENT_ADDRESS}"),
            "--app-traffic-ports=20000-20099".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = vec![
            ("KUBECONFIG".to_string(), agent_user(c).kubeconfig.display().to_string()),
            ("RUST_LOG".to_string(), "info,dormant=debug,kube_lease_manager=warn".to_string()),
        ];
        let proc = testbed::spawner::spawn_with_env(
            &format!("dormant-{identity}"),
            Path::new("/usr/bin/nsenter"),
            &args,
            &env,
            &c.dir,
        )
        .unwrap();
        let mut agent = Agent { proc, admin_port: host_port, identity: identity.into() };
        agent.proc.wait_ready(Duration::from_secs(60), || http_ok(host_port, "/readyz")).unwrap();
        agent
    }
}

/// The whole log of an agent.
fn full_log(a: &Agent) -> String {
    std::fs::read_to_string(&a.proc.log).unwrap_or_default()
}

type AppBody = BoxBody<Bytes, Infallible>;

fn text(s: String) -> AppBody {
    Full::new(Bytes::from(s)).boxed()
}

/// The app: says where it was reached and what the forwarder told it;
/// `/sse` sends three events 200 ms apart; a WebSocket upgrade echoes.
async fn app_server() {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", APP_PORT)).await.unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let local = stream.local_addr().unwrap();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| app(req, local));
            // The app's side: the clients check what they are answered.
            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
                .ok();
        });
    }
}

async fn app(mut req: Request<Incoming>, local: SocketAddr) -> Result<Response<AppBody>, Infallible> {
    let h = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if h("upgrade").eq_ignore_ascii_case("websocket") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(text(String::new()))
            .unwrap());
    }
    if req.uri().path() == "/sse" {
        let events = futures::stream::unfold(1u32, |i| async move {
            if i > 3 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {i}\n\n")))), i + 1))
        });
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(events).boxed())
            .unwrap());
    }
    let body = format!(
        "app says hi from {}; xff={}; forwarded={}; host={}; path={}\n",
        local.ip(),
        h("x-forwarded-for"),
        h("forwarded"),
        h("host"),
        req.uri().path()
    );
    Ok(Response::builder().header("content-type", "text/plain").body(text(body)).unwrap())
}

fn apply(c: &Cluster, yaml: &str) {
    c.kubectl_apply(&c.admin, yaml).unwrap();
}

/// A Deployment `web` of `replicas` pods (`node` picks a node none has:
/// its pods never run), its Service and an Ingress to it.
fn app_yaml(ns: &str, replicas: u32, waiting_page: bool, never_ready: bool) -> String {
    let page = if waiting_page { "\n  annotations: {dormant.dev/waiting-page: \"true\"}" } else { "" };
    let node = if never_ready { ", nodeSelector: {nowhere: \"true\"}" } else { "" };
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: nginx:1.27, ports: [{{containerPort: {APP_PORT}}}]}}]{node}}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {ns}{page}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-direct, namespace: {ns}}}
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: {ns}}}
spec:
  rules:
  - host: {HOST}
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
      - {{path: /direct, pathType: Prefix, backend: {{service: {{name: web-direct, port: {{number: 80}}}}}}}}
"#
    )
}

/// The ready endpoints of Service `svc`'s port `http`, across all its
/// EndpointSlices, as kube-proxy would pick from: `(address:port,
/// managed-by)`.
fn endpoints(c: &Cluster, ns: &str, svc: &str) -> Vec<(String, String)> {
    let out = kubectl(
        c,
        &[
            "get",
            "endpointslices",
            "-n",
            ns,
            "-l",
            &format!("kubernetes.io/service-name={svc}"),
            "-o",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut eps = Vec::new();
    for s in v["items"].as_array().unwrap() {
        let by = s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let Some(port) = s["ports"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "http")) else {
            continue;
        };
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == Value::Bool(false) {
                continue;
            }
            for a in e["addresses"].as_array().into_iter().flatten() {
                eps.push((format!("{}:{}", a.as_str().unwrap(), port["port"]), by.clone()));
            }
        }
    }
    eps.sort();
    eps
}

/// The one endpoint of sleeping Service `web`: dormant's.
fn held_endpoint(c: &Cluster, ns: &str, agent: &Agent) -> String {
    held_endpoint_of(c, ns, "web", AGENT_ADDRESS, &|| agent.log())
}

/// The one endpoint of sleeping Service `svc`: dormant's, at `address`;
/// `log` says why not.
fn held_endpoint_of(c: &Cluster, ns: &str, svc: &str, address: &str, log: &dyn Fn() -> String) -> String {
    let mut last = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        last = endpoints(c, ns, svc);
        if let [(ep, by)] = last.as_slice()
            && by == "dormant.dev"
        {
            assert!(ep.starts_with(&format!("{address}:")), "{ep}");
            return ep.clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("Service {svc}'s endpoints are {last:?}, not dormant's alone; agent log:\n{}", log());
}

/// The Service as a GitOps tool compares it: everything but status.
fn service(c: &Cluster, ns: &str) -> Value {
    let mut v: Value =
        serde_json::from_str(&kubectl(c, &["get", "service", "web", "-n", ns, "-o", "json"])).unwrap();
    v.as_object_mut().unwrap().remove("status");
    v
}

/// A namespace with the app running, put to sleep by an agent of its own.
fn sleeping_app(
    c: &Cluster,
    net: &Net,
    prefix: &str,
    waiting_page: bool,
    never_ready: bool,
    extra: &[&str],
) -> (String, String, Agent) {
    let id = test_id(prefix);
    let ns = c.namespace(prefix, &[("dormant-test", &id)]).unwrap();
    apply(c, &app_yaml(&ns, 2, waiting_page, never_ready));
    if !never_ready {
        wait_until("2 web pods ready in the Service", Duration::from_secs(60), || {
            endpoints(c, &ns, "web").len() == 2
        });
    }
    // Put to sleep by hand: a request ends such a sleep (no
    // prevent-wakeup-until), and the long idle time keeps it awake after.
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h", "dormant.dev/force-sleep=true"]);
    let agent = net.agent(c, &id, &format!("{prefix}-agent"), extra);
    wait_until_state(c, &ns, "asleep", &agent);
    (id, ns, agent)
}

fn wait_until_state(c: &Cluster, ns: &str, want: &str, agent: &Agent) {
    let start = Instant::now();
    loop {
        let s = state(c, "namespace", ns, None);
        if s == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "namespace {ns} is {s:?}, not {want}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A WebSocket handshake and one echoed message, raw.
fn websocket(ep: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(ep).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).map_err(|e| e.to_string())? == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&head)));
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(head);
    }
    s.write_all(b"hello over the socket").map_err(|e| e.to_string())?;
    let mut echo = [0u8; 21];
    s.read_exact(&mut echo).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&echo).to_string())
}

#[test]
fn a_sleeping_namespace_is_woken_by_200_requests_to_its_app_once_and_its_service_is_left_as_it_was() {
    let c = Cluster::shared();
    let net = Net::new(c, "wake");
    let (_, ns, agent) = {
        // The Service as it is before any sleep.
        sleeping_app(c, &net, "appwake", false, false, &[])
    };
    let before = service(c, &ns);
    let ep = held_endpoint(c, &ns, &agent);
    assert!(event_notes(c, &ns, "AppTrafficHeld").contains("Service web "), "{}", agent.log());
    // A routed Service that cannot be held is named, with the reason.
    let not_held = event_notes(c, &ns, "AppTrafficNotHeld");
    assert!(not_held.contains("Service web-direct") && not_held.contains("headless"), "{not_held}");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "0");
    assert_eq!(full_log(&agent).matches("wake requested by app traffic").count(), 0);

    // 197 plain requests in one curl, one over HTTP/2, one event stream
    // and one WebSocket: 200 first requests at once.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{ep}/");
    let mut args: Vec<String> =
        vec!["-Z".into(), "--parallel-immediate".into(), "--parallel-max".into(), "200".into()];
    args.extend(["-H".into(), format!("Host: {HOST}"), "-w".into(), "%{http_code}\\n".into()]);
    for i in 0..197 {
        args.extend([url.clone(), "-o".into(), dir.path().join(format!("{i}")).display().to_string()]);
    }
    let started = Instant::now();
    let plain = std::thread::spawn({
        let p = net.path().to_owned();
        move || {
            Command::new("nsenter")
                .arg(format!("--net={}", p.display()))
                .arg("curl")
                .args(["-sS", "--max-time", "60"])
                .args(&args)
                .output()
                .unwrap()
        }
    });
    let h2 = std::thread::spawn({
        let p = net.path().to_owned();
        let url = url.clone();
        move || {
            Command::new("nsenter")
                .arg(format!("--net={}", p.display()))
                .args([
                    "curl",
                    "-sS",
                    "--max-time",
                    "60",
                    "--http2-prior-knowledge",
                    "-H",
                    &format!("Host: {HOST}"),
                ])
                .args(["-w", "\nversion=%{http_version} code=%{http_code}", &url])
                .output()
                .unwrap()
        }
    });
    let sse = std::thread::spawn({
        let p = net.path().to_owned();
        let url = format!("http://{ep}/sse");
        move || {
            Command::new("nsenter")
                .arg(format!("--net={}", p.display()))
                .args([
                    "curl",
                    "-sS",
                    "-N",
                    "--max-time",
                    "60",
                    "-H",
                    "Accept: text/event-stream",
                    "-w",
                    "\ntype=%{content_type}",
                    &url,
                ])
                .output()
                .unwrap()
        }
    });
    let ws = std::thread::spawn({
        let p = net.path().to_owned();
        let ep = ep.clone();
        move || in_ns(&p, move || websocket(&ep))
    });
    let plain = plain.join().unwrap();
    let took = started.elapsed();
    let codes = String::from_utf8_lossy(&plain.stdout).to_string();
    let mut summary = std::collections::BTreeMap::<String, usize>::new();
    for l in codes.lines().chain(String::from_utf8_lossy(&plain.stderr).lines()) {
        *summary.entry(l.to_string()).or_default() += 1;
    }
    assert_eq!(
        codes.lines().filter(|l| *l == "200").count(),
        197,
        "{summary:?}\nagent log:\n{}",
        agent.log()
    );
    for i in 0..197 {
        let body = std::fs::read_to_string(dir.path().join(format!("{i}"))).unwrap();
        assert!(body.starts_with("app says hi from 10.244."), "request {i}: {body}");
        // The client's address as the app sees it, and the Host it asked.
        assert!(body.contains(&format!("xff={AGENT_ADDRESS};")), "{body}");
        assert!(body.contains(&format!("forwarded=for={AGENT_ADDRESS}")), "{body}");
        assert!(body.contains(&format!("host={HOST};")), "{body}");
    }
    let h2 = out(&h2.join().unwrap());
    assert!(h2.contains("app says hi from 10.244.") && h2.contains("version=2 code=200"), "{h2}");
    let sse = out(&sse.join().unwrap());
    assert!(
        sse.contains("data: 1\n\ndata: 2\n\ndata: 3\n\n") && sse.contains("type=text/event-stream"),
        "{sse}"
    );
    assert_eq!(ws.join().unwrap(), Ok("hello over the socket".to_string()));
    eprintln!("200 first requests answered by the app {took:?} after they were sent");

    // One wake, however many asked.
    let log = full_log(&agent);
    assert_eq!(log.matches("wake requested by app traffic").count(), 1, "{log}");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "2");
    wait_until_state(c, &ns, "awake", &agent);
    assert!(annotation(c, "namespace", &ns, None, "dormant.dev/last-activity-by").contains("(visitor)"));

    // Awake, the app's traffic no longer passes through dormant, and the
    // Service is exactly as it was (the same resourceVersion: untouched).
    wait_until("dormant's slice to go", Duration::from_secs(30), || {
        endpoints(c, &ns, "web").iter().all(|(_, by)| by != "dormant.dev")
    });
    // The EndpointSlice controller lists both pods once it has caught up
    // with their readiness (it may trail the Deployment's count).
    wait_until("the app's own slice to list both pods", Duration::from_secs(30), || {
        endpoints(c, &ns, "web").len() == 2
    });
    assert_eq!(service(c, &ns), before);
}

#[test]
fn a_browser_gets_the_waiting_page_until_the_app_answers_and_health_checkers_never_wake_it() {
    let c = Cluster::shared();
    let net = Net::new(c, "page");
    let (_, ns, agent) = sleeping_app(c, &net, "apppage", true, false, &[]);
    let ep = held_endpoint(c, &ns, &agent);
    let url = format!("http://{ep}/");

    // A health checker is answered, and wakes nothing.
    let probe = net.curl(&[
        "-A".into(),
        "kube-probe/1.37".into(),
        "-w".into(),
        "\ncode=%{http_code}".into(),
        url.clone(),
    ]);
    let probe = out(&probe);
    assert!(probe.contains("code=503") && probe.contains("does not wake it"), "{probe}");
    // A request head over the listener's 64 KiB is refused at once.
    let huge = format!("X-Junk: {}", "a".repeat(100 * 1024));
    let refused =
        out(&net.curl(&["-H".into(), huge, "-w".into(), "\ncode=%{http_code}".into(), url.clone()]));
    assert!(refused.contains("code=431"), "{}", &refused[refused.len().saturating_sub(300)..]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(c, "namespace", &ns, None), "asleep");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "0");

    // A browser: the page, asked for again (as its script does), until the
    // app answers.
    let browser = |url: &str| {
        out(&net.curl(&[
            "-A".into(),
            "Mozilla/5.0 (X11; Linux x86_64)".into(),
            "-H".into(),
            "Accept: text/html,application/xhtml+xml".into(),
            "-D".into(),
            "-".into(),
            url.to_string(),
        ]))
    };
    let first = browser(&url);
    assert!(first.starts_with("HTTP/1.1 503"), "{first}");
    // It follows the wake by script (allowed by hash), with a plain
    // refresh only for browsers without script.
    assert!(
        first.to_ascii_lowercase().contains(
            "content-security-policy: default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-"
        ),
        "{first}"
    );
    assert!(first.contains(r#"<noscript><meta http-equiv="refresh" content="2"></noscript>"#), "{first}");
    assert!(first.contains("waking up") && first.contains("so far"), "{first}");
    assert!(!first.contains(&ns), "the page names the namespace: {first}");
    let start = Instant::now();
    let mut pages = 1;
    let mut between = 0;
    let answer = loop {
        // Each refresh goes where kube-proxy would send it now: dormant
        // until the slice is given back, then the app's own pods.
        let now = endpoints(c, &ns, "web");
        let page = browser(&format!("http://{}/", now[0].0));
        if page.contains("app says hi") {
            break page;
        }
        if page.contains("waking up") {
            pages += 1;
        } else {
            // The listener closed as the slice went, between a pick and
            // its connection (kube-proxy's own reprogramming has the
            // same window): tolerated a few times, never as an answer.
            between += 1;
            assert!(between <= 3, "{page}\n{now:?}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{page}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    eprintln!("{pages} waiting pages, then the app after {:?}", start.elapsed());
    wait_until_state(c, &ns, "awake", &agent);
}

/// The waiting page as people meet it: headless Chromium, inside the
/// test's network namespace, opens the sleeping app's URL once and is
/// never told where to go after. It is shown the waiting page, which
/// follows the wake in place (its script), then the app, on the same URL
/// (dormant's port forwards to the pods once they answer). The page has
/// no serious or critical accessibility violation (it used to reload
/// itself, which axe-core's `meta-refresh` rule rightly flags).
#[test]
fn in_chromium_the_waiting_page_shows_the_wake_and_then_the_app() {
    let c = Cluster::shared();
    let net = Net::new(c, "chrome");
    let (_, ns, agent) = sleeping_app(c, &net, "appchrome", true, false, &[]);
    let ep = held_endpoint(c, &ns, &agent);
    let url = format!("http://{ep}/");
    let axe = browser_support::axe_script();
    let (seen, violations, last) = in_ns(net.path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let b = browser_support::Browser::start().await;
            b.client.goto(&url).await.unwrap();
            let mut violations = None;
            let mut seen: Vec<(String, String)> = Vec::new();
            let start = Instant::now();
            let last = loop {
                let WaitingPage { text, progress: bar, .. } = waiting_page_now(&b).await;
                if text.contains("app says hi") {
                    break text;
                }
                if text.contains("waking up") {
                    if seen.last().map(|(t, _)| t) != Some(&text) {
                        seen.push((text.clone(), bar));
                    }
                    if violations.is_none() {
                        // The page may load the app under axe-core; then it is
                        // asked again on the next waiting page seen.
                        if let Ok(v) = b.try_accessibility_violations(&axe).await {
                            violations = Some(v);
                            b.screenshot("app-waiting-page.png").await;
                        }
                    }
                }
                assert!(
                    start.elapsed() < Duration::from_secs(90),
                    "still not the app: {text:?} after {seen:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            b.stop().await;
            (seen, violations, last)
        })
    });
    eprintln!("Chromium saw {} waiting pages: {seen:?}", seen.len());
    let (first, bar) = seen.first().unwrap_or_else(|| panic!("no waiting page before the app: {last}"));
    assert!(first.contains("This app is waking up") && first.contains("so far"), "{first}");
    assert!(bar.parse::<u32>().is_ok_and(|p| (5..=100).contains(&p)), "progress {bar:?}");
    assert!(!seen.iter().any(|(t, _)| t.contains(&ns)), "a page names the namespace");
    assert!(last.starts_with("app says hi from 10.244."), "{last}");
    assert_eq!(violations.unwrap_or_default(), Vec::<String>::new());
    wait_until_state(c, &ns, "awake", &agent);
}

/// One script reads what the waiting-page tests look at, all from the same
/// document: read one by one, the page's final reload can land between two
/// reads (a waiting page's text with the next page's missing mark).
const READ_WAITING_PAGE: &str = "var e = document.getElementById('dormant-elapsed'); \
    var p = document.getElementById('dormant-progress'); \
    return {text: document.body ? document.body.innerText : '', marked: window.dormantMark === 1, \
            elapsed: e ? e.textContent : null, progress: p ? String(p.value) : ''};";

/// What [`READ_WAITING_PAGE`] read; all empty between two pages.
#[derive(Default)]
struct WaitingPage {
    text: String,
    marked: bool,
    elapsed: Option<String>,
    progress: String,
}

async fn waiting_page_now(b: &browser_support::Browser) -> WaitingPage {
    let got = b.client.execute(READ_WAITING_PAGE, vec![]).await.unwrap_or_default();
    let field = |k: &str| got[k].as_str().map(str::to_string);
    WaitingPage {
        text: field("text").unwrap_or_default(),
        marked: got["marked"] == serde_json::Value::Bool(true),
        elapsed: field("elapsed"),
        progress: field("progress").unwrap_or_default(),
    }
}

/// A wake that takes its time, in Chromium: the waiting page stays the
/// same document while its progress moves on (a mark set in it survives,
/// which a reload would wipe), and when the wake times out the page that
/// says so replaces it, with no one reloading anything.
#[test]
fn in_chromium_the_waiting_page_updates_in_place_and_ends_on_the_timeout_page() {
    let c = Cluster::shared();
    let net = Net::new(c, "chromeslow");
    let (_, ns, agent) = sleeping_app(c, &net, "appslow", true, true, &["--default-wake-timeout=8s"]);
    let ep = held_endpoint(c, &ns, &agent);
    let url = format!("http://{ep}/");
    let (elapsed_seen, marked_while_waiting, last) = in_ns(net.path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let b = browser_support::Browser::start().await;
            b.client.goto(&url).await.unwrap();
            b.client.execute("window.dormantMark = 1;", vec![]).await.unwrap();
            let mut elapsed_seen: Vec<String> = Vec::new();
            let mut marked_while_waiting = true;
            let start = Instant::now();
            let last = loop {
                let WaitingPage { text, marked, elapsed, .. } = waiting_page_now(&b).await;
                if text.contains("did not wake up") {
                    break text;
                }
                if text.contains("waking up") {
                    marked_while_waiting &= marked;
                    if let Some(t) = elapsed
                        && elapsed_seen.last() != Some(&t)
                    {
                        elapsed_seen.push(t);
                    }
                }
                assert!(start.elapsed() < Duration::from_secs(60), "{text:?} after {elapsed_seen:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            b.stop().await;
            (elapsed_seen, marked_while_waiting, last)
        })
    });
    eprintln!("the waiting page counted {elapsed_seen:?}, then: {last:?}");
    assert!(elapsed_seen.len() >= 3, "the page did not follow the wake: {elapsed_seen:?}");
    assert!(marked_while_waiting, "the waiting page was reloaded while it waited");
    assert!(last.contains("This app did not wake up in time") && last.contains("within 8s"), "{last}");
}

#[test]
fn a_wake_that_never_gets_ready_answers_504_with_a_clear_page() {
    let c = Cluster::shared();
    let net = Net::new(c, "timeout");
    let (_, ns, agent) = sleeping_app(c, &net, "apptimeout", false, true, &["--default-wake-timeout=3s"]);
    let ep = held_endpoint(c, &ns, &agent);
    let started = Instant::now();
    let got = out(&net.curl(&["-w".into(), "\ncode=%{http_code}".into(), format!("http://{ep}/")]));
    let took = started.elapsed();
    assert!(got.contains("code=504") && got.contains("did not wake up within 3s"), "{got}\n{}", agent.log());
    assert!(took >= Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_sigkill_while_held_and_while_waking_leaves_the_service_as_it_was_after_the_next_wake() {
    let c = Cluster::shared();
    let net = Net::new(c, "kill");
    let (id, ns, mut agent) = sleeping_app(c, &net, "appkill", false, false, &[]);
    let before = service(c, &ns);
    let ep = held_endpoint(c, &ns, &agent);

    // Killed while asleep: the slice stays (the record), and the next agent
    // serves it.
    agent.kill();
    let mut agent = net.agent(c, &id, "appkill-agent-2", &[]);
    assert_eq!(held_endpoint(c, &ns, &agent), ep);

    // Killed while the wake goes on: the held request is lost with the
    // process, the next agent finishes the wake and gives the Service back.
    let waiting = std::thread::spawn({
        let p = net.path().to_owned();
        let url = format!("http://{ep}/");
        move || {
            Command::new("nsenter")
                .arg(format!("--net={}", p.display()))
                // The new agent opens its listeners as it reads dormant's
                // slices, a moment after it is ready: a client retries a
                // refused connection, as browsers and ingresses do.
                .args(["curl", "-sS", "--max-time", "60", "--retry", "30", "--retry-delay", "1"])
                .args(["--retry-connrefused", &url])
                .output()
                .unwrap()
        }
    });
    wait_until("the wake to begin", Duration::from_secs(30), || {
        full_log(&agent).contains("wake requested by app traffic")
    });
    agent.kill();
    // The request in flight dies with the agent, or is answered just
    // before: either way, what follows is what the test is about.
    waiting.join().ok();
    let agent = net.agent(c, &id, "appkill-agent-3", &[]);
    wait_until_state(c, &ns, "awake", &agent);
    wait_until("dormant's slice to go", Duration::from_secs(30), || {
        endpoints(c, &ns, "web").iter().all(|(_, by)| by != "dormant.dev")
    });
    assert_eq!(service(c, &ns), before);
    let got = out(&net.curl(&[
        "-H".into(),
        format!("Host: {HOST}"),
        format!("http://{}/", endpoints(c, &ns, "web")[0].0),
    ]));
    assert!(got.starts_with("app says hi from 10.244."), "{got}");
}

/// The app inside the vcluster: a Deployment `web`, its Service and an
/// Ingress to it, as a tenant writes them in the vcluster.
fn vcluster_app_yaml() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: nginx:1.27, ports: [{{containerPort: {APP_PORT}}}]}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: default}}
spec:
  rules:
  - host: {HOST}
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
"#
    )
}

/// The host objects of `kind` the vcluster `dev` synced from its
/// `default/web`.
fn synced_web(c: &Cluster, ns: &str, kind: &str) -> Vec<String> {
    kubectl_quiet(c, &["get", kind, "-n", ns, "-l", "vcluster.loft.sh/managed-by=dev", "-o", "name"])
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|n| n.starts_with("web-x-default"))
        .map(str::to_string)
        .collect()
}

/// A real vcluster's workload, exposed on the host by the Service and
/// Ingress its syncer made there: asleep, the synced Service is held; the
/// first requests to the app's URL wake the vcluster once, its syncer
/// brings the pod back, and every request gets the app's answer.
#[test]
fn a_sleeping_vcluster_is_woken_by_requests_to_its_synced_service_and_they_get_the_apps_answer() {
    use testbed::real_vcluster::{RealVCluster, RealVClusterOptions};
    let c = Cluster::shared();
    let net = Net::new(c, "vcapp");
    let id = test_id("appvc");
    let ns = c.namespace("appvc", &[("dormant-test", &id)]).unwrap();
    let vc = RealVCluster::create(
        c,
        &ns,
        "dev",
        RealVClusterOptions {
            annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())],
            // Ingresses are synced to the host only when asked.
            values: Some("sync:\n  toHost:\n    ingresses:\n      enabled: true\n".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let agent = net.agent(c, &id, "appvc-agent", &["--default-wake-timeout=5m"]);
    vc.wait_serving(c, Duration::from_secs(240)).unwrap();
    let applied = std::process::Command::new(c.bins.path("kubectl"))
        .arg(format!("--kubeconfig={}", vc.kubeconfig.display()))
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(vcluster_app_yaml().as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(applied.status.success(), "{}", out(&applied));

    // On the host: the synced Service with the synced pod behind it, and
    // the synced Ingress naming it.
    wait_until("the synced Service and Ingress", Duration::from_secs(120), || {
        synced_web(c, &ns, "services").len() == 1 && synced_web(c, &ns, "ingresses").len() == 1
    });
    let svc = synced_web(c, &ns, "services").remove(0);
    let ingress = synced_web(c, &ns, "ingresses").remove(0);
    assert_eq!(
        jsonpath(c, "ingress", &ingress, Some(&ns), "{.spec.rules[0].http.paths[0].backend.service.name}"),
        svc
    );
    wait_until("the synced pod ready behind the synced Service", Duration::from_secs(120), || {
        endpoints(c, &ns, &svc).len() == 1
    });
    let spec_before = jsonpath(c, "service", &svc, Some(&ns), "{.spec}");

    // Put to sleep by hand; a request ends such a sleep.
    kubectl(c, &["annotate", "statefulset", "dev", "-n", &ns, "dormant.dev/force-sleep=true"]);
    wait_until("the vcluster to sleep", Duration::from_secs(90), || {
        state(c, "statefulset", "dev", Some(&ns)) == "asleep"
    });
    wait_until("the vcluster process to stop", Duration::from_secs(30), || !vc.is_running());
    let ep = held_endpoint_of(c, &ns, &svc, AGENT_ADDRESS, &|| agent.log());
    assert!(event_notes(c, &ns, "AppTrafficHeld").contains(&format!("Service {svc} ")), "{}", agent.log());
    assert_eq!(jsonpath(c, "statefulset", "dev", Some(&ns), "{.spec.replicas}"), "0");
    let (starts, woke_before) = (vc.starts(), event_count(c, &ns, "Woke"));

    // Twenty first requests at once, as an ingress controller sends them.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{ep}/");
    let mut args: Vec<String> =
        vec!["-Z".into(), "--parallel-immediate".into(), "--max-time".into(), "300".into()];
    args.extend(["-H".into(), format!("Host: {HOST}"), "-w".into(), "%{http_code}\\n".into()]);
    for i in 0..20 {
        args.extend([url.clone(), "-o".into(), dir.path().join(format!("{i}")).display().to_string()]);
    }
    let started = Instant::now();
    let answered = net.curl(&args);
    let took = started.elapsed();
    let codes = String::from_utf8_lossy(&answered.stdout).to_string();
    assert_eq!(
        codes.lines().filter(|l| *l == "200").count(),
        20,
        "{}\nagent log:\n{}\nvcluster log:\n{}",
        out(&answered),
        agent.log(),
        vc.log_text()
    );
    for i in 0..20 {
        let body = std::fs::read_to_string(dir.path().join(format!("{i}"))).unwrap();
        assert!(body.starts_with("app says hi from 10.244."), "request {i}: {body}");
        assert!(body.contains(&format!("host={HOST};")), "{body}");
    }
    eprintln!(
        "[{ns}] 20 first requests to the sleeping vcluster's app answered by it {took:?} after they were sent"
    );

    // One wake of the vcluster, however many asked.
    assert_eq!(full_log(&agent).matches("wake requested by app traffic").count(), 1, "{}", agent.log());
    assert_eq!(vc.starts(), starts + 1, "the vcluster started once");
    wait_until("the Woke event", Duration::from_secs(60), || event_count(c, &ns, "Woke") > woke_before);
    assert_eq!(event_count(c, &ns, "Woke"), woke_before + 1, "{}", event_notes(c, &ns, "Woke"));
    assert!(
        annotation(c, "statefulset", "dev", Some(&ns), "dormant.dev/last-activity-by").contains("(visitor)"),
        "{}",
        agent.log()
    );
    // Awake, the app's traffic goes to its pod again, not through dormant,
    // and the synced Service is as its syncer made it.
    wait_until("dormant's slice to go", Duration::from_secs(60), || {
        let eps = endpoints(c, &ns, &svc);
        eps.len() == 1 && eps.iter().all(|(_, by)| by != "dormant.dev")
    });
    assert_eq!(jsonpath(c, "service", &svc, Some(&ns), "{.spec}"), spec_before);
}

/// The Helm chart with `appTraffic.enabled` and its default two replicas,
/// its pods run by the testbed's kubelet from the rendered spec, each in
/// a network namespace of its own with an address EndpointSlices accept:
/// under the chart's ServiceAccount and RBAC the agents find their
/// addresses through the `<release>-app-traffic` Service and a sleeping
/// namespace's Service is held there; a `helm upgrade` with changed values
/// rolls both pods (each new one beside the old, as Kubernetes does it)
/// and the namespace stays asleep with its record while dormant's slice
/// follows the new pods; the first request then wakes it, gets the app's
/// answer, and every replica count comes back exactly.
#[test]
fn the_charts_pods_hold_app_traffic_under_their_own_service_account_through_a_rolling_update() {
    use testbed::kubelet::Kubelet;
    let c = Cluster::shared();
    let net = Net::new(c, "chart");
    let id = test_id("appchart");
    let ns = c.namespace("appchart", &[("dormant-test", &id)]).unwrap();
    apply(c, &app_yaml(&ns, 2, false, false));
    wait_until("2 web pods ready in the Service", Duration::from_secs(60), || {
        endpoints(c, &ns, "web").len() == 2
    });
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h", "dormant.dev/force-sleep=true"]);

    install_crd(c);
    let kubelet = Kubelet::start_in(
        c,
        &format!("{id}-node"),
        &[("ghcr.io/dormant-dev/dormant", &dormant_bin())],
        &net.ns,
    )
    .unwrap();
    let release_ns = format!("{id}-system");
    let fullname = format!("{id}-dormant");
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "{}appTraffic: {{enabled: true}}\nagent: {{namespaceSelector: \"dormant-test={id}\", flushInterval: 1s}}\napi: {{discovery: {{name: {id}-api}}}}\n",
            kubelet.helm_values()
        ),
    )
    .unwrap();
    let chart = chart();
    let pod_logs = || kubelet.pods().values().map(|p| p.tail(40)).collect::<Vec<_>>().join("\n");
    let (installed, said) = helm(
        c,
        &[
            "install",
            &id,
            chart.to_str().unwrap(),
            "-n",
            &release_ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "180s",
            "-f",
            values.to_str().unwrap(),
        ],
    );
    assert!(installed, "{said}\n{:#?}\n{}", kubelet.pods(), pod_logs());
    // The agents' pods, running and Ready by their own probes: their IPs.
    let agents = || {
        let mut ips: Vec<String> = kubelet
            .pods()
            .into_iter()
            .filter(|(k, p)| {
                k.starts_with(&format!("{release_ns}/{fullname}-"))
                    && !k.contains("-restore-")
                    && p.phase == "Running"
                    && p.ready
                    && p.probes_passed > 0
            })
            .map(|(_, p)| p.ip)
            .collect();
        ips.sort();
        ips
    };
    // The addresses the app-traffic Service lists, and those dormant's
    // slice for Service web lists (with the port, which must be one).
    let listed = || {
        let out = kubectl(
            c,
            &[
                "get",
                "endpointslices",
                "-n",
                &release_ns,
                "-l",
                &format!("kubernetes.io/service-name={fullname}-app-traffic"),
                "-o",
                "jsonpath={.items[*].endpoints[*].addresses[*]}",
            ],
        );
        let mut ips: Vec<String> = out.split_whitespace().map(str::to_string).collect();
        ips.sort();
        ips
    };
    let held = || {
        let eps = endpoints(c, &ns, "web");
        let ok = !eps.is_empty() && eps.iter().all(|(_, by)| by == "dormant.dev");
        let mut ips: Vec<String> =
            eps.iter().filter_map(|(ep, _)| ep.rsplit_once(':')).map(|(a, _)| a.into()).collect();
        ips.sort();
        (ok, ips, eps.first().map(|(ep, _)| ep.clone()).unwrap_or_default())
    };
    let before = agents();
    assert_eq!(before.len(), 2, "two agent pods: {:#?}", kubelet.pods());
    assert!(before.iter().all(|ip| ip.starts_with("10.251.")), "{before:?}");
    wait_until("the app-traffic Service to list both agents", Duration::from_secs(30), || listed() == before);

    // The chart's leader puts the namespace to sleep and holds its Service
    // on both agents' addresses.
    wait_until("the namespace to sleep", Duration::from_secs(90), || {
        state(c, "namespace", &ns, None) == "asleep"
    });
    wait_until("dormant's slice to list both agents", Duration::from_secs(60), || {
        let (ok, ips, _) = held();
        ok && ips == before
    });
    assert!(event_notes(c, &ns, "AppTrafficHeld").contains("Service web "), "{}", pod_logs());
    let asleep = |when: &str| {
        assert_eq!(state(c, "namespace", &ns, None), "asleep", "{when}");
        assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "0", "{when}");
        assert_eq!(
            annotation(c, "deployment", "web", Some(&ns), "dormant.dev/replicas-before-sleep"),
            "2",
            "{when}"
        );
    };
    asleep("before the upgrade");

    // A rolling update: changed values, both pods replaced one by one.
    let (upgraded, said) = helm(
        c,
        &[
            "upgrade",
            &id,
            chart.to_str().unwrap(),
            "-n",
            &release_ns,
            "--reuse-values",
            "--set",
            "agent.defaultSleepAfter=2h",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    assert!(upgraded, "{said}\n{}", pod_logs());
    let args =
        jsonpath(c, "deployment", &fullname, Some(&release_ns), "{.spec.template.spec.containers[0].args}");
    assert!(args.contains("--default-sleep-after=2h"), "{args}");
    wait_until("two new agent pods, the old ones gone", Duration::from_secs(120), || {
        let now = agents();
        now.len() == 2
            && now.iter().all(|ip| !before.contains(ip))
            && kubelet.pods().values().filter(|p| p.phase == "Running").count() == 2
    });
    let after = agents();
    asleep("after the upgrade");
    wait_until("dormant's slice to follow the new agents", Duration::from_secs(90), || {
        let (ok, ips, _) = held();
        ok && ips == after
    });
    asleep("once the slice followed");

    // The first request wakes it and gets the app's answer.
    let (_, _, ep) = held();
    let got = net.curl(&[
        "-H".into(),
        format!("Host: {HOST}"),
        "-w".into(),
        "\ncode=%{http_code}".into(),
        format!("http://{ep}/"),
    ]);
    let got = out(&got);
    assert!(
        got.starts_with("app says hi from 10.244.") && got.ends_with("code=200"),
        "{got}\n{}",
        pod_logs()
    );
    assert!(got.contains(&format!("host={HOST};")), "{got}");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "2");
    wait_until("the namespace to be awake", Duration::from_secs(60), || {
        state(c, "namespace", &ns, None) == "awake"
    });
    assert!(annotation(c, "namespace", &ns, None, "dormant.dev/last-activity-by").contains("(visitor)"));
    wait_until("dormant's slice to go", Duration::from_secs(30), || {
        endpoints(c, &ns, "web").iter().all(|(_, by)| by != "dormant.dev")
    });
    let (uninstalled, said) = helm(c, &["uninstall", &id, "-n", &release_ns, "--wait", "--timeout", "120s"]);
    assert!(uninstalled, "{said}\n{}", pod_logs());
}
