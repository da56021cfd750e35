//! What an audit webhook receiver (the agent's `--audit-*` listener) needs on
//! the testbed: a CA of its own, a serving certificate, a bearer token file
//! and a free loopback port, and the matching [`AuditWebhook`] for API
//! servers to report to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::AuditWebhook;
use crate::pki::Ca;
use crate::process::free_port;

pub struct AuditReceiver {
    pub port: u16,
    /// Signs the serving certificate; client certificates from it
    /// authenticate API servers too (`--audit-client-ca`).
    pub ca: Ca,
    pub token: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
}

impl AuditReceiver {
    /// Writes the receiver's files into `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<AuditReceiver> {
        let ca = Ca::new(&format!("{name}-audit-ca"))?;
        let serving = ca.server(&[])?;
        let token = format!("{name}-audit-token");
        let write = |file: &str, text: &str| -> Result<PathBuf> {
            let p = dir.join(file);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        Ok(AuditReceiver {
            port: free_port()?,
            cert_file: write("audit.crt", &serving.cert_pem)?,
            key_file: write("audit.key", &serving.key_pem)?,
            ca_file: write("audit-ca.crt", &ca.cert_pem)?,
            token_file: write("audit-tokens", &format!("{token}\n"))?,
            ca,
            token,
        })
    }

    /// An API server's webhook to `path` (`/audit/host`,
    /// `/audit/vcluster/<namespace>/<name>`), batched for at most 1 s.
    pub fn webhook(&self, path: &str) -> AuditWebhook {
        AuditWebhook {
            url: format!("https://127.0.0.1:{}{path}", self.port),
            ca_pem: self.ca.cert_pem.clone(),
            token: self.token.clone(),
            batch_max_wait: Duration::from_secs(1),
        }
    }

    /// The agent's flags for this receiver (token and client-certificate
    /// authentication).
    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            format!("--audit-addr=127.0.0.1:{}", self.port),
            format!("--audit-cert={}", self.cert_file.display()),
            format!("--audit-key={}", self.key_file.display()),
            format!("--audit-token-file={}", self.token_file.display()),
            format!("--audit-client-ca={}", self.ca_file.display()),
        ]
    }
}
