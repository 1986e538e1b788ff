//! The metrics and health listener: `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The state that `/metrics` and `/readyz` report.
#[derive(Clone)]
pub struct Health {
    pub metrics: PrometheusHandle,
    pub pool: PgPool,
    pub broker_connected: Arc<AtomicBool>,
}

/// Serves until `shutdown` is cancelled. Binding fails at start, with the address named.
pub async fn serve(addr: SocketAddr, health: Health, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr} for metrics ({err}); set OUTBOUND_METRICS_ADDR to a free address"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics and health listener started");
    let app = Router::new()
        .route("/metrics", get(|State(health): State<Health>| async move { health.metrics.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(health);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(err) = served {
            tracing::error!(error = %err, "metrics listener stopped");
        }
    });
    Ok(())
}

async fn ready(State(health): State<Health>) -> (StatusCode, &'static str) {
    if !health.broker_connected.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not connected to RabbitMQ\n");
    }
    let ping = tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&health.pool)).await;
    match ping {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database not reachable\n"),
    }
}
