//! The main path against real PostgreSQL, RabbitMQ, an aiosmtpd server and the worker binary.

mod common;

use common::{assert_status, request, TestEnv};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbound::outcome::{RecipientStatus, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reply_sent_and_verified() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let example = common::shared_dir().join("contract/examples/agent-reply.json");
    let body = common::shared_request(&example, &tenant);

    let result = env.publish_and_wait(&body).await;

    assert_status(&result, Status::Sent, None);
    assert_eq!(result.attempt, 1);
    assert_eq!(result.metadata, Some(serde_json::json!({"ticket": "48213"})), "metadata is echoed");
    let message_id = result.message_id.clone().expect("a sent result names its Message-ID");
    assert!(message_id.ends_with(&format!("@{}>", tenant.domain)), "{message_id}");
    assert_eq!(result.recipients.len(), 1);
    assert_eq!(result.recipients[0].status, RecipientStatus::Accepted);
    assert_eq!(result.recipients[0].smtp_code, Some(250));

    let received = env.received_with_message_id(&message_id);
    assert_eq!(received.len(), 1, "exactly one SMTP transaction");
    let message = &received[0];
    assert_eq!(message.mail_from, format!("support@{}", tenant.domain));
    assert_eq!(message.rcpt_tos, vec!["jamie.doe@customer.example"]);
    assert_eq!(message.header("In-Reply-To").as_deref(), Some("<CAF3x9-inbound-1@mail.customer.example>"));
    assert_eq!(message.header("References").as_deref(), Some("<CAF3x9-inbound-1@mail.customer.example>"));
    assert_eq!(message.header("MIME-Version").as_deref(), Some("1.0"));
    assert!(message.header("Date").is_some());
    assert!(message.header("Auto-Submitted").is_none(), "agent replies are not auto-submitted");
    let signature = message.header("DKIM-Signature").expect("signed");
    assert!(signature.contains(&format!("d={}", tenant.domain)), "{signature}");
    assert!(signature.contains("c=relaxed/relaxed"), "{signature}");
    let signed: String = signature.split("h=").nth(1).unwrap().split(';').next().unwrap().split_whitespace().collect();
    let signed = signed.to_ascii_lowercase();
    for field in ["from", "to", "subject", "date", "message-id", "in-reply-to", "references", "mime-version", "content-type"] {
        assert!(signed.split(':').any(|h| h == field), "{field} not signed: {signed}");
    }

    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_threads_onto_previous() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let first = request(&tenant, &["customer@example.net"]);
    let mut follow_up = request(&tenant, &["customer@example.net"]);
    follow_up["conversation_id"] = first["conversation_id"].clone();

    let first_result = env.publish_and_wait(&first).await;
    let second_result = env.publish_and_wait(&follow_up).await;

    assert_status(&first_result, Status::Sent, None);
    assert_status(&second_result, Status::Sent, None);
    let first_id = first_result.message_id.clone().unwrap();
    let second = &env.received_with_message_id(second_result.message_id.as_ref().unwrap())[0];
    assert_eq!(second.header("In-Reply-To"), Some(first_id.clone()));
    assert_eq!(second.header("References"), Some(first_id.clone()));
    let first_message = &env.received_with_message_id(&first_id)[0];
    assert!(first_message.header("In-Reply-To").is_none(), "the first message of a conversation threads onto nothing");

    // A third reply carries the whole chain.
    let mut third = request(&tenant, &["customer@example.net"]);
    third["conversation_id"] = first["conversation_id"].clone();
    let third_result = env.publish_and_wait(&third).await;
    let third_message = &env.received_with_message_id(third_result.message_id.as_ref().unwrap())[0];
    assert_eq!(third_message.header("In-Reply-To"), second_result.message_id.clone());
    assert_eq!(third_message.header("References"), Some(format!("{} {}", first_id, second_result.message_id.unwrap())));

    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_checks_block_in_order() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let unverified = env.tenant(false).await;
    let disabled = env.tenant(true).await;
    let disable = outbound::changes::tenant_changes(&["outbound_enabled=false".into()]).unwrap();
    outbound::store::set_tenant_settings(&env.pool, disabled.tenant_id, disabled.owner, &disable).await.unwrap();

    let mut unknown_tenant = request(&tenant, &["customer@example.net"]);
    unknown_tenant["tenant_id"] = uuid::Uuid::new_v4().to_string().into();
    let mut mismatch = request(&tenant, &["customer@example.net"]);
    mismatch["from"]["address"] = format!("support@{}", unverified.domain).into();
    let not_verified = request(&unverified, &["customer@example.net"]);
    // Disabled and on a foreign domain: outbound_disabled comes first in the contract's order.
    let mut disabled_request = request(&disabled, &["customer@example.net"]);
    disabled_request["from"]["address"] = format!("support@{}", tenant.domain).into();

    let cases = [
        (unknown_tenant, "tenant_not_found"),
        (mismatch, "sender_domain_mismatch"),
        (not_verified, "domain_not_verified"),
        (disabled_request, "outbound_disabled"),
    ];
    for (body, reason) in &cases {
        let result = env.publish_and_wait(body).await;
        assert_status(&result, Status::Blocked, Some(reason));
        assert!(result.is_final);
        assert!(!result.detail.is_empty());
    }

    assert!(env.received().is_empty(), "nothing reaches the SMTP server");
    assert!(env.rcpt_replies().is_empty());
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_requests_dead_lettered() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;

    env.publish_raw("unknown", b"this is not json {").await;
    let not_json = env.next_result(|r| r.status == Status::Invalid && r.reason.map(|x| x.as_str()) == Some("invalid_json")).await;
    assert_eq!(not_json.request_id, None);
    assert_eq!(not_json.tenant_id, None);

    let mut wrong_schema = request(&tenant, &["customer@example.net"]);
    wrong_schema["schema"] = "outbound.send_request.v7".into();
    let wrong_schema_result = env.publish_and_wait(&wrong_schema).await;
    assert_status(&wrong_schema_result, Status::Invalid, Some("unsupported_schema"));

    let mut missing = request(&tenant, &["customer@example.net"]);
    missing.as_object_mut().unwrap().remove("to");
    let missing_result = env.publish_and_wait(&missing).await;
    assert_status(&missing_result, Status::Invalid, Some("missing_field"));
    assert!(missing_result.detail.contains("to"), "{}", missing_result.detail);

    // The dead-letter queue contains the bodies unchanged, each with the reason header.
    let mut bodies = Vec::new();
    while let Some(message) = env
        .channel
        .basic_get(outbound::broker::DEAD_LETTER_QUEUE, BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = message.delivery.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get(outbound::broker::ERROR_HEADER) {
            Some(AMQPValue::LongString(text)) => text.to_string(),
            other => panic!("missing x-outbound-error header: {other:?}"),
        };
        bodies.push((message.delivery.data.clone(), reason));
    }
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert_eq!(bodies[0].0, b"this is not json {");
    assert!(bodies[0].1.starts_with("invalid_json"), "{}", bodies[0].1);
    assert_eq!(bodies[1].0, wrong_schema.to_string().into_bytes());
    assert!(bodies[1].1.starts_with("unsupported_schema"));

    // The worker is still running and sends the next valid request.
    let valid = env.publish_and_wait(&request(&tenant, &["customer@example.net"])).await;
    assert_status(&valid, Status::Sent, None);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_request_sent_once() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let body = request(&tenant, &["customer@example.net"]);

    let first = env.publish_and_wait(&body).await;
    let request_id = env.publish(&body).await;
    let second = env.next_result(|r| r.request_id == Some(request_id) && r.duplicate).await;

    assert_status(&first, Status::Sent, None);
    assert!(!first.duplicate);
    assert_status(&second, Status::Sent, None);
    assert!(second.duplicate);
    assert_eq!(second.message_id, first.message_id);
    assert_ne!(second.event_id, first.event_id);
    assert_eq!(env.received().len(), 1, "one SMTP transaction");
    env.check_contract();
}

