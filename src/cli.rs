//! Command-line interface: argument definitions and one function per subcommand.
//!
//! Exit status: 0 success, 1 runtime failure, 2 usage or invalid input, 3 permission denied.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::address::ascii_domain;
use crate::configuration::{Requirement, Settings};
use crate::store::{self, StoreError};
use crate::{broker, dkim, startup, telemetry};

#[derive(Debug, Parser)]
#[command(name = "outbound", version, about = "Sends a support platform's email replies from each tenant's own verified domain.")]
pub struct Cli {
    /// TOML settings file (also OUTBOUND_CONFIG); see config/default.toml for every key.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations and declare the AMQP topology.
    Migrate,
    /// Consume send requests until SIGTERM or SIGINT.
    Worker,
    /// Run the whole service once on sample requests and print their results.
    Demo(crate::demo::DemoArgs),
    /// Tenants and their members.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Sending domains.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Publish send requests (JSON files, `-` for stdin) to outbound.requests.
    Send {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<String>,
        /// Publish files even when they fail validation (to try the dead-letter path).
        #[arg(long)]
        no_validate: bool,
    },
    /// The delivery log.
    Deliveries(DeliveriesArgs),
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and its owner; prints both ids.
    Create {
        /// Display name of the tenant.
        #[arg(long)]
        name: String,
        /// Email address of the tenant's owner, who may change its outbound settings.
        #[arg(long)]
        owner_email: String,
        /// starter, growth or enterprise.
        #[arg(long, default_value = "starter")]
        plan: String,
        /// Print {"tenant_id", "owner_user_id"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tenant members.
    #[command(subcommand)]
    Member(MemberCommand),
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a member (owner only).
    Add {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        email: String,
        /// owner, admin or agent.
        #[arg(long)]
        role: String,
        /// User id of the member making the change.
        #[arg(long)]
        actor: Uuid,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Make the DKIM key and verification token; print the DNS records to publish (owner only).
    Add {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        domain: String,
        #[arg(long)]
        actor: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Operator override: mark a domain verified without a DNS check; audited.
    MarkVerified {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        domain: String,
        /// The reason for skipping the DNS check, stored in the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct DeliveriesArgs {
    /// Only this tenant's requests.
    #[arg(long)]
    pub tenant: Option<Uuid>,
    /// Only requests with this address in to, cc or bcc.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Requests created at or after this time: RFC 3339 (2026-12-04T10:00:00Z) or a UTC date (2026-12-04).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Requests created before this time, in the same forms as --since.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Only this status.
    #[arg(long, value_parser = ["processing", "deferred", "sent", "failed", "blocked", "shadowed", "invalid"])]
    pub status: Option<String>,
    /// Maximum rows shown, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses an RFC 3339 time or a plain date, taken as midnight UTC.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(format!("\"{text}\" is not a time; write RFC 3339 like 2026-12-04T10:00:00Z or a date like 2026-12-04"))
}

/// An error with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("permission denied: only the tenant owner can change outbound email settings")]
    PermissionDenied,
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Runtime(_) => 1,
            CliError::Usage(_) => 2,
            CliError::PermissionDenied => 3,
        }
    }
}

impl From<StoreError> for CliError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::PermissionDenied => CliError::PermissionDenied,
            StoreError::NotFound(text) | StoreError::Conflict(text) => CliError::Usage(text),
            other => CliError::Runtime(other.into()),
        }
    }
}

