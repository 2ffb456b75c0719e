//! Asking DNS for the enrolment CNAMEs, with hickory's resolver: the system's configuration, or
//! one server (`--resolver`, `[preflight] resolver`) over UDP and TCP. Every lookup is answered
//! from the network (no cache shared between questions), so a TTL is the one the server gave.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use super::checks::{CnameAnswer, DomainRecords, record_names};

/// How long one question may take before it counts as failed (each of two attempts).
const TIMEOUT: Duration = Duration::from_secs(3);

pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// A resolver asking `server`, or the system's name servers when `None`.
    pub fn new(server: Option<SocketAddr>) -> Result<Dns, String> {
        let mut builder = match server {
            Some(addr) => {
                let mut name_server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut name_server.connections {
                    connection.port = addr.port();
                }
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![name_server]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = TIMEOUT;
        options.attempts = 2;
        options.cache_size = 0;
        // The names asked are absolute: no search domains appended.
        options.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))?;
        Ok(Dns { resolver })
    }

    /// The two enrolment records of `domain`.
    pub async fn enrolment_records(&self, domain: &str) -> DomainRecords {
        let (enrollment, registration) = record_names(domain);
        DomainRecords {
            domain: domain.to_string(),
            enrollment: self.cname(&enrollment).await,
            registration: self.cname(&registration).await,
        }
    }

    /// The CNAME of `name` (absolute), as the server answered.
    pub async fn cname(&self, name: &str) -> CnameAnswer {
        let absolute = format!("{}.", name.trim_end_matches('.'));
        match self
            .resolver
            .lookup(absolute.as_str(), RecordType::CNAME)
            .await
        {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .find_map(|record| match &record.data {
                    RData::CNAME(target) => Some(CnameAnswer::Found {
                        target: target.0.to_ascii().trim_end_matches('.').to_string(),
                        ttl: record.ttl,
                    }),
                    _ => None,
                })
                .unwrap_or(CnameAnswer::Missing),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => CnameAnswer::Missing,
            Err(e) => CnameAnswer::Failed(e.to_string()),
        }
    }
}
