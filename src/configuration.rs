//! Typed settings from defaults, an optional TOML file and `OUTBOUND_*` variables.
//!
//! Precedence: environment beats file beats default. Every key is also settable as
//! `OUTBOUND_<SECTION>__<KEY>`, and the service URLs have the short aliases of
//! [`ENV_ALIASES`]. Loading collects every problem before it fails, so an operator
//! fixes a broken deployment in one pass instead of one restart per typo.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

/// The defaults, embedded so that the binary runs with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Short environment names for the settings that every deployment sets.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("OUTBOUND_DATABASE_URL", "database.url"),
    ("OUTBOUND_AMQP_URL", "amqp.url"),
    ("OUTBOUND_SMTP_URL", "smtp.url"),
    ("OUTBOUND_DNS_SERVERS", "dns.servers"),
    ("OUTBOUND_METRICS_ADDR", "metrics.addr"),
    ("OUTBOUND_KEY_ENCRYPTION_KEY", "keys.encryption_key"),
];

/// A setting that a command needs and that has no default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    SmtpUrl,
    KeyEncryptionKey,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub smtp: SmtpSettings,
    pub dns: DnsSettings,
    pub metrics: MetricsSettings,
    pub keys: KeySettings,
    pub retry: RetrySettings,
    pub worker: WorkerSettings,
    pub domains: DomainSettings,
    pub limits: LimitSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: String,
    pub heartbeat: Duration,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub url: Option<SmtpTarget>,
    pub timeout: Duration,
    pub max_per_second: u32,
    pub max_connections: usize,
    pub hello_name: String,
}

/// The destination of signed messages.
#[derive(Clone, PartialEq, Eq)]
pub enum SmtpTarget {
    Relay {
        host: String,
        port: u16,
        tls: TlsMode,
        credentials: Option<(String, String)>,
    },
    /// The embedded default: every message is written as a `.eml` file.
    Directory(PathBuf),
}

impl fmt::Debug for SmtpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Relay { host, port, tls, credentials } => f
                .debug_struct("Relay")
                .field("host", host)
                .field("port", port)
                .field("tls", tls)
                .field("credentials", &credentials.as_ref().map(|(user, _)| (user, "<redacted>")))
                .finish(),
            Self::Directory(path) => f.debug_tuple("Directory").field(path).finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain SMTP; for a relay on loopback or a trusted network only.
    None,
    /// STARTTLS after the greeting; the send fails if the relay does not offer it.
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Required,
}

#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Empty means the system resolvers from `/etc/resolv.conf`.
    pub servers: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub addr: SocketAddr,
}

#[derive(Clone)]
pub struct KeySettings {
    pub encryption_key: Option<KeyEncryptionKey>,
}

impl fmt::Debug for KeySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.encryption_key.as_ref().map(|_| "<redacted>");
        f.debug_struct("KeySettings").field("encryption_key", &shown).finish()
    }
}

