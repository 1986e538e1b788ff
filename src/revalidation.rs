//! Lifecycle revalidation: the worker re-checks verified domains' DNS records on an
//! interval. A required record that stops passing moves the domain to `failing`. After the
//! grace period it is `suspended`, so its requests are blocked until the owner verifies it
//! again. Pending keys whose records have appeared start signing.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::configuration::DomainSettings;
use crate::dns::TxtSource;
use crate::domains::{self, Conclusion, DomainStatus, Transition};
use crate::store::{self, StoreError, StoredDomain};
use crate::telemetry;

/// How many domains one pass claims; the next pass follows at once while more are due.
const BATCH: i64 = 20;
/// The delay before a domain whose lookups failed is checked again (capped by the interval).
const RETRY_INCONCLUSIVE: Duration = Duration::from_secs(15 * 60);
/// How often the loop looks for due domains (capped by half the interval).
const POLL: Duration = Duration::from_secs(60);

/// Runs revalidation passes until `shutdown`.
pub async fn run(pool: PgPool, settings: DomainSettings, dns: Arc<dyn TxtSource>, shutdown: CancellationToken) {
    // Half the interval, so a domain is checked at most half an interval late.
    let poll = POLL.min(settings.revalidate_interval / 2).max(Duration::from_millis(200));
    let mut interval = tokio::time::interval(poll);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        loop {
            let pass = tokio::select! {
                pass = revalidate_due(&pool, &settings, dns.as_ref()) => pass,
                () = shutdown.cancelled() => return,
            };
            match pass {
                Ok(checked) if checked as i64 == BATCH => continue,
                Ok(_) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "domain revalidation pass failed; trying again at the next poll");
                    break;
                }
            }
        }
    }
}

/// Checks every domain that is due, up to one batch. Returns how many were checked.
pub async fn revalidate_due(pool: &PgPool, settings: &DomainSettings, dns: &dyn TxtSource) -> Result<usize, StoreError> {
    let due = store::claim_due_domains(pool, settings.revalidate_interval, BATCH).await?;
    for domain in &due {
        revalidate(pool, settings, dns, domain).await?;
    }
    Ok(due.len())
}

async fn revalidate(pool: &PgPool, settings: &DomainSettings, dns: &dyn TxtSource, domain: &StoredDomain) -> Result<(), StoreError> {
    let facts = domain.facts();
    let checks = domains::check_records(&facts, &settings.spf_include, dns).await;
    let conclusion = domains::conclude(&checks);
    let grace = chrono::Duration::from_std(settings.grace_period).unwrap_or(chrono::Duration::MAX);
    let transition = domains::revalidation_step(domain.status, conclusion, domain.failing_since, Utc::now(), grace);
    let keys_ready = domains::keys_ready(&checks, &facts);
    metrics::counter!(telemetry::DOMAIN_CHECKS, "result" => conclusion_label(conclusion)).increment(1);

    if conclusion == Conclusion::Inconclusive {
        let unanswered: Vec<&str> = checks
            .iter()
            .filter(|check| check.required && check.state == domains::RecordState::NotVisible)
            .map(|check| check.name.as_str())
            .collect();
        tracing::warn!(
            domain = %domain.domain,
            tenant_id = %domain.tenant_id,
            records = ?unanswered,
            "domain revalidation lookups failed; the domain keeps its state and is checked again soon; check that OUTBOUND_DNS_SERVERS answer"
        );
        let retry_in = RETRY_INCONCLUSIVE.min(settings.revalidate_interval);
        return store::postpone_revalidation(pool, &domain.domain, settings.revalidate_interval, retry_in).await;
    }

    let failed: Vec<&str> = checks
        .iter()
        .filter(|check| check.required && check.state != domains::RecordState::Pass)
        .map(|check| check.name.as_str())
        .collect();
    let status = match transition {
        Transition::Stay => None,
        Transition::StartFailing => {
            tracing::warn!(domain = %domain.domain, tenant_id = %domain.tenant_id, failed = ?failed, grace = ?settings.grace_period, "domain records stopped passing; the domain is failing and is suspended if they are not fixed within the grace period");
            Some(DomainStatus::Failing)
        }
        Transition::Suspend => {
            tracing::error!(domain = %domain.domain, tenant_id = %domain.tenant_id, failed = ?failed, "domain suspended: its records failed for the whole grace period; its requests are blocked until the owner fixes them and runs `outbound domain verify`");
            Some(DomainStatus::Suspended)
        }
        Transition::Recover => {
            tracing::info!(domain = %domain.domain, tenant_id = %domain.tenant_id, "domain records pass again; the domain is verified");
            Some(DomainStatus::Verified)
        }
    };
    if let Some(status) = status {
        metrics::counter!(telemetry::DOMAIN_STATUS_CHANGES, "status" => status.as_str()).increment(1);
    }
    if !keys_ready.is_empty() {
        tracing::info!(domain = %domain.domain, selectors = ?keys_ready, "new DKIM key records verified; signing moves to them");
    }
    let checks = serde_json::to_value(&checks).unwrap_or_default();
    let outcome = store::CheckOutcome { domain: &domain.domain, status, checks, keys_ready: &keys_ready };
    store::record_revalidation(pool, domain.tenant_id, outcome).await
}

fn conclusion_label(conclusion: Conclusion) -> &'static str {
    match conclusion {
        Conclusion::Pass => "pass",
        Conclusion::Fail => "fail",
        Conclusion::Inconclusive => "inconclusive",
    }
}
