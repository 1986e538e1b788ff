//! PostgreSQL access: connection, migrations and every query of the service.
//!
//! Each function runs one short statement or transaction; none is held across network
//! calls to the broker or the relay.

use std::str::FromStr;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Row};
use uuid::Uuid;

use crate::configuration::DatabaseSettings;
use crate::dkim::Algorithm;
use crate::domains::{DomainFacts, DomainStatus, KeyFacts, KeyState};
use crate::outcome::{DeliveryResult, RecipientOutcome, Status};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("cannot connect to PostgreSQL at {target} ({reason}); check OUTBOUND_DATABASE_URL and that PostgreSQL is running")]
    Unreachable { target: String, reason: String },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("permission denied: only the tenant owner can change outbound email settings")]
    PermissionDenied,
}

impl From<sqlx::Error> for StoreError {
    /// Maps the owner-only trigger's `insufficient_privilege` error to [`StoreError::PermissionDenied`].
    fn from(err: sqlx::Error) -> Self {
        let denied = err.as_database_error().and_then(|db| db.code()).is_some_and(|code| code == "42501");
        if denied {
            StoreError::PermissionDenied
        } else {
            StoreError::Database(err)
        }
    }
}

/// The role that tenant-scoped queries run as; row-level security limits it to the tenant
/// set in the transaction.
pub const APP_ROLE: &str = "outbound_app";

/// Begins a transaction that runs as [`APP_ROLE`], scoped to one tenant and, for changes,
/// one acting user. Every setting is local to the transaction, so nothing leaks to the next
/// user of the pooled connection.
pub async fn scoped(pool: &PgPool, tenant_id: Uuid, actor: Option<Uuid>) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('role', $1, true), set_config('app.tenant_id', $2, true), set_config('app.actor_id', $3, true)")
        .bind(APP_ROLE)
        .bind(tenant_id.to_string())
        .bind(actor.map(|actor| actor.to_string()).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Begins a transaction scoped to `tenant_id` as [`APP_ROLE`], or an unscoped one as the
/// login role when the request has no readable tenant.
async fn tenant_tx(pool: &PgPool, tenant_id: Option<Uuid>) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    match tenant_id {
        Some(tenant_id) => scoped(pool, tenant_id, None).await,
        None => Ok(pool.begin().await?),
    }
}

/// Fails unless tenant-scoped queries really run under row-level security: the login role
/// can switch to [`APP_ROLE`], and that role is neither superuser nor BYPASSRLS.
pub async fn check_tenant_isolation(pool: &PgPool) -> Result<(), String> {
    let fix = "run `outbound migrate` as a role that may create roles, and grant outbound_app to the worker's login role";
    let mut tx = pool.begin().await.map_err(|err| err.to_string())?;
    if let Err(err) = sqlx::query("SELECT set_config('role', $1, true)").bind(APP_ROLE).execute(&mut *tx).await {
        return Err(format!("the worker cannot switch to the role {APP_ROLE} ({err}), so its queries would not be limited to one tenant; {fix}"));
    }
    let bypasses: bool = sqlx::query_scalar("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&mut *tx)
        .await
        .map_err(|err| err.to_string())?;
    let _ = tx.rollback().await;
    if bypasses {
        return Err(format!(
            "the role {APP_ROLE} is a superuser or has BYPASSRLS, so row-level security would not limit it; run ALTER ROLE {APP_ROLE} NOSUPERUSER NOBYPASSRLS"
        ));
    }
    Ok(())
}

impl StoreError {
    /// True when retrying the same call later may succeed (connection lost, pool timeout).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Database(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_))
                | StoreError::Unreachable { .. }
        )
    }
}

/// How long a process waits for PostgreSQL at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// One attempt: commands run by a person fail within seconds.
    Once,
    /// Retries with backoff for about half a minute, so that a worker started together
    /// with its database does not fail at once.
    Retry,
}

/// Timeout of one connection attempt, the TCP connect and the PostgreSQL start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects a pool. The first connection is opened alone, so that an unreachable server
/// reports its real cause (refused, unknown host, bad password) instead of a pool timeout.
pub async fn connect(settings: &DatabaseSettings, patience: Patience) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(&settings.url)?.log_statements(tracing::log::LevelFilter::Debug);
    let attempt = || async {
        match tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&options)).await {
            Ok(result) => result,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    };
    let attempts = if patience == Patience::Retry { 6 } else { 0 };
    let first = attempt
        .retry(ExponentialBuilder::default().with_min_delay(Duration::from_millis(500)).with_max_times(attempts))
        .when(|err| matches!(err, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut))
        .notify(|err, delay| tracing::warn!(error = %err, retry_in = ?delay, "database connection failed, retrying"))
        .await
        .map_err(|err| StoreError::Unreachable { target: describe_target(&options), reason: unreachable_reason(&err) })?;
    let _ = first.close().await;

    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    Ok(pool)
}

fn describe_target(options: &PgConnectOptions) -> String {
    format!("{}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or("postgres"))
}

fn unreachable_reason(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::PoolTimedOut => format!("no response within {} s", CONNECT_TIMEOUT.as_secs()),
        other => other.to_string(),
    }
}

/// Creates the database named in the URL when it does not exist, through the
/// `postgres` maintenance database, then applies the migrations.
pub async fn migrate(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(&settings.url)?;
    let database = options.get_database().unwrap_or("postgres").to_string();
    let maintenance = options.clone().database("postgres");
    match sqlx::PgConnection::connect_with(&maintenance).await {
        Ok(mut connection) => {
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&database)
                .fetch_one(&mut connection)
                .await?;
            if !exists {
                let quoted = database.replace('"', "\"\"");
                match sqlx::query(&format!("CREATE DATABASE \"{quoted}\""))
                    .execute(&mut connection)
                    .await
                {
                    Ok(_) => tracing::info!(database = %database, "created database"),
                    // Another process created it between the check and here.
                    Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => {}
                    Err(err) => return Err(err.into()),
                }
            }
            let _ = connection.close().await;
        }
        Err(err) => tracing::debug!(error = %err, "maintenance database not reachable; assuming the database exists"),
    }

    let pool = connect(settings, Patience::Retry).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

// ---------------------------------------------------------------------------------
// Tenants, members and domains.

#[derive(Debug, Clone)]
pub struct NewTenant {
    pub tenant_id: Uuid,
    pub owner_user_id: Uuid,
}

pub async fn create_tenant(pool: &PgPool, name: &str, owner_email: &str, plan: &str) -> Result<NewTenant, StoreError> {
    let tenant_id = Uuid::new_v4();
    let owner_user_id = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO tenants (id, name, plan) VALUES ($1, $2, $3)")
        .bind(tenant_id)
        .bind(name)
        .bind(plan)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO tenant_members (id, tenant_id, email, role) VALUES ($1, $2, $3, 'owner')")
        .bind(owner_user_id)
        .bind(tenant_id)
        .bind(owner_email)
        .execute(&mut *tx)
        .await?;
    audit(&mut tx, Some(tenant_id), "operator", "tenant.create", None, None, Some(serde_json::json!({"name": name, "plan": plan, "owner_email": owner_email})), None).await?;
    tx.commit().await?;
    Ok(NewTenant { tenant_id, owner_user_id })
}