/// The AES-256 key that encrypts DKIM private keys at rest. Its `Debug` never shows it.
#[derive(Clone)]
pub struct KeyEncryptionKey(pub [u8; 32]);

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub prefetch: u16,
    pub shutdown_grace: Duration,
    /// How long a worker owns a claimed request before another may take it over.
    pub lease: Duration,
    /// How often the worker looks for deferred requests that are due.
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct DomainSettings {
    pub spf_include: String,
    pub revalidate_interval: Duration,
    pub grace_period: Duration,
    /// How long a rotated-out DKIM key's record stays published before it is safe to remove.
    pub key_overlap: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub max_recipients: usize,
    pub max_message_size: usize,
    pub max_metadata_size: usize,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every problem found while loading, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// One raw value with where it came from, for error messages.
#[derive(Debug, Clone)]
struct RawValue {
    text: String,
    origin: String,
}

impl Settings {
    /// Loads settings from the defaults, `file` (or `OUTBOUND_CONFIG`) and the process
    /// environment, and checks that the settings in `required` are present.
    pub fn load(file: Option<&Path>, required: &[Requirement]) -> Result<Self, ConfigError> {
        let environment: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &environment, required)
    }

    /// Loads settings with an explicit environment, so tests need not touch the process's.
    pub fn load_from(
        file: Option<&Path>,
        environment: &[(String, String)],
        required: &[Requirement],
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut raw = BTreeMap::new();
        flatten_toml(DEFAULT_TOML, "config/default.toml", &mut raw, &mut problems);

        let config_file = file.map(Path::to_path_buf).or_else(|| {
            environment
                .iter()
                .find(|(name, _)| name == "OUTBOUND_CONFIG")
                .map(|(_, value)| PathBuf::from(value))
        });
        if let Some(path) = config_file {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let origin = path.display().to_string();
                    let known: Vec<String> = raw.keys().cloned().collect();
                    let mut from_file = BTreeMap::new();
                    flatten_toml(&text, &origin, &mut from_file, &mut problems);
                    for (key, value) in from_file {
                        if known.contains(&key) {
                            raw.insert(key, value);
                        } else {
                            problems.push(format!(
                                "unknown setting {key} in {origin}: remove it or check its spelling against config/default.toml"
                            ));
                        }
                    }
                }
                Err(err) => problems.push(format!(
                    "cannot read the configuration file {}: {err}; fix the path given with --config or OUTBOUND_CONFIG",
                    path.display()
                )),
            }
        }

        apply_environment(environment, &mut raw, &mut problems);
        let settings = Self::from_raw(&raw, &mut problems);
        for requirement in required {
            settings.check_requirement(*requirement, &mut problems);
        }

        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError { problems })
        }
    }

    fn check_requirement(&self, requirement: Requirement, problems: &mut Vec<String>) {
        match requirement {
            Requirement::SmtpUrl if self.smtp.url.is_none() => problems.push(
                "missing setting smtp.url: set OUTBOUND_SMTP_URL to smtp://host:port?tls=none|starttls|required or file:///some/dir"
                    .to_string(),
            ),
            Requirement::KeyEncryptionKey if self.keys.encryption_key.is_none() => problems.push(
                "missing setting keys.encryption_key: set OUTBOUND_KEY_ENCRYPTION_KEY to 32 random bytes as 64 hex digits or base64 (for example `openssl rand -hex 32`)"
                    .to_string(),
            ),
            _ => {}
        }
    }

    fn from_raw(raw: &BTreeMap<String, RawValue>, problems: &mut Vec<String>) -> Self {
        let mut reader = Reader { raw, problems };
        Settings {
            database: DatabaseSettings {
                url: reader.url("database.url", &["postgres", "postgresql"]),
                max_connections: reader.number("database.max_connections", 1, 1000),
            },
            amqp: AmqpSettings {
                url: reader.url("amqp.url", &["amqp", "amqps"]),
                heartbeat: reader.duration("amqp.heartbeat"),
            },
            smtp: SmtpSettings {
                url: reader.smtp_target("smtp.url"),
                timeout: reader.duration("smtp.timeout"),
                max_per_second: reader.number("smtp.max_per_second", 0, 1_000_000),
                max_connections: reader.number("smtp.max_connections", 1, 10_000),
                hello_name: reader.text("smtp.hello_name"),
            },
            dns: DnsSettings {
                servers: reader.socket_addrs("dns.servers", 53),
            },
            metrics: MetricsSettings {
                addr: reader.socket_addr("metrics.addr"),
            },
            keys: KeySettings {
                encryption_key: reader.encryption_key("keys.encryption_key"),
            },
            retry: RetrySettings {
                initial_delay: reader.duration("retry.initial_delay"),
                max_delay: reader.duration("retry.max_delay"),
                window: reader.duration("retry.window"),
            },
            worker: WorkerSettings {
                prefetch: reader.number("worker.prefetch", 1, 65_535),
                shutdown_grace: reader.duration("worker.shutdown_grace"),
                lease: reader.duration("worker.lease"),
                poll_interval: reader.duration("worker.poll_interval"),
            },
            domains: DomainSettings {
                spf_include: reader.text("domains.spf_include"),
                revalidate_interval: reader.duration("domains.revalidate_interval"),
                grace_period: reader.duration("domains.grace_period"),
                key_overlap: reader.duration("domains.key_overlap"),
            },
            limits: LimitSettings {
                max_recipients: reader.number("limits.max_recipients", 1, 10_000),
                max_message_size: reader.byte_size("limits.max_message_size"),
                max_metadata_size: reader.byte_size("limits.max_metadata_size"),
            },
            log: LogSettings {
                format: reader.log_format("log.format"),
                level: reader.text("log.level"),
            },
        }
    }
}

