//! How phasegate proves to Microsoft Entra ID that it is the plan's application, and what the
//! token request looks like for each way.
//!
//! - A **client secret** (`client_secret_env`): for rehearsals and small set-ups.
//! - A **certificate** (`client_certificate`): a `client_assertion` JWT signed with the app's
//!   private key, as Microsoft's "certificate credentials" document it: `alg` PS256, `typ` JWT,
//!   `x5t#S256` the base64url SHA-256 thumbprint of the certificate's DER; claims `aud` (the token
//!   endpoint), `iss` = `sub` = the client id, `jti` unique, `nbf`/`iat` now, `exp` a few minutes
//!   on. Signed with `jsonwebtoken` on `ring` (the TLS stack's own cryptography).
//! - A **managed identity** (`managed_identity`): `GET` on the instance metadata service's token
//!   endpoint with `Metadata: true`; no material at all on the machine.
//! - **Workload identity federation** (`workload_identity`): the token an orchestrator writes to
//!   a file (Kubernetes projects a service-account token) sent as the `client_assertion`; read
//!   again for every token request, because the orchestrator rotates it.
//!
//! Material is read when the provider connects (so a missing file or variable is named before
//! the rollout starts), kept only in memory, shown as `[redacted]`, and never stored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::settings::{CredentialSettings, FEDERATED_TOKEN_FILE_VARIABLE, GraphSettings};
use crate::domain::time::Timestamp;
use crate::provider::{ErrorKind, ProviderError};

/// The assertion type for a signed JWT (RFC 7523), for both certificates and federated tokens.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The metadata service's API version phasegate speaks (the one Microsoft's examples use).
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// How long a signed assertion is valid: Microsoft advises 5 to 10 minutes at most.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);
/// Credential files are small; anything bigger is not one.
const MAX_CREDENTIAL_FILE: u64 = 1 << 20;

/// A client secret, kept out of every `Debug` output.
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The app's certificate credential: its signing key and the thumbprint Entra ID knows it by.
pub struct Certificate {
    key: EncodingKey,
    /// `x5t#S256`: base64url SHA-256 of the certificate's DER.
    thumbprint: String,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Certificate(x5t#S256={}, key [redacted])",
            self.thumbprint
        )
    }
}

/// The credential a connected provider signs in with.
#[derive(Debug)]
pub enum Credential {
    Secret(Secret),
    Certificate(Certificate),
    ManagedIdentity { endpoint: String },
    WorkloadIdentity { token_file: PathBuf },
}

impl From<Secret> for Credential {
    fn from(secret: Secret) -> Credential {
        Credential::Secret(secret)
    }
}

/// One token request, ready to send.
#[derive(Debug)]
pub enum TokenRequest {
    /// `POST` of a form to the tenant's token endpoint.
    Form {
        url: String,
        form: Vec<(&'static str, String)>,
    },
    /// `GET` on the metadata service, with `Metadata: true`.
    Metadata { url: String },
}

impl TokenRequest {
    pub fn method(&self) -> &'static str {
        match self {
            TokenRequest::Form { .. } => "POST",
            TokenRequest::Metadata { .. } => "GET",
        }
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: i64,
    iat: i64,
    exp: i64,
}

impl Credential {
    /// Reads the credential's material: the secret from its variable, the certificate from its
    /// file. A managed identity has none; a federated token file is read per request.
    pub fn load(settings: &CredentialSettings, tenant: &str) -> Result<Credential, ProviderError> {
        let auth = |message: String| ProviderError::new(ErrorKind::Auth, message);
        match settings {
            CredentialSettings::ClientSecret { env } => std::env::var(env)
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| Credential::Secret(Secret::new(s)))
                .ok_or_else(|| {
                    auth(format!(
                        "the client secret for tenant {tenant} is not set: put it in the environment variable {env}"
                    ))
                }),
            CredentialSettings::Certificate { path, password_env } => {
                let password = match password_env {
                    None => None,
                    Some(env) => Some(std::env::var(env).map_err(|_| {
                        auth(format!(
                            "the password of the certificate {} is not set: put it in the environment variable {env}",
                            path.display()
                        ))
                    })?),
                };
                Certificate::read(path, password.as_deref())
                    .map(Credential::Certificate)
                    .map_err(|why| auth(format!("the certificate {}: {why}", path.display())))
            }
            CredentialSettings::ManagedIdentity { endpoint } => Ok(Credential::ManagedIdentity {
                endpoint: endpoint.clone(),
            }),
            CredentialSettings::WorkloadIdentity { token_file } => {
                let token_file = match token_file {
                    Some(path) => path.clone(),
                    None => std::env::var_os(FEDERATED_TOKEN_FILE_VARIABLE)
                        .filter(|v| !v.is_empty())
                        .map(PathBuf::from)
                        .ok_or_else(|| {
                            auth(format!(
                                "no federated token file: set `federated_token_file` in the plan, or \
                                 {FEDERATED_TOKEN_FILE_VARIABLE} (Azure's workload identity sets it in the pod)"
                            ))
                        })?,
                };
                // Read once now so that a missing file is named before anything starts.
                read_token_file(&token_file).map_err(auth)?;
                Ok(Credential::WorkloadIdentity { token_file })
            }
        }
    }

