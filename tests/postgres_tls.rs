//! The binary on a PostgreSQL store over TLS: `verify-full` with the server's CA runs a whole
//! rollout, a wrong CA and a server without TLS are clear errors that never show the password,
//! and a server that takes TLS only refuses a plain connection. Every test runs a real server
//! with `ssl=on` and a certificate made for it (`common::postgres::Postgres::start_tls`).

mod common;

use common::postgres::{Admit, Postgres, shared};
use common::{Phasegate, code, stderr, stdout};

/// `url` with these query parameters added.
fn with_params(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// The binary with its store at `url` (and its local files in a directory of the test's own).
fn on(url: &str) -> Phasegate {
    let pg = Phasegate::offline();
    let data = pg.dir.path().join("data").to_str().unwrap().to_string();
    pg.with_env("PHASEGATE_STORE", url)
        .with_env("XDG_DATA_HOME", &data)
        .without_env("PGSSLMODE")
        .without_env("PGSSLROOTCERT")
        .without_env("PGSSLCERT")
        .without_env("PGSSLKEY")
        .without_env("PGSSLCERTMODE")
}

fn output(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn verify_full_with_the_servers_ca_runs_a_rollout_to_completion_over_tls() {
    // TLS only: a plain connection would be refused, so every command went over TLS.
    let server = Postgres::start_tls(Admit::TlsOnly);
    let ca = server.ca_file();
    let url = with_params(
        &server.database(),
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let pg = on(&url);
    let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
    let id = stdout(&out).trim().to_string();
    pg.complete(&id);
    assert_eq!(pg.status(&id)["status"], "completed");
    let out = pg.run(&["history", &id, "--verify"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
    // The CA may come from PGSSLROOTCERT as well, and `localhost` is a name the certificate has.
    let by_env = server.database().replace("@127.0.0.1:", "@localhost:");
    let out = on(&with_params(&by_env, "sslmode=verify-full"))
        .with_env("PGSSLROOTCERT", ca.to_str().unwrap())
        .run(&["status"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
}

#[test]
fn a_wrong_ca_is_a_clear_error_that_never_shows_the_password() {
    let server = Postgres::start_tls(Admit::Both);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("other-ca.pem");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&wrong, other.pem()).unwrap();
    let url = server
        .database()
        .replace("phasegate@", "phasegate:hunter2-secret@");
    for mode in ["verify-full", "verify-ca", "require"] {
        let out = on(&with_params(
            &url,
            &format!("sslmode={mode}&sslrootcert={}", wrong.display()),
        ))
        .run(&["status"]);
        let text = output(&out);
        assert_ne!(code(&out), 0, "{mode}: {text}");
        assert!(!text.contains("hunter2-secret"), "{text}");
        assert!(text.contains("TLS"), "{mode}: {text}");
        assert!(text.contains("UnknownIssuer"), "{mode}: {text}");
    }
    // Without a CA, `require` encrypts and checks no certificate, as libpq's does.
    let out = on(&with_params(&server.database(), "sslmode=require")).run(&["status"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
}

#[test]
fn require_against_a_server_without_tls_fails_clearly() {
    let server = shared();
    let url = server
        .database()
        .replace("phasegate@", "phasegate:hunter2-secret@");
    let out = on(&with_params(&url, "sslmode=require")).run(&["status"]);
    let text = output(&out);
    assert_ne!(code(&out), 0, "{text}");
    assert!(text.contains("does not support TLS"), "{text}");
    assert!(!text.contains("hunter2-secret"), "{text}");
    // `prefer`, the default, falls back to plain when the server declines TLS.
    let out = on(&with_params(&server.database(), "sslmode=prefer")).run(&["status"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
}

#[test]
fn a_server_that_takes_tls_only_refuses_a_plain_connection() {
    let server = Postgres::start_tls(Admit::TlsOnly);
    let out = on(&with_params(&server.database(), "sslmode=disable")).run(&["status"]);
    let text = output(&out);
    assert_ne!(code(&out), 0, "{text}");
    assert!(text.contains("no encryption"), "{text}");
}

#[test]
fn a_client_certificate_signs_in_where_the_server_takes_certificates_only() {
    // `cert` authentication: no password, the certificate's common name is the user.
    let server = Postgres::start_tls(Admit::ClientCert);
    let (cert, key) = server.client_cert_files();
    let ca = server.ca_file();
    let url = with_params(
        &server.database(),
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let pg = on(&url);
    let out = pg.run(&["start", "plans/windows-baseline.toml", "--by", "alice"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
    let id = stdout(&out).trim().to_string();
    assert_eq!(pg.status(&id)["status"], "running");
    // Without it the server refuses, and says so.
    let without = with_params(
        &server.database(),
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let out = on(&without).run(&["status"]);
    assert_ne!(code(&out), 0, "{}", output(&out));
    assert!(output(&out).contains("certificate"), "{}", output(&out));
    // The same files from the environment, and `allow` over TLS where plain is refused.
    let out = on(&with_params(&server.database(), "sslmode=allow"))
        .with_env("PGSSLCERT", cert.to_str().unwrap())
        .with_env("PGSSLKEY", key.to_str().unwrap())
        .run(&["status"]);
    assert_eq!(code(&out), 0, "{}", output(&out));
}

#[test]
fn a_tls_setting_phasegate_cannot_honour_is_refused_before_connecting() {
    let server = shared();
    for (params, says) in [
        ("sslmode=verify-ca", "sslrootcert"),
        ("sslcert=client.pem", "sslcert needs sslkey"),
        (
            "sslcert=c.pem&sslkey=k.pem&sslpassword=x",
            "encrypted client key",
        ),
        (
            "sslmode=verify-full&sslrootcert=missing-ca.pem",
            "missing-ca.pem",
        ),
    ] {
        let out = on(&with_params(&server.database(), params)).run(&["status"]);
        let text = output(&out);
        assert_ne!(code(&out), 0, "{params}: {text}");
        assert!(text.contains(says), "{params}: {text}");
    }
}

#[test]
fn verify_full_without_a_ca_file_checks_against_the_systems_roots() {
    // The system's roots are read as the platform does; `SSL_CERT_FILE` names the bundle, here
    // one holding only the test CA (as a managed server's public root is in the real bundle).
    let server = Postgres::start_tls(Admit::TlsOnly);
    let ca = server.ca_file();
    for params in ["sslmode=verify-full", "sslrootcert=system"] {
        let out = on(&with_params(&server.database(), params))
            .with_env("SSL_CERT_FILE", ca.to_str().unwrap())
            .run(&["status"]);
        assert_eq!(code(&out), 0, "{params}: {}", output(&out));
    }
    // A bundle without the server's CA: the certificate is refused.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("bundle.pem");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&other, cert.pem()).unwrap();
    let out = on(&with_params(&server.database(), "sslmode=verify-full"))
        .with_env("SSL_CERT_FILE", other.to_str().unwrap())
        .run(&["status"]);
    assert_ne!(code(&out), 0, "{}", output(&out));
    assert!(output(&out).contains("UnknownIssuer"), "{}", output(&out));
}