impl From<crate::configuration::ConfigError> for CliError {
    fn from(err: crate::configuration::ConfigError) -> Self {
        CliError::Usage(err.to_string())
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Migrate => {
            let settings = Settings::load(config, &[])?;
            telemetry::init_tracing(&settings.log);
            startup::migrate(&settings).await?;
            println!("database and broker are up to date");
            Ok(())
        }
        Command::Worker => {
            let settings = Settings::load(config, &[Requirement::SmtpUrl, Requirement::KeyEncryptionKey])?;
            telemetry::init_tracing(&settings.log);
            startup::run_worker(settings, Arc::new(AtomicBool::new(false))).await?;
            Ok(())
        }
        Command::Demo(args) => crate::demo::run(config, args).await,
        Command::Tenant(TenantCommand::Create { name, owner_email, plan, json }) => {
            let settings = Settings::load(config, &[])?;
            if !["starter", "growth", "enterprise"].contains(&plan.as_str()) {
                return Err(CliError::Usage(format!("invalid --plan {plan}: write starter, growth or enterprise")));
            }
            check_email("--owner-email", &owner_email)?;
            let pool = store::connect(&settings.database, store::Patience::Once).await?;
            let created = store::create_tenant(&pool, &name, &owner_email, &plan).await?;
            if json {
                println!("{}", serde_json::json!({"tenant_id": created.tenant_id, "owner_user_id": created.owner_user_id}));
            } else {
                println!("tenant_id      {}\nowner_user_id  {}", created.tenant_id, created.owner_user_id);
            }
            Ok(())
        }
        Command::Tenant(TenantCommand::Member(MemberCommand::Add { tenant, email, role, actor, json })) => {
            let settings = Settings::load(config, &[])?;
            if !["owner", "admin", "agent"].contains(&role.as_str()) {
                return Err(CliError::Usage(format!("invalid --role {role}: write owner, admin or agent")));
            }
            check_email("--email", &email)?;
            let pool = store::connect(&settings.database, store::Patience::Once).await?;
            let user_id = store::add_member(&pool, tenant, actor, &email, &role).await?;
            if json {
                println!("{}", serde_json::json!({"user_id": user_id}));
            } else {
                println!("user_id  {user_id}");
            }
            Ok(())
        }
        Command::Domain(DomainCommand::Add { tenant, domain, actor, json }) => {
            let settings = Settings::load(config, &[Requirement::KeyEncryptionKey])?;
            let added = add_domain(&settings, tenant, &domain, actor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&added).expect("records serialize"));
            } else {
                print_records(&added);
            }
            Ok(())
        }
        Command::Domain(DomainCommand::MarkVerified { tenant, domain, reason }) => {
            let settings = Settings::load(config, &[])?;
            if reason.trim().is_empty() {
                return Err(CliError::Usage("missing --reason: say why the DNS check is skipped; it goes to the audit log".into()));
            }
            let domain = ascii_domain(&domain).ok_or_else(|| CliError::Usage(format!("invalid --domain {domain}: write a host name like mail.example.com")))?;
            let pool = store::connect(&settings.database, store::Patience::Once).await?;
            store::mark_domain_verified(&pool, tenant, &domain, &reason).await?;
            println!("domain {domain} marked verified for tenant {tenant}");
            Ok(())
        }
        Command::Send { files, no_validate } => {
            let settings = Settings::load(config, &[])?;
            send_files(&settings, &files, !no_validate).await
        }
        Command::Deliveries(args) => {
            let settings = Settings::load(config, &[])?;
            let pool = store::connect(&settings.database, store::Patience::Once).await?;
            let filter = store::DeliveryFilter {
                tenant_id: args.tenant,
                recipient: args.recipient.map(|r| crate::address::Address::parse(&r).map(|a| a.to_string()).unwrap_or(r)),
                since: args.since,
                until: args.until,
                status: args.status,
                limit: args.limit.clamp(1, 10_000),
            };
            let rows = store::list_deliveries(&pool, &filter).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialize"));
            } else {
                print_deliveries(&rows);
            }
            Ok(())
        }
    }
}

fn check_email(flag: &str, email: &str) -> Result<(), CliError> {
    crate::address::Address::parse(email)
        .map(|_| ())
        .map_err(|err| CliError::Usage(format!("invalid {flag} {email}: {err}")))
}

/// One DNS record to publish.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub value: String,
    pub purpose: String,
    pub required: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AddedDomain {
    pub domain: String,
    pub selector: String,
    pub records: Vec<DnsRecord>,
    /// The DKIM public key (base64 SubjectPublicKeyInfo), as in the record's `p=` tag.
    pub public_key: String,
}