/// Turns `[section] key = value` into `section.key` entries.
fn flatten_toml(
    text: &str,
    origin: &str,
    out: &mut BTreeMap<String, RawValue>,
    problems: &mut Vec<String>,
) {
    let table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(err) => {
            let first_line = err.to_string().lines().next().unwrap_or_default().to_string();
            problems.push(format!("invalid TOML in {origin}: {first_line}; fix the file's syntax"));
            return;
        }
    };
    for (section, value) in table {
        let toml::Value::Table(keys) = value else {
            problems.push(format!(
                "setting {section} in {origin} is outside a section: put it under its [section] as in config/default.toml"
            ));
            continue;
        };
        for (key, value) in keys {
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_string).unwrap_or_else(|| item.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            out.insert(format!("{section}.{key}"), RawValue { text, origin: origin.to_string() });
        }
    }
}

fn apply_environment(
    environment: &[(String, String)],
    raw: &mut BTreeMap<String, RawValue>,
    problems: &mut Vec<String>,
) {
    for (name, value) in environment {
        let key = if let Some((_, key)) = ENV_ALIASES.iter().find(|(alias, _)| alias == name) {
            key.to_string()
        } else if let Some(rest) = name.strip_prefix("OUTBOUND_") {
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            format!("{}.{}", section.to_ascii_lowercase(), key.to_ascii_lowercase())
        } else {
            continue;
        };

        if !raw.contains_key(&key) {
            problems.push(format!(
                "unknown setting {key} from {name}: unset it or check its spelling against config/default.toml"
            ));
            continue;
        }
        raw.insert(key, RawValue { text: value.clone(), origin: name.clone() });
    }
}

/// Parses raw values into types, adding one line per invalid value to `problems`.
struct Reader<'a> {
    raw: &'a BTreeMap<String, RawValue>,
    problems: &'a mut Vec<String>,
}

impl Reader<'_> {
    fn value(&self, key: &str) -> RawValue {
        self.raw.get(key).cloned().unwrap_or_else(|| RawValue {
            text: String::new(),
            origin: "nowhere (missing from config/default.toml)".to_string(),
        })
    }

    fn invalid(&mut self, key: &str, shown: &str, origin: &str, fix: &str) {
        self.problems
            .push(format!("invalid setting {key} = \"{shown}\" (from {origin}): {fix}"));
    }

    fn text(&mut self, key: &str) -> String {
        let value = self.value(key);
        if value.text.trim().is_empty() {
            self.invalid(key, "", &value.origin, "set a non-empty value");
        }
        value.text
    }

    fn duration(&mut self, key: &str) -> Duration {
        let value = self.value(key);
        match humantime::parse_duration(value.text.trim()) {
            Ok(duration) if !duration.is_zero() => duration,
            _ => {
                self.invalid(key, &value.text, &value.origin, "write a positive duration like 500ms, 2s, 1m or 24h");
                Duration::from_secs(1)
            }
        }
    }

    fn number<T>(&mut self, key: &str, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + Copy + fmt::Display,
    {
        let value = self.value(key);
        match value.text.trim().parse::<T>() {
            Ok(number) if number >= min && number <= max => number,
            _ => {
                let fix = format!("write a whole number from {min} to {max}");
                self.invalid(key, &value.text, &value.origin, &fix);
                min
            }
        }
    }

    fn byte_size(&mut self, key: &str) -> usize {
        let value = self.value(key);
        let text = value.text.trim();
        let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
            Some(at) => text.split_at(at),
            None => (text, ""),
        };
        let multiplier = match unit.trim() {
            "" | "B" => Some(1),
            "KiB" => Some(1024),
            "MiB" => Some(1024 * 1024),
            _ => None,
        };
        match (digits.parse::<usize>(), multiplier) {
            (Ok(number), Some(multiplier)) if number > 0 => number * multiplier,
            _ => {
                self.invalid(key, &value.text, &value.origin, "write a size like 4096, 4KiB or 10MiB");
                1
            }
        }
    }

    fn url(&mut self, key: &str, schemes: &[&str]) -> String {
        let value = self.value(key);
        match url::Url::parse(value.text.trim()) {
            Ok(parsed) if schemes.contains(&parsed.scheme()) => value.text.trim().to_string(),
            _ => {
                let shown = redact_url(&value.text);
                let fix = format!("write a URL starting with {}://", schemes.join("://, "));
                self.invalid(key, &shown, &value.origin, &fix);
                String::new()
            }
        }
    }

    fn smtp_target(&mut self, key: &str) -> Option<SmtpTarget> {
        let value = self.value(key);
        let text = value.text.trim();
        if text.is_empty() {
            return None;
        }
        match parse_smtp_target(text) {
            Ok(target) => Some(target),
            Err(fix) => {
                self.invalid(key, &redact_url(text), &value.origin, &fix);
                None
            }
        }
    }

    fn socket_addr(&mut self, key: &str) -> SocketAddr {
        let value = self.value(key);
        match value.text.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                self.invalid(key, &value.text, &value.origin, "write IP:PORT, for example 127.0.0.1:9464");
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    fn socket_addrs(&mut self, key: &str, default_port: u16) -> Vec<SocketAddr> {
        let value = self.value(key);
        let mut addrs = Vec::new();
        for item in value.text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let parsed = item.parse::<SocketAddr>().ok().or_else(|| {
                item.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, default_port))
            });
            match parsed {
                Some(addr) => addrs.push(addr),
                None => {
                    self.invalid(key, item, &value.origin, "write comma-separated IP[:PORT] entries, for example 127.0.0.1:5353");
                }
            }
        }
        addrs
    }

    fn encryption_key(&mut self, key: &str) -> Option<KeyEncryptionKey> {
        let value = self.value(key);
        let text = value.text.trim();
        if text.is_empty() {
            return None;
        }
        let decoded = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .ok()
        } else {
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        };
        match decoded.and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()) {
            Some(bytes) => Some(KeyEncryptionKey(bytes)),
            None => {
                self.invalid(
                    key,
                    "<redacted>",
                    &value.origin,
                    "write exactly 32 bytes as 64 hex digits or base64 (for example `openssl rand -hex 32`)",
                );
                None
            }
        }
    }

    fn log_format(&mut self, key: &str) -> LogFormat {
        let value = self.value(key);
        match value.text.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                self.invalid(key, &value.text, &value.origin, "write text or json");
                LogFormat::Text
            }
        }
    }
}