    /// The request that gets a Graph token at tenant time `now`.
    pub fn request(
        &self,
        settings: &GraphSettings,
        scope: &str,
        now: Timestamp,
    ) -> Result<TokenRequest, ProviderError> {
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            settings.login_url, settings.tenant
        );
        let mut form = vec![
            ("client_id", settings.client_id.clone()),
            ("scope", scope.to_string()),
            ("grant_type", "client_credentials".to_string()),
        ];
        match self {
            Credential::Secret(secret) => form.push(("client_secret", secret.0.clone())),
            Credential::Certificate(certificate) => {
                let assertion = certificate.assertion(&url, &settings.client_id, now)?;
                form.push(("client_assertion_type", JWT_BEARER.to_string()));
                form.push(("client_assertion", assertion));
            }
            Credential::WorkloadIdentity { token_file } => {
                let token = read_token_file(token_file)
                    .map_err(|m| ProviderError::new(ErrorKind::Auth, m))?;
                form.push(("client_assertion_type", JWT_BEARER.to_string()));
                form.push(("client_assertion", token));
            }
            Credential::ManagedIdentity { endpoint } => {
                let resource = scope.trim_end_matches("/.default");
                let mut url = reqwest::Url::parse(endpoint).map_err(|e| {
                    ProviderError::permanent(format!("invalid identity_endpoint `{endpoint}`: {e}"))
                })?;
                url.query_pairs_mut()
                    .append_pair("api-version", IMDS_API_VERSION)
                    .append_pair("resource", resource)
                    .append_pair("client_id", &settings.client_id);
                return Ok(TokenRequest::Metadata {
                    url: url.to_string(),
                });
            }
        }
        Ok(TokenRequest::Form { url, form })
    }
}

impl Certificate {
    /// A PEM file with the certificate and its private key (in either order), or a PKCS#12
    /// archive with its password.
    pub fn read(path: &Path, password: Option<&str>) -> Result<Certificate, String> {
        let bytes = read_bounded(path)?;
        match password {
            Some(password) => Certificate::from_pkcs12(&bytes, password),
            None => Certificate::from_pem(&bytes),
        }
    }

    pub fn from_pem(bytes: &[u8]) -> Result<Certificate, String> {
        let blocks = pem::parse_many(bytes).map_err(|e| format!("not PEM: {e}"))?;
        let certificate = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .ok_or("no CERTIFICATE in the file: it needs the certificate and its private key")?;
        let key = blocks
            .iter()
            .find(|b| b.tag() == "PRIVATE KEY" || b.tag() == "RSA PRIVATE KEY")
            .ok_or(
                "no PRIVATE KEY in the file: it needs the certificate and its (unencrypted) RSA private key",
            )?;
        Certificate::new(certificate.contents(), &pem::encode(key))
    }

    pub fn from_pkcs12(bytes: &[u8], password: &str) -> Result<Certificate, String> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            bytes,
            password,
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .map_err(|e| format!("not a PKCS#12 archive this password opens: {e}"))?;
        let (_, chain) = store
            .private_key_chain()
            .ok_or("the PKCS#12 archive holds no private key with its certificate")?;
        let certificate = chain
            .certs()
            .first()
            .ok_or("the PKCS#12 archive's key has no certificate")?;
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", chain.key().as_der().to_vec()));
        Certificate::new(certificate.as_der(), &key)
    }

    fn new(certificate_der: &[u8], key_pem: &str) -> Result<Certificate, String> {
        let key = EncodingKey::from_rsa_pem(key_pem.as_bytes()).map_err(|e| {
            format!("the private key is not an RSA key phasegate can sign with: {e}")
        })?;
        Ok(Certificate {
            key,
            thumbprint: thumbprint(certificate_der),
        })
    }

    /// The `x5t#S256` the assertion names the certificate by.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A client assertion for the token endpoint `audience`, valid from `now`.
    pub fn assertion(
        &self,
        audience: &str,
        client_id: &str,
        now: Timestamp,
    ) -> Result<String, ProviderError> {
        let mut header = Header::new(Algorithm::PS256);
        header.typ = Some("JWT".to_string());
        header.x5t_s256 = Some(self.thumbprint.clone());
        let issued = now.as_millis().div_euclid(1000);
        let claims = AssertionClaims {
            aud: audience,
            iss: client_id,
            sub: client_id,
            jti: random_id(),
            nbf: issued,
            iat: issued,
            exp: issued.saturating_add(ASSERTION_LIFETIME.as_secs() as i64),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| ProviderError::permanent(format!("signing the client assertion: {e}")))
    }
}

