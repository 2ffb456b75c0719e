//! The registered application's credentials besides its secret, checked as Microsoft Entra ID
//! checks them, and the Azure instance metadata service's token endpoint.
//!
//! Modelled on Microsoft's documentation:
//! - Certificate credentials ("Microsoft identity platform application authentication
//!   certificate credentials"): the assertion's `x5t#S256` (or the older `x5t`) names a
//!   certificate registered on the app, its signature verifies with that certificate's key
//!   (PS256, or RS256 which the service still accepts), `aud` is the tenant's token endpoint,
//!   `iss` and `sub` are the client id, and `nbf`..`exp` contains the service's time, with the
//!   five minutes of clock skew the service allows. Errors: AADSTS700027 (a key not registered, a
//!   signature that does not verify), AADSTS700024 (outside the valid time range), AADSTS700021
//!   (an `aud`, `iss` or `sub` that does not match).
//! - Workload identity federation ("Workload identity federation", "federated identity
//!   credentials"): the external token's `iss`, `sub` and `aud` (`api://AzureADTokenExchange` by
//!   default) must match a federated credential of the app exactly (case-sensitive), its
//!   signature must verify with the issuer's key (the real service reads the issuer's OIDC
//!   discovery document and JWKS; the emulator is given the key), and it must be unexpired.
//!   Errors: AADSTS700211 (issuer), AADSTS700212 (audience), AADSTS700213 (subject), AADSTS700024.
//! - The metadata service ("How to use managed identities for Azure resources on an Azure VM to
//!   acquire an access token"): `GET /metadata/identity/oauth2/token?api-version=…&resource=…`,
//!   refused with 400 without the `Metadata: true` header; the answer's `expires_in` and
//!   `expires_on` are strings.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::time::Timestamp;

/// The audience a federated credential expects by default.
pub const FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The clock skew Entra ID tolerates on assertions.
const CLOCK_SKEW_SECS: i64 = 300;

/// The application's credentials other than its secret.
#[derive(Clone, Debug, Default)]
pub struct AppCredentials {
    /// Registered certificates (PEM of each certificate, public part only).
    pub certificates: Vec<Vec<u8>>,
    /// A federated identity credential: which external tokens the app trusts.
    pub federation: Option<Federation>,
}

#[derive(Clone, Debug)]
pub struct Federation {
    pub issuer: String,
    pub subject: String,
    pub audience: String,
    /// The issuer's public signing key (PEM).
    pub issuer_key: Vec<u8>,
}

/// Why Entra ID refuses an assertion: (HTTP status, OAuth error, AADSTS code, description).
pub type Refusal = (u16, &'static str, u32, String);

/// Checks a `client_assertion`: the app's certificate, or a federated token.
pub fn check_assertion(
    credentials: &AppCredentials,
    assertion: &str,
    token_url: &str,
    client_id: &str,
    now: Timestamp,
) -> Result<(), Refusal> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| malformed(&e.to_string()))?;
    let claims = unverified_claims(assertion)?;
    match (&header.x5t_s256, &header.x5t, &credentials.federation) {
        (None, None, Some(federation)) => check_federated(federation, assertion, &claims, now),
        _ => check_certificate(
            credentials,
            &header,
            assertion,
            &claims,
            token_url,
            client_id,
            now,
        ),
    }
}

fn check_certificate(
    credentials: &AppCredentials,
    header: &jsonwebtoken::Header,
    assertion: &str,
    claims: &Value,
    token_url: &str,
    client_id: &str,
    now: Timestamp,
) -> Result<(), Refusal> {
    let named = header
        .x5t_s256
        .clone()
        .or(header.x5t.clone())
        .unwrap_or_default();
    let registered = credentials.certificates.iter().find(|pem| {
        let der = pem::parse(pem)
            .map(|p| p.contents().to_vec())
            .unwrap_or_default();
        if header.x5t_s256.is_some() {
            b64(&Sha256::digest(&der)) == named
        } else {
            b64(&sha1_digest(&der)) == named
        }
    });
    let Some(certificate) = registered else {
        return Err((
            401,
            "invalid_client",
            700027,
            format!(
                "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{named}']"
            ),
        ));
    };
    let key = DecodingKey::from_rsa_pem(certificate).map_err(|e| malformed(&e.to_string()))?;
    if !matches!(header.alg, Algorithm::PS256 | Algorithm::RS256) {
        return Err(signature_refused());
    }
    verify_signature(assertion, &key, header.alg).map_err(|_| signature_refused())?;
    if claims["aud"].as_str() != Some(token_url) {
        return Err((
            401,
            "invalid_client",
            700021,
            format!(
                "Client assertion audience claim does not match Realm issuer. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials . Audience: '{}'",
                claims["aud"].as_str().unwrap_or("")
            ),
        ));
    }
    if claims["iss"].as_str() != Some(client_id) || claims["sub"].as_str() != Some(client_id) {
        return Err((
            401,
            "invalid_client",
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter."
                .to_string(),
        ));
    }
    within_validity(claims, now)
}

