//! TLS for the PostgreSQL connection: the libpq `sslmode` and `sslrootcert` settings read from
//! the store's URL (or `PGSSLMODE` / `PGSSLROOTCERT`), turned into a rustls client.
//!
//! Each mode means what libpq documents in "SSL Support", table "SSL Mode Descriptions"
//! (https://www.postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-SSLMODE-STATEMENTS):
//!
//! - `disable`: plain TCP only.
//! - `allow`: plain first; if that connection fails (a server that takes TLS only refuses it),
//!   once more with TLS, the certificate not checked.
//! - `prefer` (the default when nothing is said): TLS when the server offers it, plain when the
//!   server declines it; the certificate is not checked (encryption only, no protection against
//!   an active attacker). libpq also retries in plain after a *failed* TLS handshake; the driver
//!   does not, and phasegate keeps that: a handshake that fails is an error, never a silent
//!   downgrade.
//! - `require`: TLS or nothing; the certificate is not checked, except that, as libpq does "for
//!   backwards compatibility", a root CA file named with `sslrootcert` makes it `verify-ca`.
//! - `verify-ca`: TLS, and the server's certificate must chain to the CA of `sslrootcert`.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host connected to.
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the system's roots; as libpq
//! documents for `system` (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-SSLROOTCERT),
//! that makes `verify-full` the default and refuses a weaker mode. Where libpq would read
//! `~/.postgresql/root.crt` when no `sslrootcert` is given, phasegate reads no file it was not
//! told about: `verify-full` then uses the system's roots (what a managed server such as Azure
//! Database for PostgreSQL, whose certificates chain to public roots, needs), and `verify-ca`
//! is refused (any public certificate would pass it).
//!
//! A client certificate is `sslcert` (PEM, the certificate and any intermediates) with its key
//! `sslkey` (PEM, unencrypted), or `PGSSLCERT` / `PGSSLKEY`, sent when the server asks for one
//! (libpq's `sslcertmode=allow`, the default; `disable` sends none). As libpq checks, the key file
//! must not be readable by group or others (0600), or, owned by root, by others (0640). Where
//! libpq would read `~/.postgresql/postgresql.crt` unasked, phasegate again reads only what it was
//! told. An encrypted key (`sslpassword`) and `sslcertmode=require` are not supported and are
//! refused with a clear error rather than ignored.

use std::path::PathBuf;
use std::sync::Arc;

use ::postgres::config::SslMode;
use percent_encoding::percent_decode_str;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector the driver is given.
pub(crate) type Connector = MakeRustlsConnect;

/// A CA file larger than this is not a CA file.
const MAX_ROOT_FILE: u64 = 4 * 1024 * 1024;

/// An `sslmode` value (libpq's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Mode, String> {
        match value {
            "disable" => Ok(Mode::Disable),
            "prefer" => Ok(Mode::Prefer),
            "require" => Ok(Mode::Require),
            "verify-ca" => Ok(Mode::VerifyCa),
            "verify-full" => Ok(Mode::VerifyFull),
            "allow" => Ok(Mode::Allow),
            other => Err(format!(
                "sslmode={other} is not a mode phasegate knows: use disable, allow, prefer, require, verify-ca or verify-full"
            )),
        }
    }

    /// What the driver negotiates first: whether TLS is tried, and whether plain is accepted.
    fn driver(self) -> SslMode {
        match self {
            Mode::Disable | Mode::Allow => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }
}

/// Where the trusted CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Roots {
    /// None named: only `prefer`/`require` (no check) or `verify-full` (system roots) use this.
    Unset,
    System,
    File(PathBuf),
}

/// A driver error with its causes (the driver's own message for a failed handshake or connect
/// names neither the certificate problem nor the refusal): "error performing TLS handshake:
/// invalid peer certificate: UnknownIssuer". The causes are I/O and TLS errors, never the
/// password.
pub(crate) fn describe(err: &::postgres::Error) -> String {
    let mut message = err.to_string();
    let mut cause = std::error::Error::source(err);
    // Bounded: a cause chain is a handful of errors deep.
    for _ in 0..8 {
        let Some(next) = cause else { break };
        let text = next.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = next.source();
    }
    message
}

/// The TLS settings of one store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub mode: Mode,
    pub roots: Roots,
    /// The client certificate to show a server that asks for one.
    pub client: Option<ClientCert>,
}

/// A client certificate's files (`sslcert`, `sslkey`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A client certificate or key file larger than this is not one.
const MAX_CLIENT_FILE: u64 = 1024 * 1024;

