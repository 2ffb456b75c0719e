//! Reading the Apple MDM push certificate's expiry from a local file: PEM, DER, or PKCS#12 (the
//! `.p12` / `.pfx` that Apple's portal and Keychain export), whose password comes from a
//! `PHASEGATE_…` environment variable. x509-parser reads the certificate, p12-keystore the
//! PKCS#12 container; neither trusts the file's contents beyond its validity dates.

use std::path::Path;

use p12_keystore::{KeyStore, KeyStoreEntry, Pkcs12ImportPolicy};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::checks::CertificateExpiry;
use crate::domain::time::Timestamp;

/// The largest certificate file read: a push certificate with its chain is a few kilobytes.
const MAX_FILE: u64 = 1024 * 1024;

/// The expiry (`notAfter`) of the certificate in `path`. A PKCS#12 file needs its password in the
/// variable `password_env`.
pub fn expiry(path: &Path, password_env: Option<&str>) -> Result<CertificateExpiry, String> {
    let shown = path.display();
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the Apple push certificate {shown}: {e}"))?
        .len();
    if size > MAX_FILE {
        return Err(format!(
            "{shown} is {size} bytes: not a certificate (at most {MAX_FILE} bytes are read)"
        ));
    }
    let data = std::fs::read(path)
        .map_err(|e| format!("cannot read the Apple push certificate {shown}: {e}"))?;
    let pkcs12 = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("p12") || e.eq_ignore_ascii_case("pfx"));
    let not_after = if data.starts_with(b"-----BEGIN") {
        pem_not_after(&data)
    } else if pkcs12 {
        let password = password(password_env)?;
        pkcs12_not_after(&data, &password)
    } else {
        der_not_after(&data)
    }
    .map_err(|why| format!("{shown}: {why}"))?;
    Ok(CertificateExpiry {
        source: shown.to_string(),
        expires: not_after,
    })
}

fn password(env: Option<&str>) -> Result<String, String> {
    let Some(name) = env else {
        return Err(
            "a PKCS#12 certificate needs its password: name the variable holding it in \
             [preflight] apns_certificate_password_env"
                .into(),
        );
    };
    std::env::var(name).map_err(|_| {
        format!("the PKCS#12 certificate's password is not set: put it in the environment variable {name}")
    })
}

fn der_not_after(der: &[u8]) -> Result<Timestamp, String> {
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|e| format!("not a PEM, DER or PKCS#12 certificate ({e})"))?;
    timestamp(certificate.validity().not_after.timestamp())
}

fn pem_not_after(data: &[u8]) -> Result<Timestamp, String> {
    for pem in x509_parser::pem::Pem::iter_from_buffer(data) {
        let pem = pem.map_err(|e| format!("not a readable PEM file ({e})"))?;
        if pem.label == "CERTIFICATE" {
            return der_not_after(&pem.contents);
        }
    }
    Err("the PEM file holds no CERTIFICATE".into())
}

fn pkcs12_not_after(data: &[u8], password: &str) -> Result<Timestamp, String> {
    let store =
        KeyStore::from_pkcs12(data, password, Pkcs12ImportPolicy::Relaxed).map_err(|e| {
            format!("cannot open the PKCS#12 file (wrong password, or not PKCS#12): {e}")
        })?;
    let leaf = match store.private_key_chain() {
        Some((_, chain)) if !chain.certs().is_empty() => chain.certs()[0].as_der().to_vec(),
        _ => store
            .entries()
            .find_map(|(_, entry)| match entry {
                KeyStoreEntry::Certificate(c) => Some(c.as_der().to_vec()),
                _ => None,
            })
            .ok_or("the PKCS#12 file holds no certificate")?,
    };
    der_not_after(&leaf)
}

fn timestamp(seconds: i64) -> Result<Timestamp, String> {
    seconds
        .checked_mul(1000)
        .map(Timestamp::from_millis)
        .ok_or_else(|| "the certificate's expiry is out of range".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_after: (i32, u8, u8)) -> rcgen::Certificate {
        let mut params = rcgen::CertificateParams::new(vec!["apns.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn pem_and_der_files_give_the_certificates_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let cert = certificate((2027, 3, 4));
        let expected = Timestamp::parse_rfc3339("2027-03-04T00:00:00Z").unwrap();
        let pem = dir.path().join("apns.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        assert_eq!(expiry(&pem, None).unwrap().expires, expected);
        let der = dir.path().join("apns.cer");
        std::fs::write(&der, cert.der()).unwrap();
        let read = expiry(&der, None).unwrap();
        assert_eq!(read.expires, expected);
        assert!(read.source.ends_with("apns.cer"));
    }

    #[test]
    fn what_is_not_a_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("apns.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(expiry(&junk, None).unwrap_err().contains("no CERTIFICATE"));
        let junk = dir.path().join("apns.cer");
        std::fs::write(&junk, b"\x00\x01not der").unwrap();
        assert!(
            expiry(&junk, None)
                .unwrap_err()
                .contains("not a PEM, DER or PKCS#12")
        );
        let p12 = dir.path().join("apns.p12");
        std::fs::write(&p12, b"\x30\x03\x02\x01\x03").unwrap();
        assert!(
            expiry(&p12, None)
                .unwrap_err()
                .contains("apns_certificate_password_env")
        );
        let missing = dir.path().join("none.pem");
        assert!(expiry(&missing, None).unwrap_err().contains("cannot read"));
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_FILE + 1) as usize]).unwrap();
        assert!(
            expiry(&big, None)
                .unwrap_err()
                .contains("not a certificate")
        );
    }
}
