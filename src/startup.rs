//! Wiring: migrations and topology, and the worker process with its listeners and signals.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Publisher};
use crate::configuration::Settings;
use crate::relay::Relay;
use crate::store;
use crate::worker::{self, Context};

/// Applies database migrations (creating the database if needed) and declares the AMQP topology.
pub async fn migrate(settings: &Settings) -> anyhow::Result<PgPool> {
    let pool = store::migrate(&settings.database).await?;
    let connection = broker::connect(&settings.amqp, true).await?;
    let channel = connection.create_channel().await?;
    broker::declare_topology(&channel).await?;
    let _ = channel.close(200, "done").await;
    let _ = connection.close(200, "done").await;
    Ok(pool)
}

/// Fails unless every migration of this binary is applied.
pub async fn check_migrations(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let missing: Vec<String> = store::MIGRATOR
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
        .map(|migration| migration.description.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("the database is missing migrations ({}); run `outbound migrate` first", missing.join(", "))
    }
}

/// Returns the process-wide Prometheus recorder, installing it on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(crate::telemetry::init_metrics).clone()
}

/// Runs the worker until SIGTERM or SIGINT, then drains within `worker.shutdown_grace`.
pub async fn run_worker(settings: Settings, broker_connected: Arc<AtomicBool>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        signals.cancel();
    });
    run_worker_until(settings, broker_connected, shutdown).await
}

/// Runs the worker until `shutdown` is cancelled.
pub async fn run_worker_until(settings: Settings, broker_connected: Arc<AtomicBool>, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A signal during the start-up retries stops the worker at once, with nothing in flight.
    let pool = tokio::select! {
        pool = store::connect(&settings.database, store::Patience::Retry) => pool?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped before the database connection was up");
            return Ok(());
        }
    };
    check_migrations(&pool).await?;
    store::check_tenant_isolation(&pool).await.map_err(|reason| anyhow::anyhow!("refusing to start: {reason}"))?;

    let health = crate::http::Health { metrics: metrics_handle(), pool: pool.clone(), broker_connected: broker_connected.clone() };
    crate::http::serve(settings.metrics.addr, health, shutdown.clone()).await?;

    let target = settings.smtp.url.clone().expect("required at load");
    let relay = Relay::new(target.clone(), &settings.smtp);
    let key_encryption_key = settings.keys.encryption_key.clone().expect("required at load");
    tracing::info!(relay = ?target, prefetch = settings.worker.prefetch, "worker starting");
    let revalidation = start_revalidation(&settings, &pool, &shutdown);
    let context = Arc::new(Context { settings, pool, relay, publisher: Publisher::default(), key_encryption_key });
    let worked = worker::run(context.clone(), broker_connected, shutdown.clone()).await;
    // The worker may stop on an error without a signal; revalidation stops with it.
    shutdown.cancel();
    if let Some(revalidation) = revalidation {
        let _ = revalidation.await;
    }
    worked?;
    context.pool.close().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Starts the domain revalidation loop, or logs why it cannot run: the worker still sends,
/// but domains are not re-checked.
fn start_revalidation(settings: &Settings, pool: &sqlx::PgPool, shutdown: &CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    match crate::dns::Resolver::new(&settings.dns) {
        Ok(resolver) => {
            let dns: Arc<dyn crate::dns::TxtSource> = Arc::new(resolver);
            let task = crate::revalidation::run(pool.clone(), settings.domains.clone(), dns, shutdown.clone());
            Some(tokio::spawn(task))
        }
        Err(err) => {
            tracing::error!(error = %err, "domain revalidation is off: no DNS resolver");
            None
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
