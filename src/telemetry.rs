//! Logging and metrics set-up, and the name of every metric series.
//!
//! Log levels: ERROR means lost data or an operator must act. WARN means the service
//! recovered on its own (a retry, a reconnect). INFO is lifecycle (start, stop,
//! connect). Per-message events are DEBUG, never INFO.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::configuration::{LogFormat, LogSettings};

pub const REQUESTS_RECEIVED: &str = "outbound_requests_received_total";
pub const RESULTS: &str = "outbound_results_total";
pub const SMTP_DURATION: &str = "outbound_smtp_duration_seconds";
pub const END_TO_END: &str = "outbound_end_to_end_seconds";
pub const RATE_LIMITED: &str = "outbound_rate_limited_total";
pub const RESTRICTIONS_ACTIVE: &str = "outbound_tenant_restrictions_active";
pub const INFLIGHT: &str = "outbound_inflight_messages";
pub const DEAD_LETTERED: &str = "outbound_dead_lettered_total";
pub const BROKER_RECONNECTS: &str = "outbound_broker_reconnects_total";
pub const PROCESSING_ERRORS: &str = "outbound_processing_errors_total";
pub const DOMAIN_CHECKS: &str = "outbound_domain_checks_total";
pub const DOMAIN_STATUS_CHANGES: &str = "outbound_domain_status_changes_total";

/// Installs the tracing subscriber on stderr; `RUST_LOG` overrides `log.level`.
pub fn init_tracing(settings: &LogSettings) {
    use std::io::IsTerminal;

    // PostgreSQL notices such as "relation already exists, skipping" are not news.
    let default_filter = format!("{},sqlx::postgres::notice=warn", settings.level);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the Prometheus recorder and describes every series.
pub fn init_metrics() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(SMTP_DURATION.to_string()),
            &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(END_TO_END.to_string()),
                &[0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0],
            )
        })
        .expect("static bucket lists are non-empty")
        .install_recorder()
        .expect("the metrics recorder is installed once per process");

    metrics::describe_counter!(REQUESTS_RECEIVED, "Send requests taken from the queue, by origin (agent, automation, unknown).");
    metrics::describe_counter!(RESULTS, "Results published, by status and reason. A rise in failed or blocked needs a look.");
    metrics::describe_histogram!(SMTP_DURATION, metrics::Unit::Seconds, "Time of one relay attempt. A rise means a slow relay.");
    metrics::describe_histogram!(END_TO_END, metrics::Unit::Seconds, "From publish to final result.");
    metrics::describe_counter!(RATE_LIMITED, "Requests deferred by a tenant's rate limit.");
    metrics::describe_gauge!(RESTRICTIONS_ACTIVE, "Tenant restrictions in force.");
    metrics::describe_gauge!(INFLIGHT, "Requests being processed by this process.");
    metrics::describe_counter!(DEAD_LETTERED, "Requests copied to outbound.dead-letter. Any rise means a producer sends bad requests.");
    metrics::describe_counter!(BROKER_RECONNECTS, "Times the worker lost RabbitMQ and connected again.");
    metrics::describe_counter!(
        PROCESSING_ERRORS,
        "Requests whose processing failed before a result was stored, by kind (database, broker, key). Any key error needs an operator."
    );

    metrics::describe_counter!(
        DOMAIN_CHECKS,
        "Domain revalidations, by result (pass, fail, inconclusive). A rise in inconclusive means the worker's DNS resolvers do not answer."
    );
    metrics::describe_counter!(
        DOMAIN_STATUS_CHANGES,
        "Domains moved by revalidation, by new status (failing, suspended, verified). Each suspended domain blocks a tenant's mail."
    );

    // Series without labels exist from the start, so that dashboards and alerts see zero.
    metrics::gauge!(RESTRICTIONS_ACTIVE).set(0.0);
    metrics::gauge!(INFLIGHT).set(0.0);
    for counter in [RATE_LIMITED, DEAD_LETTERED, BROKER_RECONNECTS] {
        metrics::counter!(counter).absolute(0);
    }
    handle
}
