//! Tenant isolation in PostgreSQL: row-level security for the application role, tenant
//! scope that never leaks through the pool, and the owner-only rule in the database.

mod common;

use common::{assert_status, request, TestEnv, Tenant};
use outbound::outcome::Status;
use outbound::store::{self, scoped};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// Tables with a tenant column, and the column's name.
const TENANT_TABLES: &[(&str, &str)] = &[
    ("tenants", "id"),
    ("tenant_members", "tenant_id"),
    ("sending_domains", "tenant_id"),
    ("dkim_keys", "tenant_id"),
    ("automations", "tenant_id"),
    ("suppressions", "tenant_id"),
    ("tenant_restrictions", "tenant_id"),
    ("deliveries", "tenant_id"),
    ("audit_log", "tenant_id"),
];

/// Gives a tenant at least one row in every tenant table.
async fn populate(env: &mut TestEnv, tenant: &Tenant) {
    store::create_automation(&env.pool, tenant.tenant_id, tenant.owner, "Bot").await.unwrap();
    store::add_suppression(&env.pool, tenant.tenant_id, &format!("blocked@{}", tenant.domain)).await.unwrap();
    sqlx::query("INSERT INTO tenant_restrictions (id, tenant_id, detector, scope) VALUES ($1, $2, 'volume_spike', 'automation')")
        .bind(Uuid::new_v4())
        .bind(tenant.tenant_id)
        .execute(&env.pool)
        .await
        .unwrap();
    let result = env.publish_and_wait(&request(tenant, &["customer@example.net"])).await;
    assert_eq!(result.status, Status::Sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scope_hides_other_tenants() {
    let mut env = TestEnv::with_worker().await;
    let alpha = env.tenant(true).await;
    let beta = env.tenant(true).await;
    populate(&mut env, &alpha).await;
    populate(&mut env, &beta).await;

    for (table, column) in TENANT_TABLES {
        let mut tx = scoped(&env.pool, alpha.tenant_id, Some(alpha.owner)).await.unwrap();
        let own: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} = $1"))
            .bind(alpha.tenant_id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert!(own > 0, "{table}: the tenant sees its own rows");
        let foreign: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} = $1"))
            .bind(beta.tenant_id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(foreign, 0, "{table}: another tenant's rows are invisible");
        let all: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} IS DISTINCT FROM $1"))
            .bind(alpha.tenant_id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(all, 0, "{table}: no row of any other tenant is visible");

        let updated = sqlx::query(&format!("UPDATE {table} SET {column} = {column} WHERE {column} = $1"))
            .bind(beta.tenant_id)
            .execute(&mut *tx)
            .await;
        match updated {
            Ok(done) => assert_eq!(done.rows_affected(), 0, "{table}: another tenant's rows cannot be updated"),
            Err(err) => assert!(err.to_string().contains("permission denied"), "{table}: {err}"),
        }
        tx.rollback().await.unwrap();

        let mut tx = scoped(&env.pool, alpha.tenant_id, Some(alpha.owner)).await.unwrap();
        let deleted = sqlx::query(&format!("DELETE FROM {table} WHERE {column} = $1")).bind(beta.tenant_id).execute(&mut *tx).await;
        match deleted {
            Ok(done) => assert_eq!(done.rows_affected(), 0, "{table}: another tenant's rows cannot be deleted"),
            Err(err) => assert!(err.to_string().contains("permission denied"), "{table}: {err}"),
        }
        tx.rollback().await.unwrap();
    }

    // Writing a row for another tenant under this scope fails the policy's check.
    let mut tx = scoped(&env.pool, alpha.tenant_id, Some(alpha.owner)).await.unwrap();
    let planted = sqlx::query("INSERT INTO suppressions (tenant_id, address) VALUES ($1, 'x@y.example')").bind(beta.tenant_id).execute(&mut *tx).await;
    assert!(planted.unwrap_err().to_string().contains("row-level security"));
    tx.rollback().await.unwrap();

    // Every beta row is still there, seen by the login role.
    for (table, column) in TENANT_TABLES {
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} = $1")).bind(beta.tenant_id).fetch_one(&env.pool).await.unwrap();
        assert!(count > 0, "{table}: beta's rows are untouched");
    }
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_keeps_no_tenant() {
    let mut env = TestEnv::start().await;
    let alpha = env.tenant(true).await;
    // One connection, so every query below reuses the connection of the scoped transaction.
    let pool = PgPoolOptions::new().max_connections(1).connect(&env.database_url).await.unwrap();

    let mut tx = scoped(&pool, alpha.tenant_id, None).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(seen, 1);
    tx.commit().await.unwrap();

    let setting: Option<String> = sqlx::query_scalar("SELECT current_setting('app.tenant_id', true)").fetch_one(&pool).await.unwrap();
    assert!(setting.unwrap_or_default().is_empty(), "the tenant setting ended with the transaction");
    let role: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&pool).await.unwrap();
    assert_ne!(role, store::APP_ROLE, "the role ended with the transaction");

    // As the application role with no tenant set, nothing is visible.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('role', 'outbound_app', true)").execute(&mut *tx).await.unwrap();
    let unscoped: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(unscoped, 0);
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_domain_is_sender_mismatch() {
    let mut env = TestEnv::with_worker().await;
    let alpha = env.tenant(true).await;
    let beta = env.tenant(true).await;
    let mut body = request(&alpha, &["customer@example.net"]);
    body["from"]["address"] = format!("support@{}", beta.domain).into();

    let result = env.publish_and_wait(&body).await;

    assert_status(&result, Status::Blocked, Some("sender_domain_mismatch"));
    assert!(env.received().is_empty());
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_rule_holds_for_plain_sql() {
    let mut env = TestEnv::start().await;
    let tenant = env.tenant(true).await;
    let admin = store::add_member(&env.pool, tenant.tenant_id, tenant.owner, "admin@shop.example", "admin").await.unwrap();
    let audit_before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log").fetch_one(&env.pool).await.unwrap();

    let statements = [
        "UPDATE tenants SET outbound_enabled = false WHERE id = $1",
        "UPDATE tenants SET automation_paused = true WHERE id = $1",
        "INSERT INTO automations (id, tenant_id, name) VALUES (gen_random_uuid(), $1, 'sneaky')",
        "UPDATE sending_domains SET status = 'verified' WHERE tenant_id = $1",
        "UPDATE dkim_keys SET state = 'retired' WHERE tenant_id = $1",
        "INSERT INTO tenant_members (id, tenant_id, email, role) VALUES (gen_random_uuid(), $1, 'me@evil.example', 'owner')",
        "DELETE FROM tenant_members WHERE tenant_id = $1 AND role = 'owner'",
    ];
    for actor in [Some(admin), Some(Uuid::new_v4()), None] {
        for statement in statements {
            let mut tx = scoped(&env.pool, tenant.tenant_id, actor).await.unwrap();
            let err = sqlx::query(statement).bind(tenant.tenant_id).execute(&mut *tx).await.unwrap_err();
            assert!(
                err.to_string().contains("permission denied: only the tenant owner can change outbound email settings"),
                "{statement} as {actor:?}: {err}"
            );
            tx.rollback().await.unwrap();
        }
    }
    let enabled: bool = sqlx::query_scalar("SELECT outbound_enabled FROM tenants WHERE id = $1").bind(tenant.tenant_id).fetch_one(&env.pool).await.unwrap();
    assert!(enabled, "the row is unchanged");
    let audit_after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log").fetch_one(&env.pool).await.unwrap();
    assert_eq!(audit_after, audit_before);

    let mut tx = scoped(&env.pool, tenant.tenant_id, Some(tenant.owner)).await.unwrap();
    let done = sqlx::query(statements[0]).bind(tenant.tenant_id).execute(&mut *tx).await.unwrap();
    assert_eq!(done.rows_affected(), 1, "the owner may change the setting");
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_without_app_role_refuses() {
    let env = TestEnv::start().await;
    // A login role that may read the tables but is not a member of outbound_app.
    let login = format!("outbound_nomember_{}", &Uuid::new_v4().simple().to_string()[..8]);
    for statement in [
        format!("CREATE ROLE {login} LOGIN"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {login}"),
    ] {
        sqlx::query(&statement).execute(&env.pool).await.unwrap();
    }
    let url = env.database_url.replace("postgres://postgres@", &format!("postgres://{login}@"));

    let output = env.worker_command().env("OUTBOUND_DATABASE_URL", &url).output().unwrap();

    let _ = sqlx::query(&format!("DROP OWNED BY {login}")).execute(&env.pool).await;
    let _ = sqlx::query(&format!("DROP ROLE {login}")).execute(&env.pool).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to start: the worker cannot switch to the role outbound_app"), "{stderr}");
    assert!(stderr.contains("grant outbound_app"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_request_id_reveals_nothing() {
    let mut env = TestEnv::with_worker().await;
    let alpha = env.tenant(true).await;
    let beta = env.tenant(true).await;
    let first = request(&alpha, &["customer@example.net"]);
    let sent = env.publish_and_wait(&first).await;
    assert_status(&sent, Status::Sent, None);

    // Beta publishes a request with alpha's request id.
    let mut copy = request(&beta, &["other@example.net"]);
    copy["request_id"] = first["request_id"].clone();
    env.publish(&copy).await;
    let result = env.next_result(|r| r.tenant_id == Some(beta.tenant_id)).await;

    assert_status(&result, Status::Invalid, Some("invalid_field"));
    assert!(result.detail.contains("request_id"), "{}", result.detail);
    assert_eq!(result.message_id, None, "alpha's Message-ID is not revealed");
    assert!(!result.duplicate);
    assert_eq!(env.received().len(), 1, "beta's copy was not sent");
    env.check_contract();
}
