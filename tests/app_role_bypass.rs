//! The worker refuses to start when its application role would bypass row-level security.
//!
//! This changes the cluster-wide role `outbound_app` for a moment, so it is the only test
//! in its binary; cargo runs test binaries one after another.

mod common;

use common::TestEnv;

/// Restores the role when the test ends, even on a failed assertion.
struct RestoreRole(String);

impl Drop for RestoreRole {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", &self.0, "-qc", "ALTER ROLE outbound_app NOBYPASSRLS"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_bypassing_role() {
    let env = TestEnv::start().await;
    let _restore = RestoreRole(env.database.clone());
    sqlx::query("ALTER ROLE outbound_app BYPASSRLS").execute(&env.pool).await.unwrap();

    let output = env.worker_command().output().unwrap();

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to start: the role outbound_app is a superuser or has BYPASSRLS"), "{stderr}");
    assert!(stderr.contains("ALTER ROLE outbound_app NOSUPERUSER NOBYPASSRLS"), "{stderr}");
}
