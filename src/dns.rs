//! TXT lookups for domain verification, revalidation and diagnosis.
//!
//! Lookup results are sorted into three kinds, because each leads to a different action: records
//! found, no such records (the owner must publish them), or no answer at all (a resolver
//! or name-server problem that says nothing about the records, so nothing may be
//! concluded from it).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::configuration::DnsSettings;

/// How long one lookup may take, all retries included.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of one TXT lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtAnswer {
    /// One entry per TXT record, its character-strings joined as RFC 7208 and RFC 6376 require.
    Records(Vec<String>),
    /// The name does not exist, or has no TXT record. `negative_ttl` is how long resolvers
    /// may keep returning that result after the record is published.
    NoRecords { negative_ttl: Option<u32> },
    /// The lookup failed: a timeout, SERVFAIL or REFUSED. It tells nothing about the records.
    Unavailable(String),
}

/// A source of TXT lookup results: the DNS in production, a table in unit tests.
#[async_trait::async_trait]
pub trait TxtSource: Send + Sync {
    async fn txt(&self, name: &str) -> TxtAnswer;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}; set OUTBOUND_DNS_SERVERS to IP[:PORT] of reachable resolvers")]
pub struct ResolverError(String);

/// A resolver over `dns.servers`, or the system's when that is empty. It keeps no cache, so
/// a record removed or fixed is seen on the next check.
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    pub fn new(settings: &DnsSettings) -> Result<Self, ResolverError> {
        let mut builder = if settings.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|err| ResolverError(err.to_string()))?
        } else {
            let servers = settings.servers.iter().map(name_server).collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
        };
        let options = builder.options_mut();
        options.cache_size = 0;
        options.timeout = LOOKUP_TIMEOUT / 2;
        options.attempts = 2;
        // An RSA-2048 DKIM record does not fit a plain 512-byte UDP answer.
        options.edns0 = true;
        let inner = builder.build().map_err(|err| ResolverError(err.to_string()))?;
        Ok(Resolver { inner })
    }
}

fn name_server(addr: &SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

#[async_trait::async_trait]
impl TxtSource for Resolver {
    async fn txt(&self, name: &str) -> TxtAnswer {
        // A trailing dot keeps the search list of resolv.conf out of the lookup.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, self.inner.txt_lookup(fqdn)).await;
        match lookup {
            Err(_) => TxtAnswer::Unavailable(format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs())),
            Ok(Ok(found)) => {
                let records: Vec<String> = found
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::TXT(txt) => Some(txt.txt_data.iter().map(|part| String::from_utf8_lossy(part)).collect()),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    TxtAnswer::NoRecords { negative_ttl: None }
                } else {
                    TxtAnswer::Records(records)
                }
            }
            Ok(Err(NetError::Dns(DnsError::NoRecordsFound(no_records)))) => TxtAnswer::NoRecords { negative_ttl: no_records.negative_ttl },
            Ok(Err(err)) => TxtAnswer::Unavailable(err.to_string()),
        }
    }
}

#[cfg(test)]
pub mod fixed {
    //! A [`TxtSource`] answering from a table, for unit tests of the checks.

    use std::collections::HashMap;

    use super::{TxtAnswer, TxtSource};

    #[derive(Default)]
    pub struct FixedTxt {
        pub answers: HashMap<String, TxtAnswer>,
    }

    impl FixedTxt {
        pub fn with(mut self, name: &str, records: &[&str]) -> Self {
            self.answers.insert(name.to_string(), TxtAnswer::Records(records.iter().map(|r| r.to_string()).collect()));
            self
        }
    }

    #[async_trait::async_trait]
    impl TxtSource for FixedTxt {
        async fn txt(&self, name: &str) -> TxtAnswer {
            self.answers.get(name).cloned().unwrap_or(TxtAnswer::NoRecords { negative_ttl: None })
        }
    }
}