/// Base64url (no padding) SHA-256 of a certificate's DER: its `x5t#S256`.
pub fn thumbprint(certificate_der: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(certificate_der))
}

/// A unique `jti`: 16 random bytes, hex.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // The assertion is still valid without randomness (`jti` only needs to be unique per app);
    // fall back to the time if the system's source fails.
    if getrandom::fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = now.to_be_bytes();
    }
    hex::encode(bytes)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIAL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE {
        return Err(format!(
            "is larger than {} KiB: not a credential",
            MAX_CREDENTIAL_FILE / 1024
        ));
    }
    Ok(bytes)
}

fn read_token_file(path: &Path) -> Result<String, String> {
    let bytes = read_bounded(path)
        .map_err(|why| format!("the federated token file {}: {why}", path.display()))?;
    let token = String::from_utf8(bytes)
        .map_err(|_| format!("the federated token file {} is not text", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!(
            "the federated token file {} is empty",
            path.display()
        ));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/credentials")
            .join(name)
    }

    fn header_and_claims(jwt: &str) -> (serde_json::Value, serde_json::Value) {
        let mut parts = jwt.split('.');
        let mut decode = || {
            let part = parts.next().unwrap();
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        };
        (decode(), decode())
    }

    #[test]
    fn an_assertion_has_the_header_and_claims_microsoft_documents() {
        let certificate = Certificate::read(&fixture("app.pem"), None).unwrap();
        let now = Timestamp::from_millis(1_700_000_000_500);
        let jwt = certificate
            .assertion("https://login.example/t/oauth2/v2.0/token", "app-id", now)
            .unwrap();
        let (header, claims) = header_and_claims(&jwt);
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t#S256"], certificate.thumbprint());
        assert_eq!(claims["aud"], "https://login.example/t/oauth2/v2.0/token");
        assert_eq!(claims["iss"], "app-id");
        assert_eq!(claims["sub"], "app-id");
        assert_eq!(claims["nbf"], 1_700_000_000);
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["exp"], 1_700_000_600);
        assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
        let again = certificate
            .assertion("https://login.example/t/oauth2/v2.0/token", "app-id", now)
            .unwrap();
        assert_ne!(header_and_claims(&again).1["jti"], claims["jti"]);
    }

    #[test]
    fn the_thumbprint_is_the_sha256_of_the_certificates_der() {
        let pem = std::fs::read(fixture("app.crt.pem")).unwrap();
        let der = pem::parse(&pem).unwrap().contents().to_vec();
        let certificate = Certificate::read(&fixture("app.pem"), None).unwrap();
        assert_eq!(certificate.thumbprint(), thumbprint(&der));
        assert_eq!(certificate.thumbprint().len(), 43);
    }

    #[test]
    fn pkcs12_opens_with_its_password_and_names_the_same_certificate() {
        let pem = Certificate::read(&fixture("app.pem"), None).unwrap();
        let p12 = Certificate::read(&fixture("app.p12"), Some("test-pkcs12-password")).unwrap();
        assert_eq!(p12.thumbprint(), pem.thumbprint());
        let wrong = Certificate::read(&fixture("app.p12"), Some("guess")).unwrap_err();
        assert!(wrong.contains("PKCS#12"), "{wrong}");
    }

    #[test]
    fn files_that_are_not_credentials_say_what_is_missing() {
        let certificate_only = Certificate::read(&fixture("app.crt.pem"), None).unwrap_err();
        assert!(
            certificate_only.contains("no PRIVATE KEY"),
            "{certificate_only}"
        );
        let key_only = Certificate::read(&fixture("issuer.key.pem"), None).unwrap_err();
        assert!(key_only.contains("no CERTIFICATE"), "{key_only}");
        let missing = Certificate::read(Path::new("/nonexistent/app.pem"), None).unwrap_err();
        assert!(missing.contains("cannot be read"), "{missing}");
        assert!(Certificate::from_pem(b"garbage").is_err());
    }

    #[test]
    fn debug_output_never_shows_material() {
        let certificate =
            Credential::Certificate(Certificate::read(&fixture("app.pem"), None).unwrap());
        assert!(format!("{certificate:?}").contains("[redacted]"));
        let secret = Credential::Secret(Secret::new("hunter2".into()));
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