fn check_federated(
    federation: &Federation,
    assertion: &str,
    claims: &Value,
    now: Timestamp,
) -> Result<(), Refusal> {
    let no_match = |code: u32, what: &str, found: &str| {
        (
            400,
            "invalid_request",
            code,
            format!(
                "No matching federated identity record found for presented assertion {what} '{found}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion."
            ),
        )
    };
    let claim = |name: &str| claims[name].as_str().unwrap_or("").to_string();
    if claim("iss") != federation.issuer {
        return Err(no_match(700211, "issuer", &claim("iss")));
    }
    let audience_matches = match &claims["aud"] {
        Value::String(one) => *one == federation.audience,
        Value::Array(many) => many
            .iter()
            .any(|a| a.as_str() == Some(&federation.audience)),
        _ => false,
    };
    if !audience_matches {
        return Err(no_match(700212, "audience", &claims["aud"].to_string()));
    }
    if claim("sub") != federation.subject {
        return Err(no_match(700213, "subject", &claim("sub")));
    }
    let key =
        DecodingKey::from_rsa_pem(&federation.issuer_key).map_err(|e| malformed(&e.to_string()))?;
    let alg = jsonwebtoken::decode_header(assertion)
        .map(|h| h.alg)
        .map_err(|e| malformed(&e.to_string()))?;
    if !matches!(alg, Algorithm::RS256 | Algorithm::PS256) {
        return Err(signature_refused());
    }
    verify_signature(assertion, &key, alg).map_err(|_| {
        (
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation. The key used to sign the federated token is not among the issuer's keys.".to_string(),
        )
    })?;
    within_validity(claims, now)
}

/// The signature alone: times are the emulator's clock's business, not this machine's.
fn verify_signature(assertion: &str, key: &DecodingKey, alg: Algorithm) -> Result<(), ()> {
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(assertion, key, &validation)
        .map(|_| ())
        .map_err(|_| ())
}

fn within_validity(claims: &Value, now: Timestamp) -> Result<(), Refusal> {
    let now_secs = now.as_millis().div_euclid(1000);
    let nbf = claims["nbf"].as_i64().unwrap_or(i64::MIN);
    let exp = claims["exp"].as_i64();
    let inside = exp.is_some_and(|exp| {
        nbf.saturating_sub(CLOCK_SKEW_SECS) <= now_secs
            && now_secs <= exp.saturating_add(CLOCK_SKEW_SECS)
    });
    if inside {
        return Ok(());
    }
    let at = |secs: i64| Timestamp::from_millis(secs.saturating_mul(1000)).rfc3339();
    Err((
        401,
        "invalid_client",
        700024,
        format!(
            "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.",
            now.rfc3339(),
            at(nbf.max(0)),
            exp.map(at).unwrap_or_else(|| "(none)".to_string())
        ),
    ))
}

