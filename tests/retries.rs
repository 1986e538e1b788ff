//! Deferred requests: retry without blocking the consumer, the retry window, unreachable
//! relays, and the composed-size limit.

mod common;

use std::time::Duration;

use common::{assert_status, request, TestEnv};
use outbound::outcome::Status;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_request_does_not_block_others() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_RETRY__INITIAL_DELAY".into(), "1h".into()), ("OUTBOUND_RETRY__MAX_DELAY".into(), "1h".into())];
    env.start_worker();
    let tenant = env.tenant(true).await;

    let waiting = env.publish(&request(&tenant, &["tempfail-waiting@example.net"])).await;
    let deferred = env.next_result(|r| r.request_id == Some(waiting)).await;
    assert_status(&deferred, Status::Deferred, Some("smtp_transient"));

    // With an hour until the retry, later requests still go out at once.
    for index in 0..3 {
        let result = env.publish_and_wait(&request(&tenant, &[&format!("next{index}@example.net")])).await;
        assert_status(&result, Status::Sent, None);
    }
    let row_status: String = sqlx::query_scalar("SELECT status FROM deliveries WHERE request_id = $1")
        .bind(waiting)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(row_status, "deferred");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_window_ends_in_retries_exhausted() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_RETRY__WINDOW".into(), "2500ms".into())];
    env.start_worker();
    let tenant = env.tenant(true).await;
    // The server defers this address three times; the window closes before a fourth try.
    let request_id = env.publish(&request(&tenant, &["tempfail3-patient@example.net"])).await;

    let result = env.final_result(request_id).await;

    assert_status(&result, Status::Failed, Some("retries_exhausted"));
    assert!(result.attempt >= 2, "{result:?}");
    let deferrals: Vec<_> = env.published.iter().filter(|p| p.result.request_id == Some(request_id) && p.result.status == Status::Deferred).collect();
    assert_eq!(deferrals.len() as u32, result.attempt - 1, "one deferred result per earlier attempt");
    for deferral in &deferrals {
        assert!(!deferral.result.is_final);
        assert!(deferral.result.next_attempt_at.is_some());
    }
    assert!(env.received().is_empty());
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_relay_times_out_as_unavailable() {
    // A relay that accepts the connection and never sends its greeting.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(4) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(30));
    });

    let mut env = TestEnv::start().await;
    env.extra_env = vec![
        ("OUTBOUND_SMTP_URL".into(), format!("smtp://127.0.0.1:{port}?tls=none")),
        ("OUTBOUND_SMTP__TIMEOUT".into(), "1s".into()),
        ("OUTBOUND_RETRY__INITIAL_DELAY".into(), "1h".into()),
    ];
    env.start_worker();
    let tenant = env.tenant(true).await;
    let started = std::time::Instant::now();
    let request_id = env.publish(&request(&tenant, &["customer@example.net"])).await;

    let result = env.next_result(|r| r.request_id == Some(request_id)).await;

    assert_status(&result, Status::Deferred, Some("smtp_unavailable"));
    assert!(result.detail.contains("did not respond within 1s"), "{}", result.detail);
    assert!(started.elapsed() < Duration::from_secs(10), "the greeting wait is bounded by smtp.timeout");
    env.check_contract();
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_invalid() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_LIMITS__MAX_MESSAGE_SIZE".into(), "8KiB".into())];
    env.start_worker();
    let tenant = env.tenant(true).await;
    let mut body = request(&tenant, &["customer@example.net"]);
    body["text_body"] = "This line repeats to make the message large.\n".repeat(300).into();

    let result = env.publish_and_wait(&body).await;

    assert_status(&result, Status::Invalid, Some("message_too_large"));
    assert!(result.detail.contains("8192"), "{}", result.detail);
    assert!(env.received().is_empty());
    assert!(env.rcpt_replies().is_empty());
    env.check_contract();
    assert!(!env.worker_log_text().contains(common::KEY_HEX), "the key encryption key is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_not_after_is_expired() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let mut body = request(&tenant, &["customer@example.net"]);
    body["not_after"] = "2020-01-01T00:00:00Z".into();

    let result = env.publish_and_wait(&body).await;

    assert_status(&result, Status::Failed, Some("expired"));
    assert!(result.detail.contains("2020-01-01T00:00:00"), "{}", result.detail);
    assert!(env.received().is_empty());
    env.check_contract();
}
