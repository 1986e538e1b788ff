//! `outbound demo`: the newcomer's first run on the local PostgreSQL and RabbitMQ.
//!
//! It migrates and creates demo tenants with verified domains, one of them with outbound
//! disabled and one with automated replies paused. It publishes sample requests, runs the
//! worker in this process until each has its final result, and prints the results.
//! Signed messages stay on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use clap::Args;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::CliError;
use crate::configuration::{KeyEncryptionKey, Settings, SmtpTarget};
use crate::outcome::DeliveryResult;
use crate::{broker, startup, store, telemetry};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the signed messages, one subfolder per run (used when OUTBOUND_SMTP_URL is not set).
    #[arg(long, default_value = "outbound-demo")]
    pub output: PathBuf,
    /// Seconds to wait for every result before giving up.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// One sample request and what it shows.
struct Sample {
    label: &'static str,
    body: serde_json::Value,
}

pub async fn run(config: Option<&Path>, args: DemoArgs) -> Result<(), CliError> {
    let mut settings = Settings::load(config, &[])?;
    telemetry::init_tracing(&settings.log);
    let output = std::path::absolute(&args.output).map_err(|err| CliError::Usage(format!("invalid --output: {err}")))?;
    // Each run writes to its own folder, because each run makes new domains and keys.
    let suffix = Uuid::new_v4().simple().to_string()[..8].to_string();
    let messages_dir = output.join(format!("run-{suffix}"));
    if settings.smtp.url.is_none() {
        settings.smtp.url = Some(SmtpTarget::Directory(messages_dir.clone()));
    }
    if settings.keys.encryption_key.is_none() {
        let mut key = [0u8; 32];
        SystemRandom::new().fill(&mut key).map_err(|_| CliError::Runtime(anyhow::anyhow!("system randomness unavailable")))?;
        settings.keys.encryption_key = Some(KeyEncryptionKey(key));
        eprintln!("note: OUTBOUND_KEY_ENCRYPTION_KEY is not set, so the demo uses a throwaway key for its own domains");
    }
    // The demo's worker must not collide with a worker already listening on the default port.
    settings.metrics.addr = "127.0.0.1:0".parse().expect("static address");
    settings.retry.initial_delay = Duration::from_secs(2);

    println!("Migrating {} ...", crate::configuration::redact_url(&settings.database.url));
    let pool = startup::migrate(&settings).await?;

    let live = demo_tenant(&settings, &pool, &format!("Demo Store {suffix}"), &format!("store-{suffix}.demo.example")).await?;
    let disabled = demo_tenant(&settings, &pool, &format!("Disabled Store {suffix}"), &format!("disabled-{suffix}.demo.example")).await?;
    let disable = crate::changes::tenant_changes(&["outbound_enabled=false".to_string()]).map_err(CliError::Usage)?;
    store::set_tenant_settings(&pool, disabled.tenant_id, disabled.owner, &disable).await?;
    println!("Created tenant {} with verified domain {}", live.tenant_id, live.domain);
    println!("Created tenant {} with outbound disabled", disabled.tenant_id);

    // Automations: one in shadow mode on the live tenant, and a live one on a third tenant
    // whose owner paused automated replies.
    let shadow_automation = store::create_automation(&pool, live.tenant_id, live.owner, "Order status bot").await?;
    let paused = demo_tenant(&settings, &pool, &format!("Paused Store {suffix}"), &format!("paused-{suffix}.demo.example")).await?;
    let paused_automation = store::create_automation(&pool, paused.tenant_id, paused.owner, "Returns bot").await?;
    let live_settings: Vec<String> = ["mode=live", "shadow_validated=true", "readiness_score=0.9", "revalidated=now"].iter().map(|s| s.to_string()).collect();
    let changes = crate::changes::automation_changes(&live_settings, chrono::Utc::now()).map_err(CliError::Usage)?;
    store::set_automation(&pool, paused.tenant_id, paused_automation, paused.owner, &changes).await?;
    let pause = crate::changes::tenant_changes(&["automation_paused=true".to_string()]).map_err(CliError::Usage)?;
    store::set_tenant_settings(&pool, paused.tenant_id, paused.owner, &pause).await?;
    println!("Created automation {shadow_automation} in shadow mode, and tenant {} with automated replies paused\n", paused.tenant_id);
    let automations = DemoAutomations { shadow: shadow_automation, paused: paused_automation };

    let connection = broker::connect(&settings.amqp, false).await.map_err(|err| CliError::Runtime(err.into()))?;
    let channel = connection.create_channel().await.map_err(|err| CliError::Runtime(err.into()))?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|err| CliError::Runtime(err.into()))?;
    let results_queue = channel
        .queue_declare("", QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(|err| CliError::Runtime(err.into()))?;
    for tenant in [live.tenant_id, disabled.tenant_id, paused.tenant_id] {
        channel
            .queue_bind(results_queue.name().as_str(), broker::RESULTS_EXCHANGE, &format!("*.{tenant}"), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(|err| CliError::Runtime(err.into()))?;
    }
    let mut results = channel
        .basic_consume(results_queue.name().as_str(), "outbound-demo", BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(|err| CliError::Runtime(err.into()))?;

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(startup::run_worker_until(settings.clone(), Arc::new(AtomicBool::new(false)), shutdown.clone()));

    let samples = samples(&live, &disabled, &paused, &automations);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut finals: HashMap<Uuid, DeliveryResult> = HashMap::new();

    // The first reply goes alone, so that the follow-up can thread onto it.
    let (first, rest) = samples.split_first().expect("samples are not empty");
    for batch in [std::slice::from_ref(first), rest] {
        for sample in batch {
            let routing_key = sample.body["tenant_id"].as_str().unwrap_or("unknown").to_string();
            broker::publish_request(&channel, &routing_key, sample.body.to_string().as_bytes())
                .await
                .map_err(|err| CliError::Runtime(err.into()))?;
        }
        let expected: Vec<Uuid> = batch.iter().filter_map(|s| s.body["request_id"].as_str().and_then(|id| id.parse().ok())).collect();
        while !expected.iter().all(|id| finals.contains_key(id)) {
            let next = tokio::time::timeout_at(deadline, results.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                shutdown.cancel();
                let _ = worker.await;
                return Err(CliError::Runtime(anyhow::anyhow!(
                    "not every sample had a final result within {} s; run with RUST_LOG=outbound=debug to see why",
                    args.timeout
                )));
            };
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            if let Ok(result) = serde_json::from_slice::<DeliveryResult>(&delivery.data) {
                if let (true, Some(id)) = (result.is_final, result.request_id) {
                    finals.insert(id, result);
                }
            }
        }
    }

    shutdown.cancel();
    match worker.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(CliError::Runtime(err)),
        Err(err) => return Err(CliError::Runtime(err.into())),
    }
    let _ = channel.close(200, "done").await;
    let _ = connection.close(200, "done").await;

    print_table(&samples, &finals);
    match &settings.smtp.url {
        Some(SmtpTarget::Directory(dir)) => println!("\nSigned messages: {}", dir.display()),
        _ => println!("\nSigned messages went to the relay in OUTBOUND_SMTP_URL."),
    }
    println!("DKIM public key of {} (p= value): {}", live.domain, live.public_key);
    if let Some(SmtpTarget::Directory(dir)) = &settings.smtp.url {
        println!(
            "Check the signatures with an independent verifier:\n  python3 tests/support/dkim_verify.py --public-key {} {}/*.eml",
            live.public_key,
            dir.display()
        );
    }
    Ok(())
}

struct DemoTenant {
    tenant_id: Uuid,
    owner: Uuid,
    domain: String,
    public_key: String,
}

async fn demo_tenant(settings: &Settings, pool: &sqlx::PgPool, name: &str, domain: &str) -> Result<DemoTenant, CliError> {
    let created = store::create_tenant(pool, name, &format!("owner@{domain}"), "starter").await?;
    let added = crate::cli::add_domain(settings, created.tenant_id, domain, created.owner_user_id).await?;
    store::mark_domain_verified(pool, created.tenant_id, &added.domain, "outbound demo: sample domain without DNS").await?;
    Ok(DemoTenant { tenant_id: created.tenant_id, owner: created.owner_user_id, domain: added.domain, public_key: added.public_key })
}

struct DemoAutomations {
    shadow: Uuid,
    paused: Uuid,
}

fn samples(live: &DemoTenant, disabled: &DemoTenant, paused_tenant: &DemoTenant, automations: &DemoAutomations) -> Vec<Sample> {
    let conversation = format!("demo-{}", Uuid::new_v4().simple());
    let request = |tenant: &DemoTenant, conversation: &str, subject: &str, text: &str| {
        serde_json::json!({
            "schema": "outbound.send_request.v1",
            "request_id": Uuid::new_v4(),
            "tenant_id": tenant.tenant_id,
            "origin": "agent",
            "agent_id": Uuid::new_v4(),
            "conversation_id": conversation,
            "from": {"address": format!("support@{}", tenant.domain), "name": "Your Store Support"},
            "to": [{"address": "jamie.doe@customer.example", "name": "Jamie Doe"}],
            "subject": subject,
            "text_body": text,
            "metadata": {"ticket": "48213"}
        })
    };

    let mut first = request(live, &conversation, "Re: Where is my order #48213?", "Hi Jamie,\n\nYour order left our warehouse this morning.\n\n— Sam, Your Store Support\n");
    first["in_reply_to"] = "<CAF3x9-inbound-1@mail.customer.example>".into();
    first["references"] = serde_json::json!(["<CAF3x9-inbound-1@mail.customer.example>"]);
    let follow_up = request(live, &conversation, "Re: Where is my order #48213?", "Hi Jamie,\n\nA follow-up: the parcel arrives tomorrow.\n");
    let blocked = request(disabled, &format!("demo-{}", Uuid::new_v4().simple()), "Re: Returns", "This tenant has outbound disabled.\n");
    let mut shadowed = request(live, &format!("demo-{}", Uuid::new_v4().simple()), "Re: Where is my order #48214?", "Your order ships tomorrow.\n");
    shadowed["origin"] = "automation".into();
    shadowed["automation_id"] = automations.shadow.to_string().into();
    let mut paused = request(paused_tenant, &format!("demo-{}", Uuid::new_v4().simple()), "Re: Return label", "Your return label is ready.\n");
    paused["origin"] = "automation".into();
    paused["automation_id"] = automations.paused.to_string().into();
    let mut invalid = request(live, &format!("demo-{}", Uuid::new_v4().simple()), "", "hi");
    invalid["subject"] = "Hello\r\nBcc: everyone@victim.example".into();

    vec![
        Sample { label: "agent reply", body: first },
        Sample { label: "threaded follow-up", body: follow_up },
        Sample { label: "blocked (outbound disabled)", body: blocked },
        Sample { label: "automation in shadow mode", body: shadowed },
        Sample { label: "automation (tenant paused)", body: paused },
        Sample { label: "invalid (header injection)", body: invalid },
    ]
}

fn print_table(samples: &[Sample], finals: &HashMap<Uuid, DeliveryResult>) {
    println!("{:<30} {:<9} {:<20} DETAIL", "SAMPLE", "STATUS", "REASON");
    for sample in samples {
        let id: Option<Uuid> = sample.body["request_id"].as_str().and_then(|id| id.parse().ok());
        let Some(result) = id.and_then(|id| finals.get(&id)) else { continue };
        println!(
            "{:<30} {:<9} {:<20} {}",
            sample.label,
            result.status.as_str(),
            result.reason.map(|r| r.as_str()).unwrap_or("-"),
            result.detail
        );
        if let Some(message_id) = &result.message_id {
            println!("{:<30} message {message_id}", "");
        }
    }
}
