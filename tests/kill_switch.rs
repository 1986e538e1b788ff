//! Governance changes under load: once the kill switch (or a tenant pause) has committed,
//! no automated message whose check started after the commit reaches the SMTP server,
//! while agent replies keep flowing. Three worker processes share the stream.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{request, TestEnv, Tenant};
use outbound::outcome::Status;
use outbound::store;
use uuid::Uuid;

const AUTOMATED: usize = 200;
const AGENT: usize = 60;

async fn live_automation(env: &TestEnv, tenant: &Tenant) -> Uuid {
    let id = store::create_automation(&env.pool, tenant.tenant_id, tenant.owner, "Bot").await.unwrap();
    let settings: Vec<String> = ["mode=live", "shadow_validated=true", "readiness_score=0.9", "revalidated=now"].iter().map(|s| s.to_string()).collect();
    let changes = outbound::changes::automation_changes(&settings, Utc::now()).unwrap();
    store::set_automation(&env.pool, tenant.tenant_id, id, tenant.owner, &changes).await.unwrap();
    id
}

/// Streams automated and agent requests, flips a switch once some automated replies went
/// out, and checks every automated message the SMTP server received against the flip.
async fn flip_under_load(flip: impl AsyncFnOnce(&TestEnv, &Tenant), expected_reason: &str) {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_WORKER__PREFETCH".into(), "8".into())];
    env.start_worker();
    env.start_extra_worker();
    env.start_extra_worker();
    let tenant = env.tenant(true).await;
    let automation = live_automation(&env, &tenant).await;

    let mut bodies = Vec::new();
    for index in 0..AUTOMATED {
        let mut body = request(&tenant, &[&format!("auto{index}@example.net")]);
        body["origin"] = "automation".into();
        body["automation_id"] = automation.to_string().into();
        bodies.push(body);
        if index % 4 == 0 && bodies.len() < AUTOMATED + AGENT {
            bodies.push(request(&tenant, &[&format!("agent{index}@example.net")]));
        }
    }
    while bodies.iter().filter(|b| b["origin"] == "agent").count() < AGENT {
        bodies.push(request(&tenant, &["agent-late@example.net"]));
    }
    let ids: Vec<Uuid> = bodies.iter().map(|b| b["request_id"].as_str().unwrap().parse().unwrap()).collect();
    let origins: HashMap<Uuid, String> = bodies.iter().map(|b| (b["request_id"].as_str().unwrap().parse().unwrap(), b["origin"].as_str().unwrap().to_string())).collect();

    // Publish from a separate task, with short pauses, so the stream is still running
    // when the switch flips.
    let channel = env.channel.clone();
    let publisher = tokio::spawn(async move {
        for body in bodies {
            let routing_key = body["tenant_id"].as_str().unwrap().to_string();
            outbound::broker::publish_request(&channel, &routing_key, body.to_string().as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });

    let mut sent_before_flip = 0;
    while sent_before_flip < 20 {
        let result = env.next_result(|r| r.origin == Some(outbound::request::Origin::Automation) && r.status == Status::Sent).await;
        assert!(result.is_final);
        sent_before_flip += 1;
    }
    flip(&env, &tenant).await;
    let committed: DateTime<Utc> = Utc::now();

    publisher.await.unwrap();
    for id in &ids {
        env.final_result(*id).await;
    }

    // Every automated message at the SMTP server was checked before the commit.
    let checks: HashMap<String, Option<DateTime<Utc>>> =
        sqlx::query_as::<_, (Option<String>, Option<DateTime<Utc>>)>("SELECT message_id, checked_at FROM deliveries WHERE origin = 'automation'")
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|(message_id, checked_at)| message_id.map(|id| (id, checked_at)))
            .collect();
    let received = env.received();
    let automated_received: Vec<_> = received.iter().filter(|r| r.header("Auto-Submitted").is_some()).collect();
    assert!(!automated_received.is_empty());
    for message in &automated_received {
        let message_id = message.header("Message-ID").unwrap();
        let checked_at = checks.get(&message_id).copied().flatten().expect("a sent automated message has its check time");
        assert!(checked_at < committed, "{message_id} was checked at {checked_at}, after the switch committed at {committed}");
    }

    let finals: Vec<_> = env.published.iter().filter(|p| p.result.is_final && !p.result.duplicate).map(|p| p.result.clone()).collect();
    let blocked = finals.iter().filter(|r| r.reason.map(|x| x.as_str()) == Some(expected_reason)).count();
    assert!(blocked > 0, "the switch blocked later automated replies");
    let agent_sent = finals.iter().filter(|r| origins.get(&r.request_id.unwrap()).map(String::as_str) == Some("agent") && r.status == Status::Sent).count();
    assert_eq!(agent_sent, AGENT, "every agent reply was sent");
    let committed_text = committed.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let agent_after = received.iter().filter(|r| r.header("Auto-Submitted").is_none() && r.received_at > committed_text).count();
    assert!(agent_after > 0, "agent replies kept flowing after the switch");
    let automated_after = automated_received.iter().filter(|r| r.received_at > committed_text).count();
    eprintln!(
        "{expected_reason}: {} automated sent ({automated_after} received after the commit, all checked before it), {blocked} blocked, {agent_after} agent replies after the commit",
        automated_received.len()
    );
    assert_eq!(common::final_counts(&env.published).len(), ids.len());
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_stops_automation_under_load() {
    flip_under_load(async |env: &TestEnv, _tenant: &Tenant| store::set_kill_switch(&env.pool, true, "load test").await.unwrap(), "kill_switch_active").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_pause_stops_automation_under_load() {
    flip_under_load(
        async |env: &TestEnv, tenant: &Tenant| {
            let pause = outbound::changes::tenant_changes(&["automation_paused=true".into()]).unwrap();
            store::set_tenant_settings(&env.pool, tenant.tenant_id, tenant.owner, &pause).await.unwrap()
        },
        "automation_paused",
    )
    .await;
}