/// A repeat that arrives before the first result's confirmation is recorded (the window
/// between the broker's confirm and the database update) still gets its duplicate result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_before_publication_recorded() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let body = request(&tenant, &["customer@example.net"]);
    let first = env.publish_and_wait(&body).await;
    let request_id = first.request_id.expect("request id");
    // The worker records the publication just after the broker's confirm; wait for that
    // write, or it would land after the reset below.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let recorded: bool = sqlx::query_scalar("SELECT result_published_at IS NOT NULL FROM deliveries WHERE request_id = $1")
            .bind(request_id)
            .fetch_one(&env.pool)
            .await
            .expect("delivery row");
        if recorded {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the worker never recorded the publication");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    sqlx::query("UPDATE deliveries SET result_published_at = NULL WHERE request_id = $1")
        .bind(request_id)
        .execute(&env.pool)
        .await
        .expect("forget the publication");

    env.publish(&body).await;
    let second = env.next_result(|r| r.request_id == Some(request_id) && r.duplicate).await;

    assert!(second.duplicate);
    assert_eq!(second.message_id, first.message_id);
    let republished = env.published.iter().filter(|p| p.result.event_id == first.event_id).count();
    assert_eq!(republished, 2, "the stored result is published again under its own event id");
    assert_eq!(env.received().len(), 1, "one SMTP transaction");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_rcpt_deferred_then_sent() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let body = request(&tenant, &["tempfail-jamie@example.net"]);
    let request_id = env.publish(&body).await;

    let deferred = env.next_result(|r| r.request_id == Some(request_id)).await;
    let sent = env.final_result(request_id).await;

    assert_status(&deferred, Status::Deferred, Some("smtp_transient"));
    assert!(!deferred.is_final);
    assert!(deferred.next_attempt_at.is_some());
    assert_eq!(deferred.attempt, 1);
    assert_eq!(deferred.recipients[0].smtp_code, Some(450));
    assert_eq!(deferred.recipients[0].enhanced_code.as_deref(), Some("4.2.1"));
    assert_status(&sent, Status::Sent, None);
    assert_eq!(sent.attempt, 2);
    assert_eq!(sent.message_id, deferred.message_id, "the Message-ID is kept across retries");
    assert_eq!(env.rcpt_replies(), vec![("tempfail-jamie@example.net".to_string(), 450), ("tempfail-jamie@example.net".to_string(), 250)]);
    assert_eq!(env.received().len(), 1);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_rejections_fail() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;

    let rcpt = env.publish_and_wait(&request(&tenant, &["reject-jamie@example.net"])).await;
    assert_status(&rcpt, Status::Failed, Some("smtp_rejected"));
    assert_eq!(rcpt.recipients[0].status, RecipientStatus::Rejected);
    assert_eq!(rcpt.recipients[0].smtp_code, Some(550));
    assert_eq!(rcpt.recipients[0].enhanced_code.as_deref(), Some("5.1.1"));

    let data = env.publish_and_wait(&request(&tenant, &["datareject-jamie@example.net"])).await;
    assert_status(&data, Status::Failed, Some("smtp_rejected"));
    assert_eq!(data.recipients[0].smtp_code, Some(554));
    assert_eq!(data.recipients[0].enhanced_code.as_deref(), Some("5.7.1"));
    assert!(data.detail.contains("554"), "{}", data.detail);

    let accepted: Vec<_> = env.received().into_iter().filter(|r| r.reply.starts_with("250")).collect();
    assert!(accepted.is_empty(), "nothing was accepted");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_recipients_partially_rejected() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let body = request(&tenant, &["jamie@example.net", "reject-sam@example.net", "alex@example.org"]);

    let result = env.publish_and_wait(&body).await;

    assert_status(&result, Status::Sent, Some("partially_rejected"));
    let by_address: std::collections::HashMap<_, _> = result.recipients.iter().map(|r| (r.address.as_str(), r)).collect();
    assert_eq!(by_address["jamie@example.net"].status, RecipientStatus::Accepted);
    assert_eq!(by_address["alex@example.org"].status, RecipientStatus::Accepted);
    assert_eq!(by_address["reject-sam@example.net"].status, RecipientStatus::Rejected);
    assert_eq!(by_address["reject-sam@example.net"].smtp_code, Some(550));
    let received = env.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, vec!["jamie@example.net", "alex@example.org"]);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_unmigrated_database() {
    let env = TestEnv::start().await;
    let output = env
        .worker_command()
        .env("OUTBOUND_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .output()
        .expect("worker runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("run `outbound migrate`"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reports_every_bad_setting() {
    let env = TestEnv::start().await;
    let output = env
        .worker_command()
        .env_remove("OUTBOUND_SMTP_URL")
        .env("OUTBOUND_RETRY__WINDOW", "forever")
        .env("OUTBOUND_WORKER__PREFETCH", "-3")
        .output()
        .expect("worker runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("retry.window"), "{stderr}");
    assert!(stderr.contains("worker.prefetch"), "{stderr}");
    assert!(stderr.contains("missing setting smtp.url"), "{stderr}");
    assert!(!stderr.contains(common::KEY_HEX), "the key must never be printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_changes_nothing() {
    let env = TestEnv::start().await;
    let count_tables = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let before = count_tables().await;
    for _ in 0..2 {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbound"))
            .arg("migrate")
            .env("OUTBOUND_DATABASE_URL", &env.database_url)
            .env("OUTBOUND_AMQP_URL", &env.amqp_url)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    assert_eq!(count_tables().await, before);
    let queue = env
        .channel
        .queue_declare(outbound::broker::WORK_QUEUE, QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("the work queue exists");
    assert_eq!(queue.name().as_str(), outbound::broker::WORK_QUEUE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_served() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let sent = env.publish_and_wait(&request(&tenant, &["customer@example.net"])).await;
    assert_status(&sent, Status::Sent, None);
    let mut blocked = request(&tenant, &["customer@example.net"]);
    blocked["tenant_id"] = uuid::Uuid::new_v4().to_string().into();
    env.publish_and_wait(&blocked).await;

    let (health, _) = common::http_get(env.metrics_port, "/healthz");
    assert_eq!(health, 200);
    let (ready, ready_body) = common::http_get(env.metrics_port, "/readyz");
    assert_eq!(ready, 200, "{ready_body}");
    // The worker updates its counters just after the broker confirms a result, so the
    // test reads /metrics until they show both requests or a deadline passes.
    let expected = [
        "outbound_requests_received_total{origin=\"agent\"} 2",
        "outbound_results_total{status=\"sent\",reason=\"none\"} 1",
        "outbound_results_total{status=\"blocked\",reason=\"tenant_not_found\"} 1",
        "outbound_smtp_duration_seconds_count 1",
        "outbound_end_to_end_seconds_count 2",
        "outbound_inflight_messages 0",
        "outbound_tenant_restrictions_active 0",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let (status, metrics) = common::http_get(env.metrics_port, "/metrics");
        assert_eq!(status, 200);
        if expected.iter().all(|series| metrics.contains(series)) || std::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for series in expected {
        assert!(metrics.contains(series), "missing {series} in:\n{metrics}");
    }
    assert!(!metrics.contains(&tenant.tenant_id.to_string()), "no tenant label");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_each_sent_once() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let mut ids = Vec::new();
    for index in 0..40 {
        ids.push(env.publish(&request(&tenant, &[&format!("customer{index}@example.net")])).await);
    }
    for id in &ids {
        assert_status(&env.final_result(*id).await, Status::Sent, None);
    }
    assert_eq!(env.received().len(), 40);
    let counts = common::final_counts(&env.published);
    assert!(ids.iter().all(|id| counts.get(id) == Some(&1)));
    env.check_contract();
}