/// Fails with [`StoreError::NotFound`] unless the tenant is visible on this connection,
/// which under a tenant scope means it is that tenant. The owner-only rule itself is
/// enforced by the database's `owner_only` triggers.
async fn require_scoped_tenant(tx: &mut sqlx::PgConnection, tenant_id: Uuid) -> Result<(), StoreError> {
    let tenant_exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if tenant_exists {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!("tenant {tenant_id} not found; check the --tenant id")))
    }
}

pub async fn add_member(pool: &PgPool, tenant_id: Uuid, actor: Uuid, email: &str, role: &str) -> Result<Uuid, StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_scoped_tenant(&mut tx, tenant_id).await?;
    let user_id = Uuid::new_v4();
    let inserted = sqlx::query("INSERT INTO tenant_members (id, tenant_id, email, role) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .bind(user_id)
        .bind(tenant_id)
        .bind(email)
        .bind(role)
        .execute(&mut *tx)
        .await?;
    if inserted.rows_affected() == 0 {
        return Err(StoreError::Conflict(format!("{email} is already a member of tenant {tenant_id}")));
    }
    audit(&mut tx, Some(tenant_id), &actor.to_string(), "member.add", Some(email), None, Some(serde_json::json!({"user_id": user_id, "role": role})), None).await?;
    tx.commit().await?;
    Ok(user_id)
}

pub struct NewDomain<'a> {
    pub tenant_id: Uuid,
    pub actor: Uuid,
    pub domain: &'a str,
    pub verification_token: &'a str,
    /// The first RSA key; it signs as soon as the domain is verified.
    pub key: NewKey<'a>,
}

pub struct NewKey<'a> {
    pub selector: &'a str,
    pub algorithm: Algorithm,
    pub encrypted_private_key: Vec<u8>,
    pub public_key: &'a str,
}

pub async fn add_domain(pool: &PgPool, new: NewDomain<'_>) -> Result<(), StoreError> {
    let mut tx = scoped(pool, new.tenant_id, Some(new.actor)).await?;
    require_scoped_tenant(&mut tx, new.tenant_id).await?;
    let inserted = sqlx::query("INSERT INTO sending_domains (id, tenant_id, domain, verification_token) VALUES ($1, $2, $3, $4) ON CONFLICT (domain) DO NOTHING")
        .bind(Uuid::new_v4())
        .bind(new.tenant_id)
        .bind(new.domain)
        .bind(new.verification_token)
        .execute(&mut *tx)
        .await?;
    if inserted.rows_affected() == 0 {
        return Err(StoreError::Conflict(format!(
            "domain {} is already registered; each sending domain belongs to one tenant",
            new.domain
        )));
    }
    insert_key(&mut tx, new.tenant_id, new.domain, &new.key, KeyState::Active).await?;
    let value = serde_json::json!({"selector": new.key.selector, "status": "pending"});
    audit(&mut tx, Some(new.tenant_id), &new.actor.to_string(), "domain.add", Some(new.domain), None, Some(value), None).await?;
    tx.commit().await?;
    Ok(())
}

