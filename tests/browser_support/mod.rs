//! What the tests that drive a real browser share: Debian's headless
//! Chromium over WebDriver (chromedriver), and axe-core for accessibility.
//! Needs `chromium`, `chromium-driver` and npm; `hack/test.sh` installs
//! them. A browser started on a thread inside a network namespace lives in
//! it (chromedriver and Chromium inherit the thread's namespace).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use testbed::Cluster;

const AXE_VERSION: &str = "4.14.1";

/// axe-core's script, installed with npm into a cache folder outside the
/// repository (as the testbed is) when it is not there yet.
pub fn axe_script() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = PathBuf::from(home).join(format!(".cache/dormant/axe-core-{AXE_VERSION}"));
    let file = dir.join("node_modules/axe-core/axe.min.js");
    if !file.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("axe-core@{AXE_VERSION}"))
            .output()
            .unwrap_or_else(|e| panic!("npm is needed to install axe-core: {e}"));
        assert!(out.status.success(), "npm install axe-core: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::read_to_string(&file).unwrap()
}

/// chromedriver on a free port, and a headless Chromium session with a
/// profile of its own.
pub struct Browser {
    driver: std::process::Child,
    pub client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing; install Debian's browser and driver with:\n\n    apt-get update && apt-get install -y chromium chromium-driver\n\n(hack/test.sh does)"
            );
        }
        let port = testbed::process::free_port().unwrap();
        // A process group of its own: the browser it starts goes with it
        // (see Drop), even when a test fails half-way.
        let driver = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({
            "browserName": "chrome",
            // The agent's certificate is signed by the testbed's own CA.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = caps.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let started = Instant::now();
        let client = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot start a Chromium session through chromedriver: {e}"),
            }
        };
        Browser { driver, client, _profile: profile }
    }

    /// The text of the element `css` picks. Found again when the page
    /// changed between finding and reading it (a page that refreshes
    /// itself while a wake goes on).
    pub async fn text(&self, css: &str) -> String {
        let mut tries = 0;
        loop {
            let read = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await,
                Err(e) => Err(e),
            };
            match read {
                Ok(t) => return t,
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("{css}: {e}; reading it again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{css}: {e}"),
            }
        }
    }

    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// axe-core's serious and critical violations on the current page.
    pub async fn accessibility_violations(&self, axe: &str) -> Vec<String> {
        self.try_accessibility_violations(axe).await.unwrap_or_else(|e| panic!("axe-core: {e}"))
    }

    /// The same, for a page that may replace itself while axe-core runs:
    /// an error when the document changed under it (its result would mix two
    /// pages), so the caller asks again.
    pub async fn try_accessibility_violations(&self, axe: &str) -> Result<Vec<String>, String> {
        self.client.execute(axe, vec![]).await.map_err(|e| e.to_string())?;
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];\
                 window.dormantAxeRun = 1;\
                 axe.run(document).then(r => done({same: window.dormantAxeRun === 1, \
                   violations: r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length}))}));",
                vec![],
            )
            .await
            .map_err(|e| e.to_string())?;
        if result["same"] != serde_json::Value::Bool(true) {
            return Err("the page was replaced while axe-core ran".into());
        }
        Ok(result["violations"]
            .as_array()
            .ok_or("axe-core returned no violations list")?
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .map(|v| v.to_string())
            .collect())
    }

    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let c = Cluster::shared();
        std::fs::write(c.dir.join(name), &png).unwrap();
        if std::env::var_os("DORMANT_UPDATE_SCREENSHOTS").is_some() {
            std::fs::write(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs").join(name), &png).unwrap();
        }
    }

    /// Cleanup: nothing is asserted on how the session ends.
    pub async fn stop(self) {
        self.client.clone().close().await.ok();
    }
}

impl Drop for Browser {
    /// chromedriver and every browser process it started.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            // SAFETY: kill(2) with a process group id and a signal number.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        self.driver.wait().ok();
    }
}
