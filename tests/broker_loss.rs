//! Losing the RabbitMQ connection, idle or with requests in flight: the worker reconnects,
//! declares its topology again, and sends nothing twice.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_status, request, TestEnv};
use outbound::outcome::Status;

/// Closes the worker's connections in this test's vhost from the broker side, as a broker
/// restart does, leaving the test's own connection open.
fn close_worker_connections(env: &TestEnv) -> usize {
    // Plain output: one line per connection, the pid, a tab, then the client properties.
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "-p", &env.vhost, "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut closed = 0;
    for line in listing.lines().filter(|line| line.contains("{\"connection_name\",\"outbound\"}")) {
        let pid = line.split('\t').next().expect("a pid column");
        let closing = Command::new("rabbitmqctl").args(["close_connection", pid, "test: simulated broker loss"]).output().unwrap();
        assert!(closing.status.success(), "closing {pid} failed: {}{}", String::from_utf8_lossy(&closing.stdout), String::from_utf8_lossy(&closing.stderr));
        closed += 1;
    }
    closed
}

/// Waits until the work queue has no ready or unacknowledged message.
async fn wait_for_empty_work_queue(env: &TestEnv) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "-p", &env.vhost, "name", "messages", "--formatter", "json"])
            .output()
            .expect("rabbitmqctl runs");
        let queues: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let pending = queues.iter().find(|q| q["name"] == outbound::broker::WORK_QUEUE).and_then(|q| q["messages"].as_u64());
        if pending == Some(0) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the work queue never emptied: {pending:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_log(env: &TestEnv, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env.worker_log_text().contains(needle) {
        assert!(std::time::Instant::now() < deadline, "worker log never showed {needle:?}:\n{}", env.worker_log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_reconnects() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_AMQP__HEARTBEAT".into(), "2s".into())];
    env.start_worker();
    let tenant = env.tenant(true).await;
    assert_status(&env.publish_and_wait(&request(&tenant, &["first@example.net"])).await, Status::Sent, None);

    assert!(close_worker_connections(&env) >= 1, "the worker has a connection");
    wait_for_log(&env, "RabbitMQ connection lost; reconnecting").await;

    let after = env.publish_and_wait(&request(&tenant, &["second@example.net"])).await;
    assert_status(&after, Status::Sent, None);
    assert_eq!(env.received().len(), 2);
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_worker_sends_once_after_loss() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let mut ids = Vec::new();
    for index in 0..3 {
        ids.push(env.publish(&request(&tenant, &[&format!("slow-{index}@example.net")])).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.rcpt_replies().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "the sends did not start:\n{}", env.worker_log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The SMTP sends are under way when the connection goes; the broker redelivers all three.
    assert!(close_worker_connections(&env) >= 1);

    for id in &ids {
        assert_status(&env.final_result(*id).await, Status::Sent, None);
    }
    // Let the redelivered copies be processed, then check nothing went out twice.
    wait_for_empty_work_queue(&env).await;
    let probe = env.publish_and_wait(&request(&tenant, &["probe@example.net"])).await;
    assert_status(&probe, Status::Sent, None);
    let counts = common::final_counts(&env.published);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "one final result for {id}");
    }
    assert_eq!(env.received().len(), 4, "each request reached the SMTP server once");
    env.check_contract();
}