async fn insert_key(tx: &mut sqlx::PgConnection, tenant_id: Uuid, domain: &str, key: &NewKey<'_>, state: KeyState) -> Result<(), StoreError> {
    let activated_at = (state == KeyState::Active).then(Utc::now);
    sqlx::query(
        "INSERT INTO dkim_keys (id, tenant_id, domain, selector, algorithm, private_key, public_key, state, activated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(Uuid::new_v4())
    .bind(tenant_id)
    .bind(domain)
    .bind(key.selector)
    .bind(key.algorithm.as_str())
    .bind(&key.encrypted_private_key)
    .bind(key.public_key)
    .bind(key_state_text(state))
    .bind(activated_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn key_state_text(state: KeyState) -> &'static str {
    match state {
        KeyState::Pending => "pending",
        KeyState::Active => "active",
        KeyState::Retired => "retired",
    }
}

/// Adds a key that waits for its DNS record: a rotation's new RSA key, or the Ed25519 key
/// of dual signing. Owner-only, audited.
pub async fn add_pending_key(pool: &PgPool, tenant_id: Uuid, actor: Uuid, domain: &str, key: NewKey<'_>) -> Result<(), StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_owner(&mut tx, tenant_id, actor).await?;
    let waiting: Option<String> = sqlx::query_scalar("SELECT selector FROM dkim_keys WHERE domain = $1 AND algorithm = $2 AND state = 'pending'")
        .bind(domain)
        .bind(key.algorithm.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(selector) = waiting {
        return Err(StoreError::Conflict(format!(
            "domain {domain} already has a new {} key waiting for its DNS record (selector {selector}); publish that record and run `outbound domain verify`",
            key.algorithm.as_str()
        )));
    }
    insert_key(&mut tx, tenant_id, domain, &key, KeyState::Pending).await?;
    let value = serde_json::json!({"selector": key.selector, "algorithm": key.algorithm.as_str(), "state": "pending"});
    audit(&mut tx, Some(tenant_id), &actor.to_string(), "domain.key_add", Some(domain), None, Some(value), None).await?;
    tx.commit().await?;
    Ok(())
}

/// The keys [`retire_keys`] changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RetiredKeys {
    /// Pending keys, deleted: they never signed, so their records may go at once.
    pub discarded: Vec<String>,
    /// Active keys, now retired: their records stay for the overlap.
    pub retired: Vec<String>,
}

/// Stops signing with the domain's keys of one algorithm: a pending key is deleted, an
/// active one retired. Owner-only, audited.
pub async fn retire_keys(pool: &PgPool, tenant_id: Uuid, actor: Uuid, domain: &str, algorithm: Algorithm) -> Result<RetiredKeys, StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_owner(&mut tx, tenant_id, actor).await?;
    let discarded: Vec<String> = sqlx::query_scalar("DELETE FROM dkim_keys WHERE domain = $1 AND algorithm = $2 AND state = 'pending' RETURNING selector")
        .bind(domain)
        .bind(algorithm.as_str())
        .fetch_all(&mut *tx)
        .await?;
    let retired: Vec<String> =
        sqlx::query_scalar("UPDATE dkim_keys SET state = 'retired', retired_at = now() WHERE domain = $1 AND algorithm = $2 AND state = 'active' RETURNING selector")
            .bind(domain)
            .bind(algorithm.as_str())
            .fetch_all(&mut *tx)
            .await?;
    let changed = RetiredKeys { discarded, retired };
    if !changed.discarded.is_empty() || !changed.retired.is_empty() {
        let value = serde_json::json!({"algorithm": algorithm.as_str(), "discarded": changed.discarded, "retired": changed.retired});
        audit(&mut tx, Some(tenant_id), &actor.to_string(), "domain.key_retire", Some(domain), None, Some(value), None).await?;
    }
    tx.commit().await?;
    Ok(changed)
}

/// Fails with [`StoreError::PermissionDenied`] unless `actor` owns the tenant. The triggers
/// enforce the rule on every write; this check lets a command refuse before its DNS lookups.
pub async fn require_owner(tx: &mut sqlx::PgConnection, tenant_id: Uuid, actor: Uuid) -> Result<(), StoreError> {
    let owner: bool = sqlx::query_scalar("SELECT is_tenant_owner($1, $2)").bind(tenant_id).bind(actor).fetch_one(&mut *tx).await?;
    if owner {
        Ok(())
    } else {
        Err(StoreError::PermissionDenied)
    }
}

/// [`require_owner`] on a connection of its own, for commands that check before they work.
pub async fn check_owner(pool: &PgPool, tenant_id: Uuid, actor: Uuid) -> Result<(), StoreError> {
    require_tenant(pool, tenant_id).await?;
    let mut connection = pool.acquire().await?;
    require_owner(&mut connection, tenant_id, actor).await
}

/// A sending domain with its keys (public parts only), as the checks and reports need it.
#[derive(Debug, Clone)]
pub struct StoredDomain {
    pub tenant_id: Uuid,
    pub domain: String,
    pub status: DomainStatus,
    pub verification_token: String,
    pub verified_at: Option<DateTime<Utc>>,
    pub failing_since: Option<DateTime<Utc>>,
    pub checked_at: Option<DateTime<Utc>>,
    /// True when the operator marked the domain verified: revalidation skips it.
    pub operator_verified: bool,
    pub keys: Vec<StoredKey>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredKey {
    pub selector: String,
    pub algorithm: Algorithm,
    pub state: KeyState,
    #[serde(skip)]
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
}

impl StoredDomain {
    pub fn facts(&self) -> DomainFacts {
        DomainFacts {
            domain: self.domain.clone(),
            verification_token: self.verification_token.clone(),
            keys: self
                .keys
                .iter()
                .map(|key| KeyFacts {
                    selector: key.selector.clone(),
                    algorithm: key.algorithm,
                    public_key: key.public_key.clone(),
                    state: key.state,
                    retired_at: key.retired_at,
                })
                .collect(),
        }
    }
}

/// Reads a domain and its keys: tenant-scoped when `tenant_id` is given (owner commands),
/// across tenants otherwise (operator commands and revalidation).
pub async fn find_domain(pool: &PgPool, tenant_id: Option<Uuid>, domain: &str) -> Result<Option<StoredDomain>, StoreError> {
    let mut tx = tenant_tx(pool, tenant_id).await?;
    let found = read_domain(&mut tx, domain).await?;
    tx.commit().await?;
    Ok(found)
}

async fn read_domain(tx: &mut sqlx::PgConnection, domain: &str) -> Result<Option<StoredDomain>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT tenant_id, domain, status, verification_token, verified_at, failing_since, checked_at, verification_method = 'operator' AS operator_verified
         FROM sending_domains WHERE domain = $1",
    )
    .bind(domain)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let keys = sqlx::query(
        "SELECT selector, algorithm, state, public_key, created_at, activated_at, retired_at FROM dkim_keys
         WHERE domain = $1 ORDER BY created_at, selector",
    )
    .bind(domain)
    .fetch_all(&mut *tx)
    .await?;
    let status: String = row.get("status");
    Ok(Some(StoredDomain {
        tenant_id: row.get("tenant_id"),
        domain: row.get("domain"),
        status: DomainStatus::parse(&status).unwrap_or(DomainStatus::Pending),
        verification_token: row.get("verification_token"),
        verified_at: row.get("verified_at"),
        failing_since: row.get("failing_since"),
        checked_at: row.get("checked_at"),
        operator_verified: row.get("operator_verified"),
        keys: keys
            .iter()
            .filter_map(|key| {
                Some(StoredKey {
                    selector: key.get("selector"),
                    algorithm: Algorithm::parse(key.get("algorithm"))?,
                    state: KeyState::parse(key.get("state"))?,
                    public_key: key.get("public_key"),
                    created_at: key.get("created_at"),
                    activated_at: key.get("activated_at"),
                    retired_at: key.get("retired_at"),
                })
            })
            .collect(),
    }))
}

/// The result of a DNS check, to store.
pub struct CheckOutcome<'a> {
    pub domain: &'a str,
    /// The new status, or `None` to keep the current one.
    pub status: Option<DomainStatus>,
    /// Record by record, as `domain verify --json` prints it.
    pub checks: serde_json::Value,
    /// Pending keys whose records passed: they replace the active key of their algorithm.
    pub keys_ready: &'a [String],
}

/// Stores an owner's `domain verify` and returns the old status. A domain that becomes
/// verified from pending or suspended also gets outbound sending enabled. One that was
/// already verified or failing keeps the tenant's switch as the owner left it.
pub async fn record_verification(pool: &PgPool, tenant_id: Uuid, actor: Uuid, outcome: CheckOutcome<'_>) -> Result<DomainStatus, StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_owner(&mut tx, tenant_id, actor).await?;
    let old = domain_status_for_update(&mut tx, outcome.domain, tenant_id).await?;
    let actor_text = actor.to_string();
    store_check(&mut tx, tenant_id, &actor_text, old, &outcome).await?;
    if outcome.status == Some(DomainStatus::Verified) {
        // Verified through DNS now, so revalidation re-checks it, even after an override.
        sqlx::query("UPDATE sending_domains SET verification_method = 'dns' WHERE domain = $1").bind(outcome.domain).execute(&mut *tx).await?;
    }

    if outcome.status == Some(DomainStatus::Verified) && matches!(old, DomainStatus::Pending | DomainStatus::Suspended) {
        let was_enabled: bool = sqlx::query_scalar("SELECT outbound_enabled FROM tenants WHERE id = $1").bind(tenant_id).fetch_one(&mut *tx).await?;
        if !was_enabled {
            sqlx::query("UPDATE tenants SET outbound_enabled = true WHERE id = $1").bind(tenant_id).execute(&mut *tx).await?;
            let reason = format!("domain {} verified", outcome.domain);
            audit(&mut tx, Some(tenant_id), &actor_text, "settings.set", Some("outbound_enabled"), Some(false.into()), Some(true.into()), Some(&reason)).await?;
        }
    }
    tx.commit().await?;
    Ok(old)
}