/// Makes the domain's DKIM key and token, stores them (the key encrypted), and returns
/// the records to publish.
pub async fn add_domain(settings: &Settings, tenant: Uuid, domain: &str, actor: Uuid) -> Result<AddedDomain, CliError> {
    let domain = ascii_domain(domain).ok_or_else(|| CliError::Usage(format!("invalid --domain {domain}: write a host name like mail.example.com")))?;
    let kek = settings.keys.encryption_key.clone().expect("required at load");
    let key = dkim::generate_key().map_err(|err| CliError::Runtime(err.into()))?;
    let selector = format!("ob{}", Utc::now().format("%Y%m%d"));
    let token = Uuid::new_v4().simple().to_string();
    let pool = store::connect(&settings.database, store::Patience::Once).await?;
    store::add_domain(
        &pool,
        store::NewDomain {
            tenant_id: tenant,
            actor,
            domain: &domain,
            selector: &selector,
            encrypted_private_key: dkim::encrypt_private_key(&kek, &domain, &key.private_pkcs8),
            public_key: &key.public_base64,
            verification_token: &token,
        },
    )
    .await?;

    let records = vec![
        DnsRecord {
            name: format!("_outbound-verification.{domain}"),
            record_type: "TXT".into(),
            value: format!("\"outbound-verification={token}\""),
            purpose: "proves the tenant controls the domain".into(),
            required: true,
        },
        DnsRecord {
            name: format!("{selector}._domainkey.{domain}"),
            record_type: "TXT".into(),
            value: dkim::dkim_record_value(&key.public_base64),
            purpose: "DKIM public key that receivers check signatures with".into(),
            required: true,
        },
        DnsRecord {
            name: domain.clone(),
            record_type: "TXT".into(),
            value: format!("\"v=spf1 include:{} ~all\"", settings.domains.spf_include),
            purpose: "SPF: lets the platform's relays send for the domain (merge the include into an existing SPF record)".into(),
            required: true,
        },
        DnsRecord {
            name: format!("_dmarc.{domain}"),
            record_type: "TXT".into(),
            value: "\"v=DMARC1; p=quarantine; adkim=r; aspf=r\"".into(),
            purpose: "DMARC: recommended policy for mail that fails SPF and DKIM alignment".into(),
            required: false,
        },
    ];
    Ok(AddedDomain { domain, selector, records, public_key: key.public_base64 })
}

fn print_records(added: &AddedDomain) {
    println!("Publish these DNS records for {} (selector {}):\n", added.domain, added.selector);
    for record in &added.records {
        let required = if record.required { "required" } else { "recommended" };
        println!("{} {} ({required}: {})\n  {}\n", record.name, record.record_type, record.purpose, record.value);
    }
}

/// Publishes each file as a send request. With `validate`, every file is checked first and
/// nothing is published unless all pass.
async fn send_files(settings: &Settings, files: &[String], validate: bool) -> Result<(), CliError> {
    let mut bodies = Vec::new();
    for file in files {
        let body = if file == "-" {
            let mut buffer = Vec::new();
            std::io::stdin().read_to_end(&mut buffer).map_err(|err| CliError::Runtime(err.into()))?;
            buffer
        } else {
            std::fs::read(file).map_err(|err| CliError::Usage(format!("cannot read {file}: {err}")))?
        };
        if validate {
            if let Err(invalid) = crate::request::parse(&body, &settings.limits) {
                return Err(CliError::Usage(format!(
                    "{file} is not a valid send request ({}): {} Nothing was published; fix the file, or pass --no-validate to publish it anyway.",
                    invalid.reason.as_str(),
                    invalid.detail
                )));
            }
        }
        // The routing key is the tenant id, or "unknown" for a file without a readable one.
        let routing_key = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value.get("tenant_id").and_then(|id| id.as_str()).map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string());
        bodies.push((file.clone(), routing_key, body));
    }

    let connection = broker::connect(&settings.amqp, false).await.map_err(|err| CliError::Runtime(err.into()))?;
    let channel = connection.create_channel().await.map_err(|err| CliError::Runtime(err.into()))?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(|err| CliError::Runtime(err.into()))?;
    for (file, routing_key, body) in bodies {
        broker::publish_request(&channel, &routing_key, &body).await.map_err(|err| CliError::Runtime(err.into()))?;
        println!("published {file} (routing key {routing_key})");
    }
    let _ = channel.close(200, "done").await;
    let _ = connection.close(200, "done").await;
    Ok(())
}

fn print_deliveries(rows: &[store::DeliveryLogEntry]) {
    println!("{:<24} {:<36} {:<9} {:<22} {:<30} SUBJECT", "CREATED", "REQUEST", "STATUS", "REASON", "RECIPIENTS");
    for row in rows {
        println!(
            "{:<24} {:<36} {:<9} {:<22} {:<30} {}",
            row.created_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            row.request_id,
            row.status,
            row.reason.as_deref().unwrap_or("-"),
            row.recipients.join(","),
            row.subject.as_deref().unwrap_or("")
        );
    }
}