/// The URL without the TLS parameters (what the driver parses) and the TLS settings it asked
/// for, with `env` (`PGSSLMODE`, `PGSSLROOTCERT`) filling in what the URL does not say.
pub(crate) fn split(
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(String, Settings), String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root = None;
    let (mut cert, mut cert_key, mut cert_mode) = (None, None, None);
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode_str(key).decode_utf8_lossy();
        let value = || percent_decode_str(value).decode_utf8_lossy().into_owned();
        match key.as_ref() {
            "sslmode" => mode = Some(value()),
            "sslrootcert" => root = Some(value()),
            "sslcert" => cert = Some(value()),
            "sslkey" => cert_key = Some(value()),
            "sslcertmode" => cert_mode = Some(value()),
            "sslpassword" => {
                return Err("sslpassword: an encrypted client key is not supported; give sslkey an unencrypted copy (openssl pkey -in KEY -out KEY.plain), mode 0600".into());
            }
            _ => kept.push(pair),
        }
    }
    let mode = mode.or_else(|| env("PGSSLMODE")).filter(|m| !m.is_empty());
    let root = root
        .or_else(|| env("PGSSLROOTCERT"))
        .filter(|r| !r.is_empty());
    let roots = match root.as_deref() {
        None => Roots::Unset,
        Some("system") => Roots::System,
        Some(path) => Roots::File(PathBuf::from(path)),
    };
    let mode = match mode.as_deref() {
        Some(value) => Mode::parse(value)?,
        None if roots == Roots::System => Mode::VerifyFull,
        None => Mode::Prefer,
    };
    let mode = match (mode, &roots) {
        (Mode::Require, Roots::File(_)) => Mode::VerifyCa,
        (
            Mode::Prefer | Mode::Require | Mode::VerifyCa | Mode::Disable | Mode::Allow,
            Roots::System,
        ) => {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (any public certificate would pass {}), as libpq requires",
                name(mode)
            ));
        }
        (Mode::VerifyCa, Roots::Unset) => {
            return Err("sslmode=verify-ca needs sslrootcert=<CA file>: against the system's roots any public certificate would pass; use verify-full for a server with a public certificate".into());
        }
        (mode, _) => mode,
    };
    let client = client_cert(
        cert.or_else(|| env("PGSSLCERT")).filter(|c| !c.is_empty()),
        cert_key
            .or_else(|| env("PGSSLKEY"))
            .filter(|k| !k.is_empty()),
        cert_mode.or_else(|| env("PGSSLCERTMODE")),
    )?;
    if client.is_some() && mode == Mode::Disable {
        return Err(
            "sslcert: a client certificate needs TLS, and sslmode=disable turns it off".into(),
        );
    }
    let stripped = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((
        stripped,
        Settings {
            mode,
            roots,
            client,
        },
    ))
}

/// The client certificate asked for, if any (`sslcertmode` as libpq reads it).
fn client_cert(
    cert: Option<String>,
    key: Option<String>,
    cert_mode: Option<String>,
) -> Result<Option<ClientCert>, String> {
    match cert_mode.as_deref().filter(|m| !m.is_empty()) {
        None | Some("allow") => {}
        Some("disable") => return Ok(None),
        Some("require") => {
            return Err("sslcertmode=require is not supported: use allow (the default), which sends the certificate whenever the server asks for it".into());
        }
        Some(other) => {
            return Err(format!(
                "sslcertmode={other} is not a mode phasegate knows: use allow or disable"
            ));
        }
    }
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(ClientCert {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })),
        (Some(_), None) => Err("sslcert needs sslkey, the file of its private key".into()),
        (None, Some(_)) => Err("sslkey needs sslcert, the file of its certificate".into()),
    }
}

/// A file's bytes, at most `max` of them: `what` names it in errors (`sslcert`, ...).
fn read_bounded(what: &str, path: &std::path::Path, max: u64) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let file =
        std::fs::File::open(path).map_err(|e| format!("{what} {shown} cannot be read: {e}"))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes)
        .map_err(|e| format!("{what} {shown} cannot be read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("{what} {shown} is larger than {max} bytes"));
    }
    Ok(bytes)
}

/// libpq's rule for the key file: no access for group or others (0600 or less), or, owned by
/// root, read access for its group at most (0640 or less).
fn key_mode_allowed(mode: u32, owner_is_root: bool) -> bool {
    let allowed = if owner_is_root { 0o640 } else { 0o600 };
    mode & 0o777 & !allowed == 0
}

