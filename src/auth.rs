//! Who a caller says it is, read as kube-apiserver reads it: the bearer
//! token of an `Authorization` header, the user and groups of a client
//! certificate, and the account a ServiceAccount token names. Reading is
//! not believing: each caller of these decides what to trust (a
//! certificate verified against a CA, a token its API server accepted).
//! Shared by the audit webhook and the proxy.

use rustls_pki_types::CertificateDer;

/// The token of an `Authorization: Bearer` header, read as kube-apiserver
/// reads it: the scheme in any case, the token up to the next space, none
/// when empty.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let mut parts = value.splitn(3, ' ');
    let (scheme, token) = (parts.next()?, parts.next()?);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The user (CN) and groups (O) a certificate names, read as
/// kube-apiserver reads them: the last CN (Go's `pkix.Name` keeps the last),
/// which must not be empty. An empty `Impersonate-User` would not
/// impersonate anyone, and the request would run as the admin credential
/// it is sent with.
pub fn subject(cert: &CertificateDer<'_>) -> Option<(String, Vec<String>)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = x509.subject();
    let user = subject.iter_common_name().last()?.as_str().ok()?.to_string();
    if user.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().filter(|g| !g.is_empty()).map(String::from))
        .collect();
    Some((user, groups))
}

/// The user and groups Kubernetes gives the ServiceAccount a token was
/// issued to (`sub` of a JWT: `system:serviceaccount:<namespace>:<name>`),
/// read without verifying the signature: what it says is a claim, never
/// an identity, until something that can verify it has.
pub fn service_account(token: &str) -> Option<(String, Vec<String>)> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    // Only `sub`, borrowed: this runs for every request with a token.
    #[derive(serde::Deserialize)]
    struct Claims<'a> {
        #[serde(borrow)]
        sub: std::borrow::Cow<'a, str>,
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Claims<'_> = serde_json::from_slice(&payload).ok()?;
    let sub = claims.sub.as_ref();
    let (namespace, name) = sub.strip_prefix("system:serviceaccount:")?.split_once(':')?;
    let valid = |s: &str| !s.is_empty() && !s.contains(':');
    (valid(namespace) && valid(name)).then(|| {
        (
            sub.to_string(),
            vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, header};

    #[test]
    fn bearer_tokens_are_read_as_kube_apiserver_reads_them() {
        let token = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer_token(&h).map(String::from)
        };
        assert_eq!(token("Bearer abc"), Some("abc".into()));
        assert_eq!(token("bearer abc"), Some("abc".into()));
        assert_eq!(token("BEARER abc "), Some("abc".into()));
        assert_eq!(token("Bearer abc def"), Some("abc".into()));
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer  abc"), None, "kube-apiserver reads an empty token here");
        assert_eq!(token("Basic YWxpY2U6c2VjcmV0"), None);
        assert_eq!(token("Bearerabc"), None);
    }

    #[test]
    fn a_certificate_names_its_last_common_name_and_never_an_empty_one() {
        let der = |cert: testbed::pki::CertPair| {
            crate::tls::certs_from_pem(cert.cert_pem.as_bytes(), "test").unwrap().remove(0)
        };
        let ca = testbed::pki::Ca::new("subject-test").unwrap();
        assert_eq!(
            subject(&der(ca.client("alice", &["team-a"]).unwrap())),
            Some(("alice".to_string(), vec!["team-a".to_string()]))
        );
        assert_eq!(subject(&der(ca.client("", &[]).unwrap())), None);
        assert_eq!(subject(&der(ca.client("", &["system:masters"]).unwrap())), None);
    }

    #[test]
    fn a_service_account_token_names_its_account_and_other_tokens_nothing() {
        use base64::Engine;
        let jwt = |claims: &str| {
            let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("{}.{}.{}", b(r#"{"alg":"RS256"}"#), b(claims), b("signature"))
        };
        let (user, groups) =
            service_account(&jwt(r#"{"sub":"system:serviceaccount:argocd:argocd-application-controller"}"#))
                .unwrap();
        assert_eq!(user, "system:serviceaccount:argocd:argocd-application-controller");
        assert_eq!(
            groups,
            ["system:serviceaccounts", "system:serviceaccounts:argocd", "system:authenticated"]
        );
        for token in [
            jwt(r#"{"sub":"alice@example.com"}"#),
            jwt(r#"{"sub":"system:serviceaccount:argocd"}"#),
            jwt(r#"{"sub":"system:serviceaccount:a:b:c"}"#),
            jwt("not json"),
            "abcdef0123456789".to_string(),
            "a.%%%.c".to_string(),
        ] {
            assert_eq!(service_account(&token), None, "{token}");
        }
    }
}
