//! `dormant kubeconfig <namespace>/<name>`: a kubeconfig that reaches a
//! vcluster through dormant's proxy with the vcluster's own credentials
//! (the client certificate from its `vc-<name>` Secret, which the proxy
//! verifies against the vcluster's CA and then impersonates).

use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::target::{TargetKind, TargetRef};

/// Builds the kubeconfig text. `server` is the proxy's base URL;
/// `proxy_ca_pem` the CA that signed the proxy's certificate.
pub async fn kubeconfig(
    client: &kube::Client,
    target: &TargetRef,
    server: &str,
    proxy_ca_pem: &str,
) -> anyhow::Result<String> {
    if target.kind != TargetKind::VCluster {
        bail!("{target} is not a vcluster (expected <namespace>/<name>)");
    }
    if !server.starts_with("https://") {
        bail!("--server {server:?}: expected the proxy's https:// URL");
    }
    crate::tls::certs_from_pem(proxy_ca_pem.as_bytes(), "proxy CA").context("--proxy-ca")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let name = format!("vc-{}", target.name);
    let secret = secrets.get(&name).await.with_context(|| {
        format!("failed to read Secret {}/{name} (the vcluster's credentials)", target.namespace)
    })?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| v.0.clone()).filter(|v| !v.is_empty());
    let (cert, key) = match (get("client-certificate"), get("client-key")) {
        (Some(c), Some(k)) => (c, k),
        _ => {
            let text = get("config")
                .and_then(|c| String::from_utf8(c).ok())
                .context("the Secret has no credentials")?;
            let kc = kube::config::Kubeconfig::from_yaml(&text)
                .context("the Secret's config is not a kubeconfig")?;
            let user = kc
                .auth_infos
                .first()
                .and_then(|a| a.auth_info.clone())
                .context("the kubeconfig has no user")?;
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s.trim()).ok();
            let cert = user.client_certificate_data.as_deref().and_then(b64);
            let key =
                user.client_key_data.as_ref().and_then(|k| b64(secrecy::ExposeSecret::expose_secret(k)));
            match (cert, key) {
                (Some(c), Some(k)) => (c, k),
                _ => bail!(
                    "the vcluster's Secret holds no client certificate; use a token with the proxy instead"
                ),
            }
        }
    };
    let enc = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let context = format!("{}-{}-dormant", target.namespace, target.name);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {context}\n  cluster:\n    server: {}/vcluster/{}/{}\n    certificate-authority-data: {}\nusers:\n- name: {context}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {context}\ncurrent-context: {context}\n",
        server.trim_end_matches('/'),
        target.namespace,
        target.name,
        enc(proxy_ca_pem.as_bytes()),
        enc(&cert),
        enc(&key),
    ))
}