async fn domain_status_for_update(tx: &mut sqlx::PgConnection, domain: &str, tenant_id: Uuid) -> Result<DomainStatus, StoreError> {
    let old: Option<String> = sqlx::query_scalar("SELECT status FROM sending_domains WHERE domain = $1 AND tenant_id = $2 FOR UPDATE")
        .bind(domain)
        .bind(tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(old) = old else {
        return Err(StoreError::NotFound(format!(
            "domain {domain} is not registered for tenant {tenant_id}; add it first with `outbound domain add`"
        )));
    };
    Ok(DomainStatus::parse(&old).unwrap_or(DomainStatus::Pending))
}

/// Writes a check's status change, key activations and audit entries in the caller's
/// transaction.
async fn store_check(tx: &mut sqlx::PgConnection, tenant_id: Uuid, actor: &str, old: DomainStatus, outcome: &CheckOutcome<'_>) -> Result<(), StoreError> {
    let new = outcome.status.unwrap_or(old);
    sqlx::query(
        "UPDATE sending_domains SET status = $2, last_check = $3, checked_at = now(),
             verified_at = CASE WHEN $2 = 'verified' AND status <> 'verified' THEN now() ELSE verified_at END,
             failing_since = CASE WHEN $2 = 'failing' THEN coalesce(failing_since, now()) WHEN $2 = 'verified' THEN NULL ELSE failing_since END
         WHERE domain = $1",
    )
    .bind(outcome.domain)
    .bind(new.as_str())
    .bind(&outcome.checks)
    .execute(&mut *tx)
    .await?;
    if new != old {
        audit(&mut *tx, Some(tenant_id), actor, "domain.status", Some(outcome.domain), Some(old.as_str().into()), Some(new.as_str().into()), None).await?;
    }

    for selector in outcome.keys_ready {
        let retired: Vec<String> = sqlx::query_scalar(
            "UPDATE dkim_keys SET state = 'retired', retired_at = now()
             WHERE domain = $1 AND state = 'active' AND algorithm = (SELECT algorithm FROM dkim_keys WHERE domain = $1 AND selector = $2 AND state = 'pending')
             RETURNING selector",
        )
        .bind(outcome.domain)
        .bind(selector)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("UPDATE dkim_keys SET state = 'active', activated_at = now() WHERE domain = $1 AND selector = $2 AND state = 'pending'")
            .bind(outcome.domain)
            .bind(selector)
            .execute(&mut *tx)
            .await?;
        let old_value = serde_json::json!({"retired": retired});
        let new_value = serde_json::json!({"active": selector});
        audit(&mut *tx, Some(tenant_id), actor, "domain.key_activate", Some(outcome.domain), Some(old_value), Some(new_value), None).await?;
    }
    Ok(())
}

/// Claims up to `limit` verified or failing domains whose last check is older than
/// `interval`, and marks them checked now so that other workers skip them. Domains the
/// operator marked verified are not re-checked.
pub async fn claim_due_domains(pool: &PgPool, interval: Duration, limit: i64) -> Result<Vec<StoredDomain>, StoreError> {
    let mut tx = pool.begin().await?;
    let names: Vec<String> = sqlx::query_scalar(
        "UPDATE sending_domains SET checked_at = now() WHERE domain IN (
             SELECT domain FROM sending_domains
             WHERE status IN ('verified', 'failing') AND verification_method = 'dns'
               AND (checked_at IS NULL OR checked_at <= now() - make_interval(secs => $1))
             ORDER BY checked_at NULLS FIRST LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING domain",
    )
    .bind(interval.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut domains = Vec::with_capacity(names.len());
    for name in names {
        if let Some(domain) = read_domain(&mut tx, &name).await? {
            domains.push(domain);
        }
    }
    tx.commit().await?;
    Ok(domains)
}

/// Stores a revalidation. Runs as the login role: it is the platform's own check, audited
/// with the actor "revalidation".
pub async fn record_revalidation(pool: &PgPool, tenant_id: Uuid, outcome: CheckOutcome<'_>) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let old = domain_status_for_update(&mut tx, outcome.domain, tenant_id).await?;
    store_check(&mut tx, tenant_id, "revalidation", old, &outcome).await?;
    tx.commit().await?;
    Ok(())
}

/// Moves a domain's next revalidation to `retry_in` from now, after a lookup that failed.
pub async fn postpone_revalidation(pool: &PgPool, domain: &str, interval: Duration, retry_in: Duration) -> Result<(), StoreError> {
    sqlx::query("UPDATE sending_domains SET checked_at = now() - make_interval(secs => $2) + make_interval(secs => $3) WHERE domain = $1")
        .bind(domain)
        .bind(interval.as_secs_f64())
        .bind(retry_in.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}

/// Marks a domain verified without a DNS check (the operator override), with an audit entry.
pub async fn mark_domain_verified(pool: &PgPool, tenant_id: Uuid, domain: &str, reason: &str) -> Result<(), StoreError> {
    require_tenant(pool, tenant_id).await?;
    let mut tx = pool.begin().await?;
    let old = domain_status_for_update(&mut tx, domain, tenant_id).await?;
    // Revalidation skips operator-verified domains: their records may not be visible to
    // the service at all, which is why the override exists.
    sqlx::query(
        "UPDATE sending_domains SET status = 'verified', verification_method = 'operator', verified_at = now(), checked_at = now(), failing_since = NULL
         WHERE tenant_id = $1 AND domain = $2",
    )
        .bind(tenant_id)
        .bind(domain)
        .execute(&mut *tx)
        .await?;
    audit(&mut tx, Some(tenant_id), "operator", "domain.mark_verified", Some(domain), Some(old.as_str().into()), Some("verified".into()), Some(reason)).await?;
    tx.commit().await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn audit(
    tx: &mut sqlx::PgConnection,
    tenant_id: Option<Uuid>,
    actor: &str,
    action: &str,
    subject: Option<&str>,
    old_value: Option<serde_json::Value>,
    new_value: Option<serde_json::Value>,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO audit_log (tenant_id, actor, action, subject, old_value, new_value, reason) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(tenant_id)
        .bind(actor)
        .bind(action)
        .bind(subject)
        .bind(old_value)
        .bind(new_value)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The tenant and `from` domain state that the sender checks read.
#[derive(Debug, Clone)]
pub struct SenderState {
    pub outbound_enabled: bool,
    /// `None` when the domain is not one of the tenant's.
    pub domain: Option<SenderDomain>,
}

#[derive(Debug, Clone)]
pub struct SenderDomain {
    pub domain: String,
    pub status: DomainStatus,
    /// The keys that sign: one RSA key, and an Ed25519 key when dual signing is on.
    pub active_keys: Vec<ActiveKey>,
}

#[derive(Debug, Clone)]
pub struct ActiveKey {
    pub selector: String,
    pub algorithm: Algorithm,
    pub encrypted_private_key: Vec<u8>,
}

/// Reads the tenant, its domain and the domain's signing keys; `None` when the tenant does
/// not exist.
pub async fn sender_state(pool: &PgPool, tenant_id: Uuid, domain: &str) -> Result<Option<SenderState>, StoreError> {
    let mut tx = scoped(pool, tenant_id, None).await?;
    let row = sqlx::query(
        "SELECT t.outbound_enabled, d.domain, d.status FROM tenants t LEFT JOIN sending_domains d ON d.tenant_id = t.id AND d.domain = $2
         WHERE t.id = $1",
    )
    .bind(tenant_id)
    .bind(domain)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tx.commit().await?;
        return Ok(None);
    };
    let mut state = SenderState { outbound_enabled: row.get("outbound_enabled"), domain: None };
    if let Some(name) = row.get::<Option<String>, _>("domain") {
        let keys = sqlx::query("SELECT selector, algorithm, private_key FROM dkim_keys WHERE domain = $1 AND state = 'active' ORDER BY algorithm DESC")
            .bind(&name)
            .fetch_all(&mut *tx)
            .await?;
        let status: String = row.get("status");
        state.domain = Some(SenderDomain {
            domain: name,
            status: DomainStatus::parse(&status).unwrap_or(DomainStatus::Pending),
            active_keys: keys
                .iter()
                .filter_map(|key| {
                    Some(ActiveKey {
                        selector: key.get("selector"),
                        algorithm: Algorithm::parse(key.get("algorithm"))?,
                        encrypted_private_key: key.get("private_key"),
                    })
                })
                .collect(),
        });
    }
    tx.commit().await?;
    Ok(Some(state))
}

// ---------------------------------------------------------------------------------
// Deliveries.

/// A delivery row as the worker needs it.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub request_id: Uuid,
    pub status: Status,
    pub attempt: u32,
    pub request: Option<serde_json::Value>,
    pub message_id: Option<String>,
    pub signed_message: Option<Vec<u8>>,
    pub recipient_results: Vec<RecipientOutcome>,
    pub last_result: Option<DeliveryResult>,
    pub result_published: bool,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub published_at: Option<DateTime<Utc>>,
    pub processing: bool,
}

const DELIVERY_COLUMNS: &str = "request_id, status, attempt, request, message_id, signed_message, recipient_results, last_result,
     result_published_at IS NOT NULL AS result_published, first_attempt_at, published_at";

fn delivery_row(row: &sqlx::postgres::PgRow) -> DeliveryRow {
    let status_text: String = row.get("status");
    DeliveryRow {
        request_id: row.get("request_id"),
        status: Status::parse(&status_text).unwrap_or(Status::Deferred),
        processing: status_text == "processing",
        attempt: row.get::<i32, _>("attempt").max(0) as u32,
        request: row.get("request"),
        message_id: row.get("message_id"),
        signed_message: row.get("signed_message"),
        recipient_results: serde_json::from_value(row.get("recipient_results")).unwrap_or_default(),
        last_result: row.get::<Option<serde_json::Value>, _>("last_result").and_then(|value| serde_json::from_value(value).ok()),
        result_published: row.get("result_published"),
        first_attempt_at: row.get("first_attempt_at"),
        published_at: row.get("published_at"),
    }
}

/// The outcome of claiming a request.
#[derive(Debug)]
pub enum Claim {
    /// The row is new and this worker owns it until the lease ends.
    New,
    /// An earlier owner's lease ran out, so this worker took the row over as it was left.
    TakenOver(Box<DeliveryRow>),
    /// The request was seen before, and the row contains its state.
    Existing(Box<DeliveryRow>),
    /// Another tenant already used this request id; its row stays hidden.
    OtherTenant,
}

pub struct NewDelivery<'a> {
    pub request_id: Uuid,
    pub tenant_id: Uuid,
    pub conversation_id: &'a str,
    pub origin: &'a str,
    pub from_address: &'a str,
    pub recipients: Vec<String>,
    pub subject: &'a str,
    pub request: serde_json::Value,
    pub published_at: Option<DateTime<Utc>>,
}

/// Inserts the row for a new request in state `processing`, leased to this worker.
/// A row whose earlier owner's lease ran out is taken over the same way.
pub async fn claim(pool: &PgPool, new: NewDelivery<'_>, lease: Duration) -> Result<Claim, StoreError> {
    let lease_until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
    let mut tx = scoped(pool, new.tenant_id, None).await?;
    let inserted = sqlx::query(
        "INSERT INTO deliveries (request_id, tenant_id, conversation_id, origin, from_address, recipients, subject, status, request, lease_until, published_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'processing', $8, $9, $10)
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(new.request_id)
    .bind(new.tenant_id)
    .bind(new.conversation_id)
    .bind(new.origin)
    .bind(new.from_address)
    .bind(&new.recipients)
    .bind(new.subject)
    .bind(&new.request)
    .bind(lease_until)
    .bind(new.published_at)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 1 {
        tx.commit().await?;
        return Ok(Claim::New);
    }

    let takeover = format!(
        "UPDATE deliveries SET lease_until = $2, updated_at = now()
         WHERE request_id = $1 AND status = 'processing' AND lease_until < now()
         RETURNING {DELIVERY_COLUMNS}"
    );
    let taken_over = sqlx::query(&takeover).bind(new.request_id).bind(lease_until).fetch_optional(&mut *tx).await?;
    if let Some(row) = taken_over {
        tx.commit().await?;
        return Ok(Claim::TakenOver(Box::new(delivery_row(&row))));
    }

    // Under the tenant's scope, a row of another tenant with this request id is invisible.
    let row = sqlx::query(&format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE request_id = $1"))
        .bind(new.request_id)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(match row {
        Some(row) => Claim::Existing(Box::new(delivery_row(&row))),
        None => Claim::OtherTenant,
    })
}

/// Records the message id, threading and signed message before the first relay attempt,
/// so that a retry sends the very same bytes.
pub async fn store_composed(
    pool: &PgPool,
    tenant_id: Uuid,
    request_id: Uuid,
    message_id: &str,
    references: &[String],
    signed_message: &[u8],
) -> Result<(), StoreError> {
    let mut tx = tenant_tx(pool, Some(tenant_id)).await?;
    sqlx::query(
        "UPDATE deliveries SET message_id = $2, references_ids = $3, signed_message = $4,
             first_attempt_at = coalesce(first_attempt_at, now()), updated_at = now()
         WHERE request_id = $1",
    )
    .bind(request_id)
    .bind(message_id)
    .bind(references)
    .bind(signed_message)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records a result: final, or deferred with its next attempt. The result is stored
/// before it is published, so a redelivered request republishes the same event.
pub async fn record_result(pool: &PgPool, result: &DeliveryResult, next_attempt_at: Option<DateTime<Utc>>, recipients: &[RecipientOutcome]) -> Result<(), StoreError> {
    let mut tx = tenant_tx(pool, result.tenant_id).await?;
    let request_id = result.request_id.expect("only results of readable requests are stored");
    sqlx::query(
        "UPDATE deliveries SET status = $2, reason = $3, detail = $4, attempt = $5, next_attempt_at = $6, lease_until = NULL,
             recipient_results = $7, last_result = $8, result_published_at = NULL, updated_at = now(),
             finished_at = CASE WHEN $9 THEN now() ELSE NULL END,
             message_id = coalesce(message_id, $10)
         WHERE request_id = $1",
    )
    .bind(request_id)
    .bind(result.status.as_str())
    .bind(result.reason.map(|reason| reason.as_str()))
    .bind(&result.detail)
    .bind(result.attempt as i32)
    .bind(next_attempt_at)
    .bind(serde_json::to_value(recipients).expect("recipient outcomes serialize"))
    .bind(serde_json::to_value(result).expect("results serialize"))
    .bind(result.is_final)
    .bind(&result.message_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Stores the result of a request that never got a row because it failed validation.
/// Returns the existing row instead when the request id was seen before.
pub async fn record_invalid(pool: &PgPool, result: &DeliveryResult, raw_body: &[u8]) -> Result<Option<DeliveryRow>, StoreError> {
    let Some(request_id) = result.request_id else { return Ok(None) };
    let body = serde_json::from_slice::<serde_json::Value>(raw_body).ok();
    let inserted = sqlx::query(
        "INSERT INTO deliveries (request_id, tenant_id, conversation_id, origin, status, reason, detail, request, last_result, finished_at)
         VALUES ($1, $2, $3, $4, 'invalid', $5, $6, $7, $8, now())
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(request_id)
    .bind(result.tenant_id)
    .bind(&result.conversation_id)
    .bind(result.origin.map(|origin| origin.as_str()))
    .bind(result.reason.map(|reason| reason.as_str()))
    .bind(&result.detail)
    .bind(body)
    .bind(serde_json::to_value(result).expect("results serialize"))
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(None);
    }
    let row = sqlx::query(&format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE request_id = $1"))
        .bind(request_id)
        .fetch_one(pool)
        .await?;
    Ok(Some(delivery_row(&row)))
}

/// Records when the governance checks of the current attempt read their state.
pub async fn record_checked_at(pool: &PgPool, tenant_id: Uuid, request_id: Uuid, checked_at: DateTime<Utc>) -> Result<(), StoreError> {
    let mut tx = tenant_tx(pool, Some(tenant_id)).await?;
    sqlx::query("UPDATE deliveries SET checked_at = $2 WHERE request_id = $1")
        .bind(request_id)
        .bind(checked_at)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Extends the lease of a row this worker is processing, so a long relay attempt is not
/// taken over by another worker while it still runs.
pub async fn renew_lease(pool: &PgPool, tenant_id: Uuid, request_id: Uuid, lease: Duration) -> Result<(), StoreError> {
    let mut tx = tenant_tx(pool, Some(tenant_id)).await?;
    let lease_until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
    sqlx::query("UPDATE deliveries SET lease_until = $2 WHERE request_id = $1 AND status = 'processing'")
        .bind(request_id)
        .bind(lease_until)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn mark_published(pool: &PgPool, tenant_id: Option<Uuid>, request_id: Uuid, event_id: Uuid) -> Result<(), StoreError> {
    let mut tx = tenant_tx(pool, tenant_id).await?;
    sqlx::query("UPDATE deliveries SET result_published_at = now() WHERE request_id = $1 AND last_result->>'event_id' = $2")
        .bind(request_id)
        .bind(event_id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Claims up to `limit` rows that need work: deferred ones that are due, and rows whose
/// owner's lease ran out (a worker that died mid-send). Other workers skip locked rows.
pub async fn claim_due(pool: &PgPool, limit: i64, lease: Duration) -> Result<Vec<DeliveryRow>, StoreError> {
    let lease_until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
    let sql = format!(
        "UPDATE deliveries SET status = 'processing', lease_until = $2, updated_at = now()
         WHERE request_id IN (
             SELECT request_id FROM deliveries
             WHERE (status = 'deferred' AND next_attempt_at <= now())
                OR (status = 'processing' AND lease_until < now())
             ORDER BY next_attempt_at NULLS FIRST
             LIMIT $1
             FOR UPDATE SKIP LOCKED)
         RETURNING {DELIVERY_COLUMNS}"
    );
    let rows = sqlx::query(&sql)
    .bind(limit)
    .bind(lease_until)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(delivery_row).collect())
}

/// Final results stored but never confirmed by the broker, older than `age`.
pub async fn unpublished_results(pool: &PgPool, age: Duration, limit: i64) -> Result<Vec<DeliveryResult>, StoreError> {
    let before = Utc::now() - chrono::Duration::from_std(age).unwrap_or_default();
    let values: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT last_result FROM deliveries
         WHERE result_published_at IS NULL AND last_result IS NOT NULL AND status <> 'processing' AND updated_at < $1
         ORDER BY updated_at LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(values.into_iter().filter_map(|value| serde_json::from_value(value).ok()).collect())
}

/// Returns the latest message of a conversation, with its references, to thread a reply onto.
pub async fn latest_in_conversation(pool: &PgPool, tenant_id: Uuid, conversation_id: &str, excluding: Uuid) -> Result<Option<(String, Vec<String>)>, StoreError> {
    let mut tx = scoped(pool, tenant_id, None).await?;
    let row = sqlx::query(
        "SELECT message_id, references_ids FROM deliveries
         WHERE tenant_id = $1 AND conversation_id = $2 AND request_id <> $3 AND message_id IS NOT NULL
           AND status IN ('sent', 'deferred', 'processing')
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(tenant_id)
    .bind(conversation_id)
    .bind(excluding)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.map(|row| (row.get("message_id"), row.get("references_ids"))))
}

/// Filters of the delivery log.
#[derive(Debug, Default, Clone)]
pub struct DeliveryFilter {
    pub tenant_id: Option<Uuid>,
    pub recipient: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub status: Option<String>,
    pub limit: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryLogEntry {
    pub request_id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub conversation_id: Option<String>,
    pub origin: Option<String>,
    pub from: Option<String>,
    pub recipients: Vec<String>,
    pub subject: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub attempt: i32,
    pub message_id: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn list_deliveries(pool: &PgPool, filter: &DeliveryFilter) -> Result<Vec<DeliveryLogEntry>, StoreError> {
    let rows = sqlx::query(
        "SELECT request_id, tenant_id, conversation_id, origin, from_address, recipients, subject, status, reason, detail,
                attempt, message_id, next_attempt_at, created_at, updated_at
         FROM deliveries
         WHERE ($1::uuid IS NULL OR tenant_id = $1)
           AND ($2::text IS NULL OR $2 = ANY (recipients))
           AND ($3::timestamptz IS NULL OR created_at >= $3)
           AND ($4::timestamptz IS NULL OR created_at < $4)
           AND ($5::text IS NULL OR status = $5)
         ORDER BY created_at DESC LIMIT $6",
    )
    .bind(filter.tenant_id)
    .bind(&filter.recipient)
    .bind(filter.since)
    .bind(filter.until)
    .bind(&filter.status)
    .bind(filter.limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| DeliveryLogEntry {
            request_id: row.get("request_id"),
            tenant_id: row.get("tenant_id"),
            conversation_id: row.get("conversation_id"),
            origin: row.get("origin"),
            from: row.get("from_address"),
            recipients: row.get("recipients"),
            subject: row.get("subject"),
            status: row.get("status"),
            reason: row.get("reason"),
            detail: row.get("detail"),
            attempt: row.get("attempt"),
            message_id: row.get("message_id"),
            next_attempt_at: row.get("next_attempt_at"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
        })
        .collect())
}

// ---------------------------------------------------------------------------------
// Governance.

/// Reads the state that checks 3 and 4 need, at the moment of the check.
pub async fn governance_state(
    pool: &PgPool,
    tenant_id: Uuid,
    automated: bool,
    automation_id: Option<Uuid>,
    recipients: &[String],
    conversation_id: &str,
    request_id: Uuid,
) -> Result<crate::governance::GovernanceState, StoreError> {
    use crate::governance::{Automation, GovernanceState, Restriction, LOOP_WINDOW_HOURS};

    let mut tx = scoped(pool, tenant_id, None).await?;

    let restriction = sqlx::query(
        "SELECT detector, scope FROM tenant_restrictions
         WHERE tenant_id = $1 AND cleared_at IS NULL AND (expires_at IS NULL OR expires_at > now())
           AND (scope = 'all' OR (scope = 'automation' AND $2))
         ORDER BY created_at LIMIT 1",
    )
    .bind(tenant_id)
    .bind(automated)
    .fetch_optional(&mut *tx)
    .await?
    .map(|row| Restriction { detector: row.get("detector"), scope: row.get("scope") });

    let suppressed_recipient: Option<String> =
        sqlx::query_scalar("SELECT address FROM suppressions WHERE tenant_id = $1 AND address = ANY ($2) ORDER BY address LIMIT 1")
            .bind(tenant_id)
            .bind(recipients)
            .fetch_optional(&mut *tx)
            .await?;

    let mut state = GovernanceState { restriction, suppressed_recipient, ..GovernanceState::default() };
    if !automated {
        tx.commit().await?;
        return Ok(state);
    }

    let row = sqlx::query(
        "SELECT clock_timestamp() AS checked_at, p.kill_switch, t.automation_paused,
                a.id AS automation, a.mode, a.shadow_validated, a.readiness_score, a.readiness_threshold,
                a.revalidated_at, a.revalidation_interval_days
         FROM platform_settings p
         CROSS JOIN tenants t
         LEFT JOIN automations a ON a.tenant_id = t.id AND a.id = $2
         WHERE t.id = $1",
    )
    .bind(tenant_id)
    .bind(automation_id)
    .fetch_one(&mut *tx)
    .await?;
    state.checked_at = Some(row.get("checked_at"));
    state.kill_switch = row.get("kill_switch");
    state.automation_paused = row.get("automation_paused");
    state.automation = row.get::<Option<Uuid>, _>("automation").map(|_| Automation {
        mode: row.get("mode"),
        shadow_validated: row.get("shadow_validated"),
        readiness_score: row.get("readiness_score"),
        readiness_threshold: row.get("readiness_threshold"),
        revalidated_at: row.get("revalidated_at"),
        revalidation_interval_days: row.get("revalidation_interval_days"),
    });

    state.recent_automated_messages = sqlx::query_scalar(
        "SELECT coalesce(max(sent), 0) FROM (
             SELECT count(*) AS sent FROM deliveries d, unnest(d.recipients) AS recipient
             WHERE d.tenant_id = $1 AND d.conversation_id = $2 AND d.origin = 'automation' AND d.request_id <> $3
               AND d.status IN ('sent', 'deferred', 'processing') AND d.message_id IS NOT NULL
               AND d.created_at > now() - make_interval(hours => $4)
               AND recipient = ANY ($5)
             GROUP BY recipient) AS per_recipient",
    )
    .bind(tenant_id)
    .bind(conversation_id)
    .bind(request_id)
    .bind(LOOP_WINDOW_HOURS as i32)
    .bind(recipients)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(state)
}

/// A `KEY=VALUE` change of `settings set` or `automation set`, parsed and checked.
#[derive(Debug, Clone)]
pub struct Change {
    pub column: &'static str,
    pub value: serde_json::Value,
}

/// Sets one column of the row `id` of `table` and returns its old value as JSON. The new
/// value is cast to the column's type by `jsonb_populate_record`. `table` and the column
/// come from fixed lists in this crate, never from input.
async fn apply_change(tx: &mut sqlx::PgConnection, table: &'static str, id: Uuid, change: &Change) -> Result<serde_json::Value, StoreError> {
    let column = change.column;
    let select = format!("SELECT to_jsonb({column}) FROM {table} WHERE id = $1 FOR UPDATE");
    let old: Option<serde_json::Value> = sqlx::query_scalar(&select).bind(id).fetch_one(&mut *tx).await?;

    let update = format!(
        "UPDATE {table} SET {column} = (jsonb_populate_record(NULL::{table}, jsonb_build_object('{column}', $2::jsonb))).{column} WHERE id = $1"
    );
    sqlx::query(&update).bind(id).bind(&change.value).execute(&mut *tx).await?;
    Ok(old.unwrap_or(serde_json::Value::Null))
}

/// Applies tenant setting changes for an owner, with one audit entry per key.
pub async fn set_tenant_settings(pool: &PgPool, tenant_id: Uuid, actor: Uuid, changes: &[Change]) -> Result<(), StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_scoped_tenant(&mut tx, tenant_id).await?;
    for change in changes {
        let old = apply_change(&mut tx, "tenants", tenant_id, change).await?;
        audit(&mut tx, Some(tenant_id), &actor.to_string(), "settings.set", Some(change.column), Some(old), Some(change.value.clone()), None).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn create_automation(pool: &PgPool, tenant_id: Uuid, actor: Uuid, name: &str) -> Result<Uuid, StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_scoped_tenant(&mut tx, tenant_id).await?;
    let automation_id = Uuid::new_v4();
    sqlx::query("INSERT INTO automations (id, tenant_id, name) VALUES ($1, $2, $3)")
        .bind(automation_id)
        .bind(tenant_id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let value = serde_json::json!({"automation_id": automation_id, "name": name, "mode": "shadow"});
    audit(&mut tx, Some(tenant_id), &actor.to_string(), "automation.create", Some(&automation_id.to_string()), None, Some(value), None).await?;
    tx.commit().await?;
    Ok(automation_id)
}

/// Applies automation setting changes for an owner, with one audit entry per key.
pub async fn set_automation(pool: &PgPool, tenant_id: Uuid, automation_id: Uuid, actor: Uuid, changes: &[Change]) -> Result<(), StoreError> {
    let mut tx = scoped(pool, tenant_id, Some(actor)).await?;
    require_scoped_tenant(&mut tx, tenant_id).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM automations WHERE id = $1 AND tenant_id = $2)")
        .bind(automation_id)
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Err(StoreError::NotFound(format!("automation {automation_id} not found for tenant {tenant_id}; check --automation")));
    }
    for change in changes {
        let old = apply_change(&mut tx, "automations", automation_id, change).await?;
        let subject = format!("{automation_id}.{}", change.column);
        audit(&mut tx, Some(tenant_id), &actor.to_string(), "automation.set", Some(&subject), Some(old), Some(change.value.clone()), None).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Turns the platform kill switch on or off, with an audit entry.
pub async fn set_kill_switch(pool: &PgPool, on: bool, reason: &str) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let old: bool = sqlx::query_scalar("SELECT kill_switch FROM platform_settings FOR UPDATE").fetch_one(&mut *tx).await?;
    sqlx::query("UPDATE platform_settings SET kill_switch = $1, kill_switch_reason = $2, changed_at = now()")
        .bind(on)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    audit(&mut tx, None, "operator", "platform.kill_switch", None, Some(old.into()), Some(on.into()), Some(reason)).await?;
    tx.commit().await?;
    Ok(())
}

pub async fn add_suppression(pool: &PgPool, tenant_id: Uuid, address: &str) -> Result<(), StoreError> {
    require_tenant(pool, tenant_id).await?;
    let mut tx = pool.begin().await?;
    let added = sqlx::query("INSERT INTO suppressions (tenant_id, address) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(tenant_id)
        .bind(address)
        .execute(&mut *tx)
        .await?;
    if added.rows_affected() == 1 {
        audit(&mut tx, Some(tenant_id), "operator", "suppression.add", Some(address), None, Some(true.into()), None).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn remove_suppression(pool: &PgPool, tenant_id: Uuid, address: &str) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let removed = sqlx::query("DELETE FROM suppressions WHERE tenant_id = $1 AND address = $2")
        .bind(tenant_id)
        .bind(address)
        .execute(&mut *tx)
        .await?;
    let removed = removed.rows_affected() == 1;
    if removed {
        audit(&mut tx, Some(tenant_id), "operator", "suppression.remove", Some(address), Some(true.into()), None, None).await?;
    }
    tx.commit().await?;
    Ok(removed)
}

pub async fn list_suppressions(pool: &PgPool, tenant_id: Uuid) -> Result<Vec<serde_json::Value>, StoreError> {
    let rows = sqlx::query("SELECT address, created_at FROM suppressions WHERE tenant_id = $1 ORDER BY address")
        .bind(tenant_id)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|row| serde_json::json!({"address": row.get::<String, _>("address"), "created_at": row.get::<DateTime<Utc>, _>("created_at")}))
        .collect())
}

pub async fn list_restrictions(pool: &PgPool, tenant_id: Uuid) -> Result<Vec<serde_json::Value>, StoreError> {
    require_tenant(pool, tenant_id).await?;
    let rows = sqlx::query(
        "SELECT id, detector, scope, evidence, created_at, expires_at FROM tenant_restrictions
         WHERE tenant_id = $1 AND cleared_at IS NULL AND (expires_at IS NULL OR expires_at > now())
         ORDER BY created_at",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "id": row.get::<Uuid, _>("id"),
                "detector": row.get::<String, _>("detector"),
                "scope": row.get::<String, _>("scope"),
                "evidence": row.get::<serde_json::Value, _>("evidence"),
                "created_at": row.get::<DateTime<Utc>, _>("created_at"),
                "expires_at": row.get::<Option<DateTime<Utc>>, _>("expires_at"),
            })
        })
        .collect())
}

/// Clears every active restriction of a tenant; returns how many were cleared.
pub async fn clear_restrictions(pool: &PgPool, tenant_id: Uuid) -> Result<u64, StoreError> {
    require_tenant(pool, tenant_id).await?;
    let mut tx = pool.begin().await?;
    let cleared = sqlx::query("UPDATE tenant_restrictions SET cleared_at = now() WHERE tenant_id = $1 AND cleared_at IS NULL")
        .bind(tenant_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    audit(&mut tx, Some(tenant_id), "operator", "restrictions.clear", None, None, Some(cleared.into()), None).await?;
    tx.commit().await?;
    Ok(cleared)
}

async fn require_tenant(pool: &PgPool, tenant_id: Uuid) -> Result<(), StoreError> {
    let mut connection = pool.acquire().await?;
    require_scoped_tenant(&mut connection, tenant_id).await
}

/// Returns the tenant's settings, domains, active restrictions and latest audited changes.
pub async fn tenant_settings(pool: &PgPool, tenant_id: Uuid) -> Result<serde_json::Value, StoreError> {
    require_tenant(pool, tenant_id).await?;
    let tenant: serde_json::Value = sqlx::query_scalar(
        "SELECT jsonb_build_object('tenant_id', id, 'name', name, 'plan', plan, 'outbound_enabled', outbound_enabled,
                'automation_paused', automation_paused, 'rate_per_minute', rate_per_minute, 'burst', burst)
         FROM tenants WHERE id = $1",
    )
    .bind(tenant_id)
    .fetch_one(pool)
    .await?;

    let domains: serde_json::Value = sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(jsonb_build_object('domain', d.domain, 'status', d.status, 'verified_at', d.verified_at,
                    'verification_method', d.verification_method, 'failing_since', d.failing_since, 'checked_at', d.checked_at,
                    'failing_records', (SELECT coalesce(jsonb_agg(c->>'name'), '[]') FROM jsonb_array_elements(coalesce(d.last_check, '[]')) c
                                        WHERE (c->>'required')::boolean AND c->>'state' <> 'pass'),
                    'selector', (SELECT k.selector FROM dkim_keys k WHERE k.domain = d.domain AND k.algorithm = 'rsa' AND k.state = 'active'),
                    'keys', (SELECT coalesce(jsonb_agg(jsonb_build_object('selector', k.selector, 'algorithm', k.algorithm, 'state', k.state,
                                 'activated_at', k.activated_at, 'retired_at', k.retired_at) ORDER BY k.created_at), '[]')
                             FROM dkim_keys k WHERE k.domain = d.domain))
                ORDER BY d.domain), '[]')
         FROM sending_domains d WHERE d.tenant_id = $1",
    )
    .bind(tenant_id)
    .fetch_one(pool)
    .await?;

    let changes: serde_json::Value = sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(entry ORDER BY (entry->>'id')::bigint DESC), '[]') FROM (
             SELECT jsonb_build_object('id', id, 'actor', actor, 'action', action, 'subject', subject, 'old', old_value,
                    'new', new_value, 'reason', reason, 'at', created_at) AS entry
             FROM audit_log WHERE tenant_id = $1 ORDER BY id DESC LIMIT 10) AS latest",
    )
    .bind(tenant_id)
    .fetch_one(pool)
    .await?;

    let mut settings = tenant;
    settings["domains"] = domains;
    settings["restrictions"] = serde_json::Value::Array(list_restrictions(pool, tenant_id).await?);
    settings["recent_changes"] = changes;
    Ok(settings)
}

/// Returns the signed message stored for a request: as sent, or as it would be sent for a
/// shadowed one.
pub async fn stored_message(pool: &PgPool, request_id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
    let message: Option<Option<Vec<u8>>> = sqlx::query_scalar("SELECT signed_message FROM deliveries WHERE request_id = $1")
        .bind(request_id)
        .fetch_optional(pool)
        .await?;
    match message {
        None => Err(StoreError::NotFound(format!("no request {request_id} in the delivery log"))),
        Some(message) => Ok(message),
    }
}
