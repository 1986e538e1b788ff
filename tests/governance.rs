//! Checks 3 and 4: restrictions, suppressions and the automation conditions, each
//! blocking with its own reason, and shadow mode.

mod common;

use common::{assert_status, request, TestEnv, Tenant};
use outbound::changes::automation_changes;
use outbound::outcome::Status;
use outbound::store;
use uuid::Uuid;

/// Creates an automation with the given `KEY=VALUE` settings.
async fn automation(env: &TestEnv, tenant: &Tenant, settings: &[&str]) -> Uuid {
    let id = store::create_automation(&env.pool, tenant.tenant_id, tenant.owner, "Returns bot").await.unwrap();
    if !settings.is_empty() {
        let pairs: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        let changes = automation_changes(&pairs, chrono::Utc::now()).unwrap();
        store::set_automation(&env.pool, tenant.tenant_id, id, tenant.owner, &changes).await.unwrap();
    }
    id
}

const LIVE: &[&str] = &["mode=live", "shadow_validated=true", "readiness_score=0.9", "readiness_threshold=0.8", "revalidated=now"];

fn automated(tenant: &Tenant, automation_id: Uuid, recipient: &str) -> serde_json::Value {
    let mut body = request(tenant, &[recipient]);
    body["origin"] = "automation".into();
    body["automation_id"] = automation_id.to_string().into();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_condition_blocks_with_its_reason() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let live = automation(&env, &tenant, LIVE).await;
    let unvalidated = automation(&env, &tenant, &["mode=live", "readiness_score=0.9", "revalidated=now"]).await;
    let not_ready = automation(&env, &tenant, &["mode=live", "shadow_validated=true", "readiness_score=0.5", "revalidated=now"]).await;
    let overdue_time = (chrono::Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    let overdue_setting = format!("revalidated={overdue_time}");
    let overdue = automation(&env, &tenant, &["mode=live", "shadow_validated=true", "readiness_score=0.9", &overdue_setting]).await;

    let restricted = env.tenant(true).await;
    sqlx::query("INSERT INTO tenant_restrictions (id, tenant_id, detector, scope) VALUES ($1, $2, 'volume_spike', 'all')")
        .bind(Uuid::new_v4())
        .bind(restricted.tenant_id)
        .execute(&env.pool)
        .await
        .unwrap();
    let paused = env.tenant(true).await;
    let paused_automation = automation(&env, &paused, LIVE).await;
    store::set_tenant_settings(&env.pool, paused.tenant_id, paused.owner, &outbound::changes::tenant_changes(&["automation_paused=true".into()]).unwrap())
        .await
        .unwrap();
    store::add_suppression(&env.pool, tenant.tenant_id, "suppressed@example.net").await.unwrap();
    let mut looping = automated(&tenant, live, "customer@example.net");
    looping["parent_auto_submitted"] = "auto-replied".into();

    let cases = [
        (request(&restricted, &["customer@example.net"]), "tenant_restricted"),
        (request(&tenant, &["suppressed@example.net"]), "recipient_suppressed"),
        (automated(&paused, paused_automation, "customer@example.net"), "automation_paused"),
        (automated(&tenant, Uuid::new_v4(), "customer@example.net"), "automation_not_found"),
        (automated(&tenant, unvalidated, "customer@example.net"), "shadow_validation_missing"),
        (automated(&tenant, not_ready, "customer@example.net"), "readiness_below_threshold"),
        (automated(&tenant, overdue, "customer@example.net"), "revalidation_overdue"),
        (looping, "auto_reply_loop"),
    ];
    for (body, reason) in &cases {
        let result = env.publish_and_wait(body).await;
        assert_status(&result, Status::Blocked, Some(reason));
        assert!(!result.detail.is_empty());
    }

    // The kill switch, and with it on, a paused tenant still reports the kill switch first.
    store::set_kill_switch(&env.pool, true, "test").await.unwrap();
    let killed = env.publish_and_wait(&automated(&tenant, live, "customer@example.net")).await;
    assert_status(&killed, Status::Blocked, Some("kill_switch_active"));
    let both = env.publish_and_wait(&automated(&paused, paused_automation, "customer@example.net")).await;
    assert_status(&both, Status::Blocked, Some("kill_switch_active"));
    let agent = env.publish_and_wait(&request(&tenant, &["agent-reply@example.net"])).await;
    assert_status(&agent, Status::Sent, None);
    store::set_kill_switch(&env.pool, false, "test over").await.unwrap();

    let received = env.received();
    assert_eq!(received.len(), 1, "only the agent reply reached the SMTP server");
    assert!(received[0].header("Auto-Submitted").is_none());
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_automation_sent_auto_submitted() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let live = automation(&env, &tenant, LIVE).await;
    let conversation = format!("conv-{}", Uuid::new_v4());

    // Three automated replies in one conversation go out; the fourth is a reply loop.
    let mut results = Vec::new();
    for _ in 0..4 {
        let mut body = automated(&tenant, live, "customer@example.net");
        body["conversation_id"] = conversation.clone().into();
        results.push(env.publish_and_wait(&body).await);
    }

    for result in &results[..3] {
        assert_status(result, Status::Sent, None);
        let message = &env.received_with_message_id(result.message_id.as_ref().unwrap())[0];
        assert_eq!(message.header("Auto-Submitted").as_deref(), Some("auto-replied"));
        let signed = message.header("DKIM-Signature").unwrap().to_ascii_lowercase();
        assert!(signed.contains("auto-submitted"), "{signed}");
    }
    assert_status(&results[3], Status::Blocked, Some("auto_reply_loop"));
    assert_eq!(env.received().len(), 3);

    // Another recipient in the same conversation is not part of that loop.
    let mut other = automated(&tenant, live, "someone-else@example.net");
    other["conversation_id"] = conversation.into();
    assert_status(&env.publish_and_wait(&other).await, Status::Sent, None);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_signs_but_sends_nothing() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let shadow = automation(&env, &tenant, &[]).await;

    let result = env.publish_and_wait(&automated(&tenant, shadow, "customer@example.net")).await;

    assert_status(&result, Status::Shadowed, Some("shadow_mode"));
    assert!(result.is_final);
    let message_id = result.message_id.clone().expect("a shadowed message has its Message-ID");
    assert!(env.received().is_empty(), "nothing reaches the SMTP server");
    assert!(env.rcpt_replies().is_empty());

    // A reviewer reads the stored message; it is signed exactly as it would be sent.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbound"))
        .args(["deliveries", "show", &result.request_id.unwrap().to_string(), "--raw"])
        .env("OUTBOUND_DATABASE_URL", &env.database_url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let raw = output.stdout;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains(&format!("Message-ID: {message_id}")), "{text}");
    assert!(text.contains("Auto-Submitted: auto-replied"));
    use base64::Engine as _;
    common::verify_dkim(&[base64::engine::general_purpose::STANDARD.encode(&raw)], std::slice::from_ref(&tenant.public_key));

    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_outbound"))
        .args(["deliveries", "--tenant", &tenant.tenant_id.to_string(), "--status", "shadowed", "--json"])
        .env("OUTBOUND_DATABASE_URL", &env.database_url)
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_outbound_keeps_delivery_log() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let since = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let mut sent = Vec::new();
    for _ in 0..2 {
        let result = env.publish_and_wait(&request(&tenant, &["jamie@customer.example"])).await;
        assert_status(&result, Status::Sent, None);
        sent.push(result.request_id.unwrap());
    }

    let disable = outbound::changes::tenant_changes(&["outbound_enabled=false".into()]).unwrap();
    store::set_tenant_settings(&env.pool, tenant.tenant_id, tenant.owner, &disable).await.unwrap();
    let blocked = env.publish_and_wait(&request(&tenant, &["jamie@customer.example"])).await;
    assert_status(&blocked, Status::Blocked, Some("outbound_disabled"));

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbound"))
        .args(["deliveries", "--tenant", &tenant.tenant_id.to_string(), "--recipient", "jamie@customer.example", "--since", &since, "--json"])
        .env("OUTBOUND_DATABASE_URL", &env.database_url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 3);
    for id in &sent {
        let entry = entries.iter().find(|e| e["request_id"] == id.to_string()).expect("an earlier delivery is still listed");
        assert_eq!(entry["status"], "sent");
        assert!(entry["message_id"].is_string());
    }
    assert_eq!(env.received().len(), 2);
    env.check_contract();
}