impl ClientCert {
    /// The certificate chain and key, read and checked now.
    fn load(
        &self,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        String,
    > {
        use std::os::unix::fs::MetadataExt;
        let bytes = read_bounded("sslcert", &self.cert, MAX_CLIENT_FILE)?;
        let chain = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!(
                    "sslcert {} is not a PEM certificate file: {e}",
                    self.cert.display()
                )
            })?;
        if chain.is_empty() {
            return Err(format!(
                "sslcert {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                self.cert.display()
            ));
        }
        let shown = self.key.display();
        let meta = std::fs::metadata(&self.key)
            .map_err(|e| format!("sslkey {shown} cannot be read: {e}"))?;
        if !key_mode_allowed(meta.mode(), meta.uid() == 0) {
            return Err(format!(
                "sslkey {shown} has group or world access (mode {:o}): it must be 0600 or less, or 0640 or less if owned by root, as libpq requires (chmod 0600 {shown})",
                meta.mode() & 0o777
            ));
        }
        let bytes = read_bounded("sslkey", &self.key, MAX_CLIENT_FILE)?;
        if String::from_utf8_lossy(&bytes).contains("ENCRYPTED") {
            return Err(format!(
                "sslkey {shown} is encrypted, which is not supported: give an unencrypted copy (openssl pkey -in KEY -out KEY.plain), mode 0600"
            ));
        }
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&bytes)
            .map_err(|e| format!("sslkey {shown} is not a PEM private key: {e}"))?;
        Ok((chain, key))
    }
}

fn name(mode: Mode) -> &'static str {
    match mode {
        Mode::Disable => "disable",
        Mode::Allow => "allow",
        Mode::Prefer => "prefer",
        Mode::Require => "require",
        Mode::VerifyCa => "verify-ca",
        Mode::VerifyFull => "verify-full",
    }
}

impl Settings {
    /// The driver's `sslmode` for the first attempt.
    pub fn driver_mode(&self) -> SslMode {
        self.mode.driver()
    }

    /// Whether a failed first attempt is made again with TLS (`allow`).
    pub fn tls_after_plain(&self) -> bool {
        self.mode == Mode::Allow
    }

    /// The rustls connector for these settings (the CA file read now, so that a missing or
    /// empty one is an error when the store is opened).
    pub fn connector(&self) -> Result<Connector, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            Mode::Disable | Mode::Allow | Mode::Prefer | Mode::Require => Arc::new(Unchecked {
                provider: provider.clone(),
            }),
            Mode::VerifyCa | Mode::VerifyFull => {
                let roots = self.root_store()?;
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("the trusted CA certificates cannot be used: {e}"))?;
                if self.mode == Mode::VerifyFull {
                    inner
                } else {
                    Arc::new(AnyName { inner })
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let (chain, key) = client.load()?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "sslcert {} and sslkey {} do not go together: {e}",
                        client.cert.display(),
                        client.key.display()
                    )
                })?
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, String> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Roots::File(path) => {
                let shown = path.display();
                let bytes = read_bounded("sslrootcert", path, MAX_ROOT_FILE)?;
                for cert in CertificateDer::pem_slice_iter(&bytes) {
                    let cert = cert.map_err(|e| {
                        format!("sslrootcert {shown} is not a PEM file of certificates: {e}")
                    })?;
                    store.add(cert).map_err(|e| {
                        format!("sslrootcert {shown} holds a certificate that is not a CA: {e}")
                    })?;
                }
                if store.is_empty() {
                    return Err(format!(
                        "sslrootcert {shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                    ));
                }
            }
            Roots::System | Roots::Unset => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(
                        "no system CA certificates were found (install the ca-certificates package, or name a CA file with sslrootcert)"
                            .into(),
                    );
                }
            }
        }
        Ok(Arc::new(store))
    }
}

