//! SIGTERM with requests in flight: the worker exits 0 within its grace period, and after a
//! restart every request has exactly one final result.

mod common;

use std::time::Duration;

use common::{request, TestEnv};
use outbound::outcome::Status;
use uuid::Uuid;

/// Publishes requests to `slow-` recipients (the SMTP server waits 3 s after DATA) and
/// waits until the first of them is inside an SMTP transaction.
async fn publish_slow_requests(env: &mut TestEnv, count: usize) -> Vec<Uuid> {
    let tenant = env.tenant(true).await;
    let mut ids = Vec::new();
    for index in 0..count {
        ids.push(env.publish(&request(&tenant, &[&format!("slow-{index}@example.net")])).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.rcpt_replies().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no SMTP transaction started; worker log:\n{}", env.worker_log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ids
}

async fn collect_finals(env: &mut TestEnv, ids: &[Uuid]) {
    for id in ids {
        let result = env.final_result(*id).await;
        assert_eq!(result.status, Status::Sent, "{result:?}");
    }
}

fn assert_one_final_each(env: &TestEnv, ids: &[Uuid]) {
    let counts = common::final_counts(&env.published);
    for id in ids {
        assert_eq!(counts.get(id), Some(&1), "request {id} has {:?} final results", counts.get(id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![
        ("OUTBOUND_WORKER__SHUTDOWN_GRACE".into(), "15s".into()),
        ("OUTBOUND_WORKER__PREFETCH".into(), "2".into()),
    ];
    env.start_worker();
    let ids = publish_slow_requests(&mut env, 6).await;

    let (status, took) = env.terminate_worker(Duration::from_secs(20));

    let status = status.expect("the worker exits within its grace period");
    assert!(status.success(), "exit status {status:?}; log:\n{}", env.worker_log_text());
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let log = env.worker_log_text();
    assert!(log.contains("stopped consuming; finishing in-flight requests"), "{log}");

    // The requests that were in flight finished before the exit; the rest wait in the
    // queue and a new worker takes them.
    let finished_before_restart = env.received().len();
    assert!(finished_before_restart >= 1, "in-flight requests were finished, not dropped");
    env.start_worker();
    collect_finals(&mut env, &ids).await;
    assert_one_final_each(&env, &ids);
    assert_eq!(env.received().len(), ids.len(), "each request was sent exactly once");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_grace_loses_nothing() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![
        ("OUTBOUND_WORKER__SHUTDOWN_GRACE".into(), "500ms".into()),
        ("OUTBOUND_WORKER__LEASE".into(), "2s".into()),
    ];
    env.start_worker();
    let ids = publish_slow_requests(&mut env, 4).await;

    let (status, took) = env.terminate_worker(Duration::from_secs(10));

    let status = status.expect("the worker exits when the grace period ends");
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(env.worker_log_text().contains("shutdown grace period over"), "{}", env.worker_log_text());

    // Unfinished requests come back from the queue or, once their lease ends, from the
    // deliveries table; each gets exactly one final result.
    env.start_worker();
    collect_finals(&mut env, &ids).await;
    assert_one_final_each(&env, &ids);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_request_taken_over() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_WORKER__LEASE".into(), "2s".into())];
    env.start_worker();
    let ids = publish_slow_requests(&mut env, 1).await;

    env.kill_worker();
    env.start_worker();
    let result = env.final_result(ids[0]).await;

    assert_eq!(result.status, Status::Sent, "{result:?}");
    assert_one_final_each(&env, &ids);
    // The SMTP server may have received the first copy before the kill (the duplicate
    // window of SMTP), but every copy carries the same Message-ID.
    let message_id = result.message_id.clone().unwrap();
    let copies = env.received();
    assert!(!copies.is_empty());
    for copy in &copies {
        assert_eq!(copy.header("Message-ID").as_deref(), Some(message_id.as_str()));
    }
    assert!(env.worker_log_text().contains("previous owner's lease ran out") || result.attempt >= 1);
    env.check_contract();
}