/// Parses `smtp://[user:pass@]host[:port][?tls=none|starttls|required]` or `file:///dir`.
pub fn parse_smtp_target(text: &str) -> Result<SmtpTarget, String> {
    let parsed = url::Url::parse(text)
        .map_err(|err| format!("not a URL ({err}); write smtp://host:port?tls=none|starttls|required or file:///some/dir"))?;
    match parsed.scheme() {
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|()| "write an absolute directory path, for example file:///var/spool/outbound".to_string())?;
            Ok(SmtpTarget::Directory(path))
        }
        "smtp" => {
            let host = parsed
                .host_str()
                .filter(|host| !host.is_empty())
                .ok_or("the URL has no host; write smtp://host:port")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let mut tls = TlsMode::Starttls;
            for (name, value) in parsed.query_pairs() {
                match (name.as_ref(), value.as_ref()) {
                    ("tls", "none") => tls = TlsMode::None,
                    ("tls", "starttls") => tls = TlsMode::Starttls,
                    ("tls", "required") => tls = TlsMode::Required,
                    ("tls", other) => return Err(format!("tls={other} is not a mode; write tls=none, tls=starttls or tls=required")),
                    (other, _) => return Err(format!("unknown URL parameter {other}; only tls is accepted")),
                }
            }
            let default_port = if tls == TlsMode::Required { 465 } else { 587 };
            let credentials = if parsed.username().is_empty() {
                None
            } else {
                let decode = |text: &str| {
                    url::form_urlencoded::parse(format!("x={text}").as_bytes())
                        .next()
                        .map(|(_, value)| value.into_owned())
                        .unwrap_or_default()
                };
                Some((decode(parsed.username()), decode(parsed.password().unwrap_or(""))))
            };
            Ok(SmtpTarget::Relay {
                host,
                port: parsed.port().unwrap_or(default_port),
                tls,
                credentials,
            })
        }
        other => Err(format!("scheme {other}:// is not supported; write smtp://host:port or file:///some/dir")),
    }
}

