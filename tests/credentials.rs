//! Signing in without a client secret: a certificate (PEM and PKCS#12), a managed identity and
//! workload identity federation each drive a whole rollout on the Graph emulator, and a wrong
//! certificate fails with the service's own error while no key material reaches any output or
//! the store. The rollouts run on both store backends (`on_both_stores!`); the wrong-certificate
//! test reads sled's files for key material, so it stays on sled.

mod common;

use std::path::Path;

use common::{Emulator, Phasegate, code, stderr, stdout};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const ISSUER: &str = "https://oidc.cluster.example/issuer";
const SUBJECT: &str = "system:serviceaccount:change:phasegate";

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/credentials")
        .join(name)
        .display()
        .to_string()
}

/// An emulator whose app has a registered certificate and a federated credential.
fn emulator() -> Emulator {
    Emulator::spawn(&[
        "--devices",
        "1500",
        "--ca-rate",
        "50",
        "--client-certificate",
        &fixture("app.crt.pem"),
        "--federated-issuer",
        ISSUER,
        "--federated-subject",
        SUBJECT,
        "--federated-issuer-key",
        &fixture("issuer.pub.pem"),
    ])
}

/// The Graph example plan signing in with `credential` instead of the client secret.
fn plan_with(emulator: &Emulator, credential: &str) -> Phasegate {
    let credential = credential.to_string();
    let pg = Phasegate::with_plan(emulator, "windows-baseline-graph.toml", 50.0, move |text| {
        assert!(text.contains("client_secret_env = \"PHASEGATE_GRAPH_SECRET\""));
        text.replace(
            "client_secret_env = \"PHASEGATE_GRAPH_SECRET\"",
            &credential,
        )
    });
    pg.without_env("PHASEGATE_GRAPH_SECRET")
}

fn completes(pg: &Phasegate) {
    let id = pg.start();
    pg.complete(&id);
    assert_eq!(pg.status(&id)["status"], "completed");
}

on_both_stores! {
    fn a_certificate_in_pem_signs_in_for_a_whole_rollout() {
        let emulator = emulator();
        completes(&plan_with(
            &emulator,
            &format!("client_certificate = \"{}\"", fixture("app.pem")),
        ));
    }
}

on_both_stores! {
    fn a_certificate_in_pkcs12_opens_with_its_password_from_the_environment() {
        let emulator = emulator();
        let pg = plan_with(
            &emulator,
            &format!(
                "client_certificate = \"{}\"\nclient_certificate_password_env = \"PHASEGATE_CERT_PASSWORD\"",
                fixture("app.p12")
            ),
        );
        // Without the password, `start` says which variable to set.
        let out = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
        assert_ne!(code(&out), 0);
        assert!(
            stderr(&out).contains("put it in the environment variable PHASEGATE_CERT_PASSWORD"),
            "{}",
            stderr(&out)
        );
        completes(&pg.with_env("PHASEGATE_CERT_PASSWORD", "test-pkcs12-password"));
    }
}

on_both_stores! {
    fn a_managed_identity_signs_in_through_the_metadata_service() {
        let emulator = emulator();
        completes(&plan_with(
            &emulator,
            &format!(
                "managed_identity = true\nidentity_endpoint = \"{}/metadata/identity/oauth2/token\"",
                emulator.url
            ),
        ));
    }
}

on_both_stores! {
    fn a_federated_token_from_a_file_signs_in_and_is_read_again_for_each_token() {
        let emulator = emulator();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("azure-identity-token");
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": SUBJECT, "aud": ["api://AzureADTokenExchange"],
            "iat": 1_700_000_000, "exp": 4_100_000_000i64,
        });
        let key = std::fs::read(fixture("issuer.key.pem")).unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&key).unwrap(),
        )
        .unwrap();
        std::fs::write(&token_file, &token).unwrap();
        let pg = plan_with(
            &emulator,
            &format!(
                "workload_identity = true\nfederated_token_file = \"{}\"",
                token_file.display()
            ),
        );
        completes(&pg);
        // A token for another subject in the same file: the next sign-in uses it, and is refused
        // with the service's reason.
        let mut other = claims.clone();
        other["sub"] = "system:serviceaccount:change:intruder".into();
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &other,
            &EncodingKey::from_rsa_pem(&key).unwrap(),
        )
        .unwrap();
        std::fs::write(&token_file, other).unwrap();
        let again = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
        let mut said = format!("{}{}", stdout(&again), stderr(&again));
        if code(&again) == 0 {
            let id = stdout(&again).trim().to_string();
            let out = pg.run(&["run", &id]);
            said.push_str(&format!("{}{}", stderr(&out), pg.status(&id)));
        }
        assert!(said.contains("AADSTS700213"), "{said}");
    }
}

on_both_stores! {
    fn a_wrong_certificate_fails_with_the_services_error_and_no_key_material_anywhere() {
        let emulator = emulator();
        let pg = plan_with(
            &emulator,
            &format!("client_certificate = \"{}\"", fixture("other.pem")),
        );
        let start = pg.run(&["start", pg.plan.to_str().unwrap(), "--by", "alice"]);
        let mut outputs = vec![stdout(&start), stderr(&start)];
        let id = stdout(&start).trim().to_string();
        let run = pg.run(&["run", &id]);
        outputs.push(stdout(&run));
        outputs.push(stderr(&run));
        assert_ne!(
            code(&run),
            0,
            "signing in with an unregistered certificate must fail"
        );
        let status = pg.run(&["status", &id, "--output", "json"]);
        let history = pg.run(&["history", &id, "--output", "json"]);
        outputs.extend([stdout(&status), stdout(&history), stderr(&status)]);
        let said = outputs.join("\n");
        assert!(
            said.contains("AADSTS700027"),
            "the service's error is shown: {said}"
        );
        assert!(said.contains("not registered"), "{said}");
        // No line of the private key, in any output or any file of the store.
        let key_lines = key_material(&fixture("other.pem"));
        for line in &key_lines {
            assert!(!said.contains(line.as_str()), "key material in the output");
        }
        for (place, bytes) in pg.store().contents() {
            let text = String::from_utf8_lossy(&bytes);
            for line in &key_lines {
                assert!(!text.contains(line.as_str()), "key material in {place}");
            }
        }
    }
}

/// The base64 lines of a PEM file's private key.
fn key_material(pem_file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(pem_file).unwrap();
    let key = &text[text.find("-----BEGIN PRIVATE KEY-----").unwrap()..];
    key.lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 40)
        .map(str::to_string)
        .collect()
}