fn unverified_claims(assertion: &str) -> Result<Value, Refusal> {
    use base64::Engine as _;
    let payload = assertion
        .split('.')
        .nth(1)
        .ok_or_else(|| malformed("not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| malformed(&e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| malformed(&e.to_string()))
}

fn malformed(why: &str) -> Refusal {
    (
        400,
        "invalid_request",
        50027,
        format!("JWT token is invalid or malformed. ({why})"),
    )
}

fn signature_refused() -> Refusal {
    (
        401,
        "invalid_client",
        700027,
        "Client assertion failed signature validation.".to_string(),
    )
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-1 for the legacy `x5t` header (ring has it for exactly such legacy uses).
fn sha1_digest(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, bytes)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::graph::credential::Certificate;
    use jsonwebtoken::{EncodingKey, Header};
    use std::path::Path;

    const URL: &str = "http://127.0.0.1:1/contoso.onmicrosoft.com/oauth2/v2.0/token";
    const APP: &str = "app-id";

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/credentials")
                .join(name),
        )
        .unwrap()
    }

    fn registered() -> AppCredentials {
        AppCredentials {
            certificates: vec![fixture("app.crt.pem")],
            federation: Some(Federation {
                issuer: "https://issuer.example".into(),
                subject: "system:serviceaccount:ops:phasegate".into(),
                audience: FEDERATION_AUDIENCE.into(),
                issuer_key: fixture("issuer.pub.pem"),
            }),
        }
    }

    fn signed(name: &str) -> Certificate {
        Certificate::from_pem(&fixture(name)).unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_millis(secs * 1000)
    }

    fn code(result: Result<(), Refusal>) -> Option<u32> {
        result.err().map(|(_, _, code, _)| code)
    }

    #[test]
    fn the_registered_certificate_signs_in_inside_its_validity_only() {
        let credentials = registered();
        let assertion = signed("app.pem")
            .assertion(URL, APP, at(1_000_000))
            .unwrap();
        let at_time = |secs| {
            code(check_assertion(
                &credentials,
                &assertion,
                URL,
                APP,
                at(secs),
            ))
        };
        assert_eq!(at_time(1_000_000), None);
        // Five minutes of skew either way, then AADSTS700024.
        assert_eq!(at_time(1_000_000 - 300), None);
        assert_eq!(at_time(1_000_000 - 301), Some(700024));
        assert_eq!(at_time(1_000_600 + 301), Some(700024));
    }

    #[test]
    fn another_certificate_another_audience_or_client_is_refused() {
        let credentials = registered();
        let now = at(1_000_000);
        let other = signed("other.pem").assertion(URL, APP, now).unwrap();
        let refused = check_assertion(&credentials, &other, URL, APP, now).unwrap_err();
        assert_eq!(refused.2, 700027);
        assert!(refused.3.contains("not registered"), "{}", refused.3);
        let elsewhere = signed("app.pem")
            .assertion("https://elsewhere/token", APP, now)
            .unwrap();
        assert_eq!(
            code(check_assertion(&credentials, &elsewhere, URL, APP, now)),
            Some(700021)
        );
        let other_app = signed("app.pem").assertion(URL, "other-app", now).unwrap();
        assert_eq!(
            code(check_assertion(&credentials, &other_app, URL, APP, now)),
            Some(700021)
        );
        // The registered thumbprint with another key's signature.
        let mut header = Header::new(Algorithm::PS256);
        header.x5t_s256 = Some(signed("app.pem").thumbprint().to_string());
        let pem = pem::parse_many(fixture("other.pem")).unwrap();
        let key = pem.iter().find(|p| p.tag() == "PRIVATE KEY").unwrap();
        let forged = jsonwebtoken::encode(
            &header,
            &serde_json::json!({"aud": URL, "iss": APP, "sub": APP, "nbf": 1_000_000, "exp": 1_000_600}),
            &EncodingKey::from_rsa_pem(pem::encode(key).as_bytes()).unwrap(),
        )
        .unwrap();
        let refused = check_assertion(&credentials, &forged, URL, APP, now).unwrap_err();
        assert_eq!(
            (refused.2, refused.3.as_str()),
            (700027, "Client assertion failed signature validation.")
        );
        assert_eq!(
            code(check_assertion(&credentials, "not.a.jwt", URL, APP, now)),
            Some(50027)
        );
    }

    fn federated(claims: serde_json::Value, key_file: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&fixture(key_file)).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_federated_token_must_match_issuer_audience_and_subject_exactly() {
        let credentials = registered();
        let now = at(1_000_000);
        let good = serde_json::json!({
            "iss": "https://issuer.example", "sub": "system:serviceaccount:ops:phasegate",
            "aud": [FEDERATION_AUDIENCE], "nbf": 999_000, "exp": 1_003_600,
        });
        let token = federated(good.clone(), "issuer.key.pem");
        assert_eq!(
            code(check_assertion(&credentials, &token, URL, APP, now)),
            None
        );
        for (claim, value, expected) in [
            ("iss", "https://Issuer.example", 700211),
            ("aud", "api://other", 700212),
            ("sub", "system:serviceaccount:ops:other", 700213),
        ] {
            let mut claims = good.clone();
            claims[claim] = value.into();
            let token = federated(claims, "issuer.key.pem");
            assert_eq!(
                code(check_assertion(&credentials, &token, URL, APP, now)),
                Some(expected),
                "{claim}"
            );
        }
        let expired = federated(good.clone(), "issuer.key.pem");
        assert_eq!(
            code(check_assertion(
                &credentials,
                &expired,
                URL,
                APP,
                at(1_003_600 + 301)
            )),
            Some(700024)
        );
        // Signed by a key that is not the issuer's.
        let pem = pem::parse_many(fixture("other.pem")).unwrap();
        let key = pem.iter().find(|p| p.tag() == "PRIVATE KEY").unwrap();
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &good,
            &EncodingKey::from_rsa_pem(pem::encode(key).as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            code(check_assertion(&credentials, &forged, URL, APP, now)),
            Some(700027)
        );
    }
}