/// Hides the password of a URL so that it can be logged or shown in an error.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("<redacted>"));
            parsed.to_string()
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_contract() {
        let settings = Settings::load_from(None, &[], &[]).expect("defaults load");
        assert_eq!(settings.database.url, "postgres://postgres@127.0.0.1:5432/outbound");
        assert_eq!(settings.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(settings.metrics.addr.to_string(), "127.0.0.1:9464");
        assert_eq!(settings.retry.initial_delay, Duration::from_secs(60));
        assert_eq!(settings.retry.max_delay, Duration::from_secs(3600));
        assert_eq!(settings.retry.window, Duration::from_secs(24 * 3600));
        assert_eq!(settings.worker.prefetch, 64);
        assert_eq!(settings.worker.shutdown_grace, Duration::from_secs(30));
        assert_eq!(settings.smtp.timeout, Duration::from_secs(30));
        assert_eq!(settings.smtp.max_per_second, 0);
        assert_eq!(settings.domains.spf_include, "_spf.outbound.example");
        assert_eq!(settings.domains.revalidate_interval, Duration::from_secs(24 * 3600));
        assert_eq!(settings.domains.grace_period, Duration::from_secs(72 * 3600));
        assert_eq!(settings.domains.key_overlap, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(settings.limits.max_recipients, 50);
        assert_eq!(settings.limits.max_message_size, 10 * 1024 * 1024);
        assert!(settings.smtp.url.is_none());
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("outbound.toml");
        std::fs::write(&file, "[retry]\ninitial_delay = \"5s\"\nmax_delay = \"10m\"\n").unwrap();
        let environment = env(&[("OUTBOUND_RETRY__INITIAL_DELAY", "2s"), ("OUTBOUND_SMTP_URL", "file:///tmp/mail")]);
        let settings = Settings::load_from(Some(&file), &environment, &[]).unwrap();
        assert_eq!(settings.retry.initial_delay, Duration::from_secs(2));
        assert_eq!(settings.retry.max_delay, Duration::from_secs(600));
        assert_eq!(settings.smtp.url, Some(SmtpTarget::Directory(PathBuf::from("/tmp/mail"))));
    }

    #[test]
    fn every_problem_reported_at_once() {
        let environment = env(&[
            ("OUTBOUND_RETRY__INITIAL_DELAY", "soon"),
            ("OUTBOUND_WORKER__PREFETCH", "0"),
            ("OUTBOUND_METRICS_ADDR", "localhost"),
            ("OUTBOUND_RETRY__WINDOW_SIZE", "1h"),
            ("OUTBOUND_KEY_ENCRYPTION_KEY", "too-short"),
        ]);
        let err = Settings::load_from(None, &environment, &[Requirement::SmtpUrl]).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 6, "{text}");
        assert!(text.contains("retry.initial_delay = \"soon\" (from OUTBOUND_RETRY__INITIAL_DELAY)"), "{text}");
        assert!(text.contains("worker.prefetch"), "{text}");
        assert!(text.contains("metrics.addr"), "{text}");
        assert!(text.contains("unknown setting retry.window_size"), "{text}");
        assert!(text.contains("keys.encryption_key = \"<redacted>\""), "{text}");
        assert!(!text.contains("too-short"), "the secret leaked: {text}");
        assert!(text.contains("missing setting smtp.url"), "{text}");
    }

    #[test]
    fn smtp_url_forms() {
        let relay = parse_smtp_target("smtp://user:p%40ss@relay.example:2525?tls=none").unwrap();
        assert_eq!(
            relay,
            SmtpTarget::Relay {
                host: "relay.example".into(),
                port: 2525,
                tls: TlsMode::None,
                credentials: Some(("user".into(), "p@ss".into())),
            }
        );
        assert!(!format!("{relay:?}").contains("p@ss"));
        let default_tls = parse_smtp_target("smtp://relay.example").unwrap();
        assert!(matches!(default_tls, SmtpTarget::Relay { tls: TlsMode::Starttls, port: 587, .. }));
        assert!(parse_smtp_target("smtp://relay.example?tls=maybe").unwrap_err().contains("tls=maybe"));
        assert!(parse_smtp_target("http://relay.example").unwrap_err().contains("http"));
    }

    #[test]
    fn password_redacted_in_errors() {
        let environment = env(&[("OUTBOUND_DATABASE_URL", "mysql://app:hunter2@db/outbound")]);
        let err = Settings::load_from(None, &environment, &[]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
