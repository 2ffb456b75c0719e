//! TLS for the PostgreSQL connection: the libpq `sslmode` and `sslrootcert` settings read from
//! the store's URL (or `PGSSLMODE` / `PGSSLROOTCERT`), turned into a rustls client.
//!
//! Each mode means what libpq documents in "SSL Support", table "SSL Mode Descriptions"
//! (https://www.postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-SSLMODE-STATEMENTS):
//!
//! - `disable`: plain TCP only.
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
//! is refused (any public certificate would pass it). `allow` and client certificates (`sslcert`,
//! `sslkey`) are not supported and are refused with a clear error rather than ignored.

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
            "allow" => Err("sslmode=allow (plain first, TLS only if the server insists) is not supported: use prefer, require, verify-ca or verify-full".into()),
            other => Err(format!(
                "sslmode={other} is not a mode phasegate knows: use disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }

    /// What the driver negotiates: whether TLS is tried, and whether plain is accepted.
    fn driver(self) -> SslMode {
        match self {
            Mode::Disable => SslMode::Disable,
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
}

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
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode_str(key).decode_utf8_lossy();
        let value = || percent_decode_str(value).decode_utf8_lossy().into_owned();
        match key.as_ref() {
            "sslmode" => mode = Some(value()),
            "sslrootcert" => root = Some(value()),
            "sslcert" | "sslkey" | "sslpassword" | "sslcertmode" => {
                return Err(format!(
                    "{key}: client certificates are not supported; authenticate with a password (PGPASSWORD)"
                ));
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
        (Mode::Prefer | Mode::Require | Mode::VerifyCa | Mode::Disable, Roots::System) => {
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
    let stripped = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((stripped, Settings { mode, roots }))
}

fn name(mode: Mode) -> &'static str {
    match mode {
        Mode::Disable => "disable",
        Mode::Prefer => "prefer",
        Mode::Require => "require",
        Mode::VerifyCa => "verify-ca",
        Mode::VerifyFull => "verify-full",
    }
}

impl Settings {
    /// The driver's `sslmode`.
    pub fn driver_mode(&self) -> SslMode {
        self.mode.driver()
    }

    /// The rustls connector for these settings (the CA file read now, so that a missing or
    /// empty one is an error when the store is opened).
    pub fn connector(&self) -> Result<Connector, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Unchecked {
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
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, String> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Roots::File(path) => {
                let shown = path.display();
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("sslrootcert {shown} cannot be read: {e}"))?;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(file, MAX_ROOT_FILE + 1),
                    &mut bytes,
                )
                .map_err(|e| format!("sslrootcert {shown} cannot be read: {e}"))?;
                if bytes.len() as u64 > MAX_ROOT_FILE {
                    return Err(format!(
                        "sslrootcert {shown} is larger than {MAX_ROOT_FILE} bytes: not a CA file"
                    ));
                }
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
        assert!(
            mode("postgres://db/x?sslmode=allow")
                .unwrap_err()
                .contains("allow")
        );
        assert!(
            mode("postgres://db/x?sslmode=bogus")
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            mode("postgres://db/x?sslcert=c.pem")
                .unwrap_err()
                .contains("client certificates")
        );
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
        };
        let err = settings.connector().err().unwrap();
        assert!(err.contains("cannot be read"), "{err}");
        std::fs::write(&missing, "not a certificate").unwrap();
        let err = settings.connector().err().unwrap();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    /// The settings' connector and mode on a real server with TLS: is the session encrypted?
    fn encrypted(url: &str) -> Result<bool, String> {
        let (driver_url, settings) = split(url, no_env)?;
        let connector = settings.connector()?;
        let mut config: ::postgres::Config = driver_url.parse().map_err(|e| format!("{e}"))?;
        config.ssl_mode(settings.driver_mode());
        let mut client = config.connect(connector).map_err(|e| describe(&e))?;
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