/// `prefer` and `require`: the handshake is checked (the server proves it holds the key of the
/// certificate it sent), the certificate is not.
#[derive(Debug)]
struct Unchecked {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain to a trusted CA is checked, the name in the certificate is not.
/// The web PKI verifier checks the chain first and the name last, so a name error means the
/// chain was good.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_tls_parameters_leave_the_url_and_the_rest_stays() {
        let (url, settings) = split(
            "postgres://u:p%40ss@db:5432/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
            no_env,
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p%40ss@db:5432/x?application_name=a&connect_timeout=3"
        );
        assert_eq!(settings.mode, Mode::VerifyFull);
        assert_eq!(settings.roots, Roots::File(PathBuf::from("/etc/ca.pem")));
        let (url, settings) = split("postgres://db/x?sslmode=disable", no_env).unwrap();
        assert_eq!(url, "postgres://db/x");
        assert_eq!(settings.driver_mode(), SslMode::Disable);
    }

    #[test]
    fn the_modes_follow_libpq() {
        let mode = |url: &str| split(url, no_env).map(|(_, s)| s.mode);
        assert_eq!(mode("postgres://db/x"), Ok(Mode::Prefer));
        assert_eq!(mode("postgres://db/x?sslmode=require"), Ok(Mode::Require));
        // A CA file makes require verify-ca, as libpq does for backwards compatibility.
        assert_eq!(
            mode("postgres://db/x?sslmode=require&sslrootcert=ca.pem"),
            Ok(Mode::VerifyCa)
        );
        // `system` roots default to verify-full and refuse a weaker mode.
        assert_eq!(
            mode("postgres://db/x?sslrootcert=system"),
            Ok(Mode::VerifyFull)
        );
        assert!(
            mode("postgres://db/x?sslrootcert=system&sslmode=require")
                .unwrap_err()
                .contains("verify-full")
        );
        assert!(
            mode("postgres://db/x?sslmode=verify-ca")
                .unwrap_err()
                .contains("sslrootcert")
        );
        assert_eq!(mode("postgres://db/x?sslmode=allow"), Ok(Mode::Allow));
        assert!(
            mode("postgres://db/x?sslmode=bogus")
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            mode("postgres://db/x?sslcert=c.pem")
                .unwrap_err()
                .contains("sslcert needs sslkey")
        );
        assert!(
            mode("postgres://db/x?sslcert=c.pem&sslkey=k.pem&sslmode=disable")
                .unwrap_err()
                .contains("needs TLS")
        );
        for refused in ["sslpassword=x", "sslcertmode=require", "sslcertmode=bogus"] {
            let url = format!("postgres://db/x?sslcert=c.pem&sslkey=k.pem&{refused}");
            assert!(mode(&url).is_err(), "{refused}");
        }
        assert_eq!(
            split("postgres://db/x?sslmode=verify-full", no_env)
                .unwrap()
                .1
                .roots,
            Roots::Unset
        );
    }

    #[test]
    fn the_environment_fills_in_what_the_url_does_not_say() {
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify-full".to_string()),
            "PGSSLROOTCERT" => Some("/ca.pem".to_string()),
            _ => None,
        };
        let (_, settings) = split("postgres://db/x", env).unwrap();
        assert_eq!(settings.mode, Mode::VerifyFull);
        assert_eq!(settings.roots, Roots::File(PathBuf::from("/ca.pem")));
        let (_, settings) = split("postgres://db/x?sslmode=disable", env).unwrap();
        assert_eq!(settings.mode, Mode::Disable);
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let settings = Settings {
            mode: Mode::VerifyFull,
            roots: Roots::File(missing.clone()),
            client: None,
        };
        let err = settings.connector().err().unwrap();
        assert!(err.contains("cannot be read"), "{err}");
        std::fs::write(&missing, "not a certificate").unwrap();
        let err = settings.connector().err().unwrap();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_client_certificate_comes_from_the_url_or_the_environment_and_sslcertmode_disable_drops_it()
    {
        let client = |url: &str, env: &dyn Fn(&str) -> Option<String>| {
            split(url, env).map(|(url, s)| (url, s.client))
        };
        let (url, cert) = client(
            "postgres://db/x?sslcert=%2Fetc%2Fc.pem&sslkey=%2Fetc%2Fk.pem&application_name=a",
            &no_env,
        )
        .unwrap();
        assert_eq!(url, "postgres://db/x?application_name=a");
        assert_eq!(
            cert,
            Some(ClientCert {
                cert: "/etc/c.pem".into(),
                key: "/etc/k.pem".into()
            })
        );
        let env = |name: &str| match name {
            "PGSSLCERT" => Some("c.pem".to_string()),
            "PGSSLKEY" => Some("k.pem".to_string()),
            _ => None,
        };
        assert!(client("postgres://db/x", &env).unwrap().1.is_some());
        assert_eq!(
            client("postgres://db/x?sslcertmode=disable", &env)
                .unwrap()
                .1,
            None
        );
    }

    #[test]
    fn a_key_readable_by_others_is_refused_as_libpq_refuses_it() {
        assert!(key_mode_allowed(0o100600, false));
        assert!(key_mode_allowed(0o100400, false));
        assert!(!key_mode_allowed(0o100640, false));
        assert!(key_mode_allowed(0o100640, true));
        assert!(!key_mode_allowed(0o100644, true));
        assert!(!key_mode_allowed(0o100604, false));
    }

    #[test]
    fn client_files_that_are_missing_open_or_encrypted_are_clear_errors() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let settings = |cert: &std::path::Path, key: &std::path::Path| Settings {
            mode: Mode::Require,
            roots: Roots::Unset,
            client: Some(ClientCert {
                cert: cert.into(),
                key: key.into(),
            }),
        };
        let err = settings(&cert, &key).connector().err().unwrap();
        assert!(
            err.contains("sslcert") && err.contains("cannot be read"),
            "{err}"
        );
        let made = rcgen::generate_simple_self_signed(vec!["phasegate".to_string()]).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = settings(&cert, &key).connector().err().unwrap();
        assert!(err.contains("group or world access"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(settings(&cert, &key).connector().is_ok());
        std::fs::write(
            &key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = settings(&cert, &key).connector().err().unwrap();
        assert!(err.contains("encrypted"), "{err}");
    }

    /// The settings' connector and mode on a real server with TLS: is the session encrypted?
    fn encrypted(url: &str) -> Result<bool, String> {
        let (driver_url, settings) = split(url, no_env)?;
        let connector = settings.connector()?;
        let mut config: ::postgres::Config = driver_url.parse().map_err(|e| format!("{e}"))?;
        config.ssl_mode(settings.driver_mode());
        let attempt = config.connect(connector.clone());
        let mut client = match attempt {
            Err(_) if settings.tls_after_plain() => {
                config.ssl_mode(SslMode::Require);
                config.connect(connector)
            }
            made => made,
        }
        .map_err(|e| describe(&e))?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    }

    #[test]
    fn each_mode_encrypts_or_refuses_as_libpq_documents() {
        use crate::test_postgres::{Admit, Postgres};
        let server = Postgres::start_tls(Admit::Both);
        let url = server.database();
        let ca = server.ca_file();
        let ca = ca.display();
        assert_eq!(encrypted(&format!("{url}?sslmode=disable")), Ok(false));
        // allow: plain where the server takes it ...
        assert_eq!(encrypted(&format!("{url}?sslmode=allow")), Ok(false));
        assert_eq!(encrypted(&format!("{url}?sslmode=prefer")), Ok(true));
        assert_eq!(encrypted(&url), Ok(true));
        assert_eq!(encrypted(&format!("{url}?sslmode=require")), Ok(true));
        assert_eq!(
            encrypted(&format!("{url}?sslmode=verify-ca&sslrootcert={ca}")),
            Ok(true)
        );
        assert_eq!(
            encrypted(&format!("{url}?sslmode=verify-full&sslrootcert={ca}")),
            Ok(true)
        );
        // TLS does not apply to a Unix socket: `prefer` (the default) connects there in plain.
        let socket = server
            .socket_dir()
            .display()
            .to_string()
            .replace('/', "%2F");
        let local = url.replace("@127.0.0.1:", &format!("@{socket}:"));
        assert_eq!(encrypted(&local), Ok(false));
        // ... and TLS where it takes TLS only.
        let tls_only = Postgres::start_tls(Admit::TlsOnly);
        assert_eq!(
            encrypted(&format!("{}?sslmode=allow", tls_only.database())),
            Ok(true)
        );
        // verify-ca checks the chain, not the name: through a name the certificate lacks
        // (`127.0.0.1` in its IPv4-mapped IPv6 form is another name to the check; reached only
        // where the kernel has IPv6) ...
        let renamed = url.replace("@127.0.0.1:", "@[::ffff:127.0.0.1]:");
        let reachable = encrypted(&format!("{renamed}?sslmode=disable")).is_ok();
        if reachable {
            assert_eq!(
                encrypted(&format!("{renamed}?sslmode=verify-ca&sslrootcert={ca}")),
                Ok(true)
            );
            // ... which verify-full refuses.
            let err =
                encrypted(&format!("{renamed}?sslmode=verify-full&sslrootcert={ca}")).unwrap_err();
            assert!(err.contains("not valid for name"), "{err}");
        }
    }
}
