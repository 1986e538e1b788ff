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
use crate::{broker, onboarding, startup, telemetry};

pub use crate::onboarding::{add_domain, AddedDomain};

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
    /// The delivery log; `deliveries show ID --raw` prints a stored message.
    Deliveries(DeliveriesArgs),
    /// A tenant's outbound settings (changes are owner only).
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Automations of a tenant (changes are owner only).
    #[command(subcommand)]
    Automation(AutomationCommand),
    /// Platform-wide operator switches.
    #[command(subcommand)]
    Platform(PlatformCommand),
    /// Recipients a tenant must not mail.
    #[command(subcommand)]
    Suppression(SuppressionCommand),
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Print outbound state, domains, plan, limits, restrictions and the latest changes.
    Show {
        #[arg(long)]
        tenant: Uuid,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Change settings: outbound_enabled, automation_paused, plan, rate_per_minute, burst.
    Set {
        #[arg(long)]
        tenant: Uuid,
        /// User id of the member making the change; only the owner may.
        #[arg(long)]
        actor: Uuid,
        #[arg(required = true, value_name = "KEY=VALUE")]
        changes: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AutomationCommand {
    /// Create an automation, in shadow mode.
    Create {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        name: String,
        #[arg(long)]
        actor: Uuid,
        /// Print {"automation_id"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an automation: mode, shadow_validated, readiness_score, readiness_threshold,
    /// revalidated (now or RFC 3339), revalidation_interval_days.
    Set {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        automation: Uuid,
        #[arg(long)]
        actor: Uuid,
        #[arg(required = true, value_name = "KEY=VALUE")]
        changes: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlatformCommand {
    /// Turn the global switch for automated sending on (block) or off.
    KillSwitch {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// Why; stored in the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SuppressionCommand {
    Add {
        #[arg(long)]
        tenant: Uuid,
        address: String,
    },
    Remove {
        #[arg(long)]
        tenant: Uuid,
        address: String,
    },
    List {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RestrictionsCommand {
    /// Restrictions in force, placed by abnormal-pattern detection.
    List {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Clear every restriction of the tenant (operator command).
    Clear {
        #[arg(long)]
        tenant: Uuid,
    },
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
    /// Restrictions placed by abnormal-pattern detection.
    #[command(subcommand)]
    Restrictions(RestrictionsCommand),
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

/// The arguments of every owner's change to a domain.
#[derive(Debug, Args)]
pub struct DomainChange {
    /// The tenant that owns the domain.
    #[arg(long)]
    pub tenant: Uuid,
    /// The sending domain, for example mail.example.com.
    #[arg(long)]
    pub domain: String,
    /// User id of the owner making the change.
    #[arg(long)]
    pub actor: Uuid,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Make the DKIM key and verification token; print the DNS records to publish (owner only).
    Add(DomainChange),
    /// Look the records up, print each one's state, and mark the domain verified when all
    /// required ones pass (owner only). Exits 1 when a required record does not pass.
    Verify(DomainChange),
    /// Explain, record by record, how a receiver evaluates SPF, DKIM and DMARC. A report:
    /// exits 0 whatever it finds.
    Diagnose {
        /// The sending domain, for example mail.example.com.
        #[arg(long)]
        domain: String,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a new DKIM key under a new selector; it signs once its record verifies (owner only).
    RotateKey {
        #[command(flatten)]
        change: DomainChange,
        /// The key to replace: rsa, or ed25519 when dual signing is on.
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ed25519"])]
        algorithm: String,
    },
    /// Sign with an Ed25519 key (RFC 8463) beside the RSA one, or stop (owner only).
    DualSigning {
        /// on: add an Ed25519 key that signs once its record verifies. off: retire it.
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[command(flatten)]
        change: DomainChange,
    },
    /// Operator override: mark a domain verified without a DNS check; audited.
    MarkVerified {
        /// The tenant that owns the domain.
        #[arg(long)]
        tenant: Uuid,
        /// The sending domain, for example mail.example.com.
        #[arg(long)]
        domain: String,
        /// The reason for skipping the DNS check, stored in the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Print one request's stored signed message (as sent, or as it would be in shadow mode).
    Show {
        request_id: Uuid,
        /// Print the raw RFC 5322 message.
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeliveriesArgs {
    #[command(subcommand)]
    pub show: Option<DeliveriesCommand>,
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
        Command::Domain(DomainCommand::Add(DomainChange { tenant, domain, actor, json })) => {
            let settings = Settings::load(config, &[Requirement::KeyEncryptionKey])?;
            let added = add_domain(&settings, tenant, &domain, actor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&added).expect("records serialize"));
            } else {
                onboarding::print_records(&added);
            }
            Ok(())
        }
        Command::Domain(DomainCommand::Verify(DomainChange { tenant, domain, actor, json })) => {
            let settings = Settings::load(config, &[])?;
            let report = onboarding::verify(&settings, tenant, &domain, actor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
            } else {
                onboarding::print_verify(&report);
            }
            if report.passed {
                Ok(())
            } else {
                Err(onboarding::verify_failure(&report))
            }
        }
        Command::Domain(DomainCommand::Diagnose { domain, json }) => {
            let settings = Settings::load(config, &[])?;
            let diagnosis = onboarding::diagnose(&settings, &domain).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&diagnosis).expect("diagnosis serializes"));
            } else {
                onboarding::print_diagnosis(&diagnosis);
            }
            Ok(())
        }
        Command::Domain(DomainCommand::RotateKey { change: DomainChange { tenant, domain, actor, json }, algorithm }) => {
            let settings = Settings::load(config, &[Requirement::KeyEncryptionKey])?;
            let algorithm = crate::dkim::Algorithm::parse(&algorithm).expect("clap accepts rsa or ed25519 only");
            let report = onboarding::add_key(&settings, tenant, &domain, actor, onboarding::KeyRequest::Rotate(algorithm)).await?;
            print_new_key(&report, json);
            Ok(())
        }
        Command::Domain(DomainCommand::DualSigning { state, change: DomainChange { tenant, domain, actor, json } }) => {
            if state == "on" {
                let settings = Settings::load(config, &[Requirement::KeyEncryptionKey])?;
                let report = onboarding::add_key(&settings, tenant, &domain, actor, onboarding::KeyRequest::DualSigningOn).await?;
                print_new_key(&report, json);
            } else {
                let settings = Settings::load(config, &[])?;
                let changed = onboarding::stop_dual_signing(&settings, tenant, &domain, actor).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&changed).expect("keys serialize"));
                } else {
                    print_dual_signing_off(&domain, &changed, settings.domains.key_overlap);
                }
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
        Command::Settings(SettingsCommand::Show { tenant, json }) => {
            let pool = connect_pool(config).await?;
            let settings = store::tenant_settings(&pool, tenant).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&settings).expect("settings serialize"));
            } else {
                print_settings(&settings);
            }
            Ok(())
        }
        Command::Settings(SettingsCommand::Set { tenant, actor, changes }) => {
            let parsed = crate::changes::tenant_changes(&changes).map_err(CliError::Usage)?;
            let pool = connect_pool(config).await?;
            store::set_tenant_settings(&pool, tenant, actor, &parsed).await?;
            println!("updated {} setting(s) of tenant {tenant}", parsed.len());
            Ok(())
        }
        Command::Automation(AutomationCommand::Create { tenant, name, actor, json }) => {
            if name.trim().is_empty() {
                return Err(CliError::Usage("missing --name: give the automation a name".into()));
            }
            let pool = connect_pool(config).await?;
            let automation_id = store::create_automation(&pool, tenant, actor, &name).await?;
            if json {
                println!("{}", serde_json::json!({"automation_id": automation_id}));
            } else {
                println!("automation_id  {automation_id}  (mode shadow)");
            }
            Ok(())
        }
        Command::Automation(AutomationCommand::Set { tenant, automation, actor, changes }) => {
            let parsed = crate::changes::automation_changes(&changes, Utc::now()).map_err(CliError::Usage)?;
            let pool = connect_pool(config).await?;
            store::set_automation(&pool, tenant, automation, actor, &parsed).await?;
            println!("updated {} setting(s) of automation {automation}", parsed.len());
            Ok(())
        }
        Command::Platform(PlatformCommand::KillSwitch { state, reason }) => {
            if reason.trim().is_empty() {
                return Err(CliError::Usage("missing --reason: say why; it goes to the audit log".into()));
            }
            let pool = connect_pool(config).await?;
            store::set_kill_switch(&pool, state == "on", &reason).await?;
            println!("kill switch {state}: automated sending is {}", if state == "on" { "blocked" } else { "allowed" });
            Ok(())
        }
        Command::Suppression(command) => suppression(config, command).await,
        Command::Tenant(TenantCommand::Restrictions(RestrictionsCommand::List { tenant, json })) => {
            let pool = connect_pool(config).await?;
            let restrictions = store::list_restrictions(&pool, tenant).await?;
            if json {
                println!("{}", serde_json::Value::Array(restrictions));
            } else if restrictions.is_empty() {
                println!("no restrictions in force for tenant {tenant}");
            } else {
                for restriction in restrictions {
                    println!("{} {} scope={} since {} evidence {}", restriction["id"], restriction["detector"], restriction["scope"], restriction["created_at"], restriction["evidence"]);
                }
            }
            Ok(())
        }
        Command::Tenant(TenantCommand::Restrictions(RestrictionsCommand::Clear { tenant })) => {
            let pool = connect_pool(config).await?;
            let cleared = store::clear_restrictions(&pool, tenant).await?;
            println!("cleared {cleared} restriction(s) of tenant {tenant}");
            Ok(())
        }
        Command::Send { files, no_validate } => {
            let settings = Settings::load(config, &[])?;
            send_files(&settings, &files, !no_validate).await
        }
        Command::Deliveries(DeliveriesArgs { show: Some(DeliveriesCommand::Show { request_id, raw }), .. }) => {
            let settings = Settings::load(config, &[])?;
            let pool = store::connect(&settings.database, store::Patience::Once).await?;
            let Some(message) = store::stored_message(&pool, request_id).await? else {
                return Err(CliError::Usage(format!("request {request_id} has no stored message (it was blocked or invalid before composing)")));
            };
            if raw {
                use std::io::Write as _;
                std::io::stdout().write_all(&message).map_err(|err| CliError::Runtime(err.into()))?;
            } else {
                let text = String::from_utf8_lossy(&message);
                let head = text.split("\r\n\r\n").next().unwrap_or_default();
                println!("{}\n\n({} bytes; --raw prints the whole message)", head.replace("\r\n", "\n"), message.len());
            }
            Ok(())
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

fn print_dual_signing_off(domain: &str, changed: &store::RetiredKeys, overlap: std::time::Duration) {
    if changed.discarded.is_empty() && changed.retired.is_empty() {
        println!("dual signing was not on for {domain}; nothing changed");
        return;
    }
    println!("dual signing is off for {domain}: messages carry the RSA signature only.");
    for selector in &changed.retired {
        println!(
            "  selector {selector} is retired: keep its record for {} (domains.key_overlap), then delete it; `domain verify` says when.",
            humantime::format_duration(overlap)
        );
    }
    for selector in &changed.discarded {
        println!("  selector {selector} never signed: delete its record now if you published it.");
    }
}

fn print_new_key(report: &onboarding::NewKeyReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(report).expect("report serializes"));
    } else {
        onboarding::print_new_key(report);
    }
}

async fn connect_pool(config: Option<&std::path::Path>) -> Result<sqlx::PgPool, CliError> {
    let settings = Settings::load(config, &[])?;
    Ok(store::connect(&settings.database, store::Patience::Once).await?)
}

async fn suppression(config: Option<&std::path::Path>, command: SuppressionCommand) -> Result<(), CliError> {
    let normalize = |address: &str| {
        crate::address::Address::parse(address)
            .map(|parsed| parsed.to_string())
            .map_err(|err| CliError::Usage(format!("invalid address {address}: {err}")))
    };
    match command {
        SuppressionCommand::Add { tenant, address } => {
            let address = normalize(&address)?;
            let pool = connect_pool(config).await?;
            store::add_suppression(&pool, tenant, &address).await?;
            println!("suppressed {address} for tenant {tenant}");
        }
        SuppressionCommand::Remove { tenant, address } => {
            let address = normalize(&address)?;
            let pool = connect_pool(config).await?;
            if !store::remove_suppression(&pool, tenant, &address).await? {
                return Err(CliError::Usage(format!("{address} is not on the suppression list of tenant {tenant}")));
            }
            println!("removed {address} from the suppression list of tenant {tenant}");
        }
        SuppressionCommand::List { tenant, json } => {
            let pool = connect_pool(config).await?;
            let entries = store::list_suppressions(&pool, tenant).await?;
            if json {
                println!("{}", serde_json::Value::Array(entries));
            } else {
                for entry in entries {
                    println!("{}", entry["address"].as_str().unwrap_or_default());
                }
            }
        }
    }
    Ok(())
}

fn print_settings(settings: &serde_json::Value) {
    for key in ["tenant_id", "name", "plan", "outbound_enabled", "automation_paused", "rate_per_minute", "burst"] {
        println!("{key:<18} {}", settings[key]);
    }
    println!("domains");
    for domain in settings["domains"].as_array().into_iter().flatten() {
        println!("  {} selector={} status={} verified_by={}", domain["domain"], domain["selector"], domain["status"], domain["verification_method"]);
        if domain["status"] == "failing" {
            let records: Vec<&str> = domain["failing_records"].as_array().into_iter().flatten().filter_map(|name| name.as_str()).collect();
            println!(
                "    failing since {} ({}); suspended when domains.grace_period has passed unless the records are fixed",
                domain["failing_since"].as_str().unwrap_or("?"),
                records.join(", ")
            );
        }
    }
    println!("restrictions       {}", settings["restrictions"].as_array().map(Vec::len).unwrap_or(0));
    println!("recent changes");
    for change in settings["recent_changes"].as_array().into_iter().flatten() {
        println!("  {} {} {} {}: {} -> {}", change["at"], change["actor"], change["action"], change["subject"], change["old"], change["new"]);
    }
}

fn check_email(flag: &str, email: &str) -> Result<(), CliError> {
    crate::address::Address::parse(email)
        .map(|_| ())
        .map_err(|err| CliError::Usage(format!("invalid {flag} {email}: {err}")))
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
