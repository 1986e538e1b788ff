//! The worker: consumes send requests, checks, composes, signs, relays, records and
//! publishes the result, and only then acknowledges.
//!
//! PostgreSQL is the durable record. A request gets a `deliveries` row before anything is
//! sent. Deferred requests wait in that table, not in the broker, so they never block the
//! consumer. A scheduler loop in every worker process picks up rows that are due, or
//! whose owner died, with `FOR UPDATE SKIP LOCKED`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use rand::Rng;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::address::Address;
use crate::broker::{self, BrokerError, Publisher};
use crate::compose::{self, Envelope};
use crate::configuration::{KeyEncryptionKey, Settings};
use crate::dkim;
use crate::domains::DomainStatus;
use crate::governance::{self, Verdict};
use crate::outcome::{timestamp, DeliveryResult, Reason, RecipientOutcome, RecipientStatus, Status, RESULT_SCHEMA};
use crate::relay::{Relay, RelayReport};
use crate::request::{self, Origin, SendRequest};
use crate::store::{self, Claim, DeliveryRow, StoreError};
use crate::telemetry;

/// Retries one process runs at once; the scheduler claims no more rows than this allows.
const SCHEDULER_CONCURRENCY: usize = 16;
/// A stored result not confirmed by the broker after this long is published again.
const REPUBLISH_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("DKIM key of {domain}: {source}")]
    Key { domain: String, source: dkim::KeyError },
}

impl WorkError {
    /// Returns the metric label of the error: `database`, `broker` or `key`.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkError::Store(_) => "database",
            WorkError::Broker(_) => "broker",
            WorkError::Key { .. } => "key",
        }
    }

    /// Transient errors leave the request for a later try; permanent ones need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            WorkError::Store(err) => err.is_transient(),
            WorkError::Broker(_) => true,
            WorkError::Key { .. } => false,
        }
    }
}

/// Everything a processing task needs, shared by every task of the process.
pub struct Context {
    pub settings: Settings,
    pub pool: PgPool,
    pub relay: Arc<Relay>,
    pub publisher: Publisher,
    pub key_encryption_key: KeyEncryptionKey,
}

/// Runs the consumer and the scheduler until `shutdown` is cancelled, then drains.
pub async fn run(context: Arc<Context>, broker_connected: Arc<AtomicBool>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let scheduler = tokio::spawn(scheduler_loop(context.clone(), tracker.clone(), shutdown.clone()));

    let mut first_connection = true;
    let mut drained = false;
    while !shutdown.is_cancelled() {
        let connection = tokio::select! {
            connection = broker::connect(&context.settings.amqp, true) => connection,
            () = shutdown.cancelled() => break,
        };
        let connection = match connection {
            Ok(connection) => connection,
            Err(err) if first_connection => return Err(err.into()),
            Err(err) => {
                tracing::error!(error = %err, "RabbitMQ unreachable after retries; trying again");
                continue;
            }
        };
        if !first_connection {
            metrics::counter!(telemetry::BROKER_RECONNECTS).increment(1);
        }

        let consumed = consume(&context, &connection, &tracker, &broker_connected, &shutdown).await;
        let was_consuming = broker_connected.swap(false, Ordering::Relaxed);
        if let Err(err) = consumed {
            if first_connection && !was_consuming {
                // A topology that cannot be declared (a queue of another type, missing
                // permissions) will not fix itself.
                let _ = connection.close(200, "start-up failed").await;
                return Err(anyhow::anyhow!("{err}; check the RabbitMQ vhost and permissions, then run `outbound migrate`"));
            }
            tracing::warn!(error = %err, "RabbitMQ connection lost; reconnecting");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => {}
            }
        }
        first_connection = false;

        if shutdown.is_cancelled() {
            // `consume` has drained the in-flight requests before returning.
            drained = true;
            let _ = connection.close(200, "worker stopping").await;
            break;
        }
        let _ = connection.close(200, "reconnecting").await;
    }

    if !drained {
        // Stopped while disconnected: retries started by the scheduler may still run.
        drain(&context, &tracker).await;
    }
    let _ = scheduler.await;
    context.relay.close().await;
    Ok(())
}

/// Waits for in-flight tasks up to the grace period, logging what is still pending.
async fn drain(context: &Context, tracker: &TaskTracker) {
    tracker.close();
    let grace = context.settings.worker.shutdown_grace;
    tracing::info!(in_flight = tracker.len(), grace = ?grace, "stopped consuming; finishing in-flight requests");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            pending = tracker.len(),
            "shutdown grace period over; unfinished requests return to the queue or are taken over when their lease ends"
        );
    }
    if let Some(channel) = context.publisher.detach().await {
        let _ = channel.close(200, "worker stopping").await;
    }
}

async fn consume(
    context: &Arc<Context>,
    connection: &Connection,
    tracker: &TaskTracker,
    broker_connected: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let channel = connection.create_channel().await?;
    broker::declare_topology(&channel).await?;
    channel.basic_qos(context.settings.worker.prefetch, BasicQosOptions::default()).await?;
    context.publisher.attach(connection).await?;
    let consumer_tag = format!("outbound-{}", Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(broker::WORK_QUEUE, &consumer_tag, BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    broker_connected.store(true, Ordering::Relaxed);
    tracing::info!(queue = broker::WORK_QUEUE, prefetch = context.settings.worker.prefetch, "consuming send requests");

    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            () = shutdown.cancelled() => {
                // Stop new deliveries first; prefetched but unstarted ones return to the
                // queue when the channel closes, after the in-flight ones are acknowledged.
                let _ = channel.basic_cancel(&consumer_tag, BasicCancelOptions::default()).await;
                drain(context, tracker).await;
                let _ = channel.close(200, "worker stopping").await;
                return Ok(());
            }
        };
        match next {
            Some(Ok(delivery)) => {
                let context = context.clone();
                tracker.spawn(async move { handle_delivery(&context, delivery).await });
            }
            Some(Err(err)) => return Err(err.into()),
            None => return Err(BrokerError::Disconnected),
        }
    }
}

/// Processes one delivery, then acks or nacks it once.
async fn handle_delivery(context: &Context, delivery: Delivery) {
    metrics::gauge!(telemetry::INFLIGHT).increment(1.0);
    let outcome = process_message(context, &delivery.data, &delivery.properties).await;
    metrics::gauge!(telemetry::INFLIGHT).decrement(1.0);

    let request_id = request::peek_request_id(&delivery.data);
    if let Err(err) = &outcome {
        metrics::counter!(telemetry::PROCESSING_ERRORS, "kind" => err.kind()).increment(1);
    }
    let acknowledged = match outcome {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(err @ WorkError::Key { .. }) => {
            // Key errors happen after the claim, so the request has its row and is not lost:
            // the scheduler tries it again each time its lease ends, until an operator fixes
            // the key.
            tracing::error!(request_id = ?request_id, error = %err, "DKIM key unusable; the request is retried when its lease ends");
            delivery.acker.ack(BasicAckOptions::default()).await
        }
        Err(err) => {
            if err.is_transient() {
                tracing::warn!(request_id = ?request_id, error = %err, "processing failed; the request goes back to the queue");
            } else {
                tracing::error!(request_id = ?request_id, error = %err, "processing failed; the request goes back to the queue and may need an operator");
            }
            // A short pause keeps a failing database from turning into a redelivery storm.
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
        }
    };
    if let Err(err) = acknowledged {
        // The channel is gone, so the broker redelivers the request; its row makes the
        // second pass publish the stored result instead of sending again.
        tracing::warn!(request_id = ?request_id, error = %err, "acknowledgement failed; the broker will redeliver and the stored state prevents a resend");
    }
}

/// Runs the whole pipeline for one AMQP body. `Ok` means the delivery may be acknowledged.
pub async fn process_message(context: &Context, body: &[u8], properties: &BasicProperties) -> Result<(), WorkError> {
    let parsed = request::parse(body, &context.settings.limits);
    let origin_label = match &parsed {
        Ok(request) => request.origin.as_str(),
        Err(invalid) => invalid.ids.origin.map(Origin::as_str).unwrap_or("unknown"),
    };
    metrics::counter!(telemetry::REQUESTS_RECEIVED, "origin" => origin_label).increment(1);

    let request = match parsed {
        Ok(request) => request,
        Err(invalid) => return reject_invalid(context, body, properties, invalid).await,
    };

    let published_at = properties
        .timestamp()
        .and_then(|seconds| DateTime::from_timestamp(seconds as i64, 0))
        .or(request.created_at);
    let raw_request: serde_json::Value = serde_json::from_slice(body).expect("parse succeeded on this body");
    let recipients: Vec<String> = request.recipients().map(|m| m.address.to_string()).collect();
    let claim = store::claim(
        &context.pool,
        store::NewDelivery {
            request_id: request.request_id,
            tenant_id: request.tenant_id,
            conversation_id: &request.conversation_id,
            origin: request.origin.as_str(),
            from_address: &request.from.address.to_string(),
            recipients,
            subject: &request.subject,
            request: raw_request,
            published_at,
        },
        context.settings.worker.lease,
    )
    .await?;

    match claim {
        Claim::New => {
            let prior = Prior { published_at, ..Prior::default() };
            deliver(context, &request, prior).await
        }
        Claim::TakenOver(row) => {
            tracing::warn!(request_id = %request.request_id, "took over a request whose previous owner's lease ran out");
            deliver(context, &request, Prior::from_row(&row)).await
        }
        Claim::Existing(row) => handle_seen_request(context, &row).await,
        Claim::OtherTenant => {
            // The id belongs to another tenant's request: report it without revealing that
            // request's state, and without a row, since the id is taken.
            tracing::warn!(request_id = %request.request_id, tenant_id = %request.tenant_id, "request id already used by another tenant");
            let base = ResultBase { request: &request, attempt: 0, published_at };
            let detail = "Field request_id is already used by another request; give every request a fresh UUID.".to_string();
            let result = base.result(Status::Invalid, Some(Reason::InvalidField), detail, None, vec![]);
            context.publisher.publish_result(&result).await?;
            metrics::counter!(telemetry::RESULTS, "status" => result.status.as_str(), "reason" => reason_label(result.reason)).increment(1);
            Ok(())
        }
    }
}

/// Publishes the stored final result of a request id seen before, or leaves it to its owner.
async fn handle_seen_request(context: &Context, row: &DeliveryRow) -> Result<(), WorkError> {
    if row.processing || !row.status.is_final() {
        tracing::debug!(request_id = %row.request_id, "request already in progress or deferred; its owner or the scheduler finishes it");
        return Ok(());
    }
    let Some(stored) = row.last_result.clone() else {
        return Ok(());
    };
    if !row.result_published {
        // Either the first pass stored the result and the broker never confirmed it, or its
        // confirmation is still on the way. Publishing the stored event again is harmless:
        // consumers deduplicate by event_id. The repeated request still gets its duplicate.
        publish_and_mark(context, &stored).await?;
    }
    let duplicate = DeliveryResult { event_id: Uuid::new_v4(), duplicate: true, occurred_at: timestamp(Utc::now()), ..stored };
    context.publisher.publish_result(&duplicate).await?;
    metrics::counter!(telemetry::RESULTS, "status" => duplicate.status.as_str(), "reason" => reason_label(duplicate.reason)).increment(1);
    tracing::debug!(request_id = %row.request_id, "duplicate request; stored result published again");
    Ok(())
}

async fn reject_invalid(context: &Context, body: &[u8], properties: &BasicProperties, invalid: request::InvalidRequest) -> Result<(), WorkError> {
    let result = DeliveryResult {
        schema: RESULT_SCHEMA.into(),
        event_id: Uuid::new_v4(),
        request_id: invalid.ids.request_id,
        tenant_id: invalid.ids.tenant_id,
        conversation_id: invalid.ids.conversation_id.clone(),
        origin: invalid.ids.origin,
        status: Status::Invalid,
        is_final: true,
        reason: Some(invalid.reason),
        detail: invalid.detail.clone(),
        message_id: None,
        attempt: 0,
        next_attempt_at: None,
        recipients: vec![],
        duplicate: false,
        metadata: invalid.ids.metadata.clone(),
        occurred_at: timestamp(Utc::now()),
    };

    if let Some(existing) = store::record_invalid(&context.pool, &result, body).await? {
        return handle_seen_request(context, &existing).await;
    }

    let header = format!("{}: {}", invalid.reason.as_str(), invalid.detail);
    context.publisher.dead_letter(body, properties, &header).await?;
    metrics::counter!(telemetry::DEAD_LETTERED).increment(1);
    tracing::debug!(reason = invalid.reason.as_str(), request_id = ?invalid.ids.request_id, "invalid request dead-lettered");
    publish_and_mark(context, &result).await
}

/// The state earlier attempts left in the row.
#[derive(Debug, Default, Clone)]
struct Prior {
    attempt: u32,
    message_id: Option<String>,
    signed_message: Option<Vec<u8>>,
    recipient_results: Vec<RecipientOutcome>,
    first_attempt_at: Option<DateTime<Utc>>,
    published_at: Option<DateTime<Utc>>,
}

impl Prior {
    fn from_row(row: &DeliveryRow) -> Self {
        Prior {
            attempt: row.attempt,
            message_id: row.message_id.clone(),
            signed_message: row.signed_message.clone(),
            recipient_results: row.recipient_results.clone(),
            first_attempt_at: row.first_attempt_at,
            published_at: row.published_at,
        }
    }
}

/// Checks, composes, signs and relays a request this worker owns, then records and
/// publishes the result.
async fn deliver(context: &Context, request: &SendRequest, prior: Prior) -> Result<(), WorkError> {
    let attempt = prior.attempt + 1;
    let base = ResultBase { request, attempt, published_at: prior.published_at };

    if let Some(not_after) = request.not_after {
        if Utc::now() > not_after {
            let detail = format!("The message could not be handed to the relay before not_after ({}), so it was not sent.", timestamp(not_after));
            return finish(context, base.result(Status::Failed, Some(Reason::Expired), detail, prior.message_id.clone(), prior.recipient_results.clone()), None).await;
        }
    }

    // Check 2: tenant, outbound switch, sender domain and its verification.
    let domain_name = request.from.address.domain();
    let state = store::sender_state(&context.pool, request.tenant_id, domain_name).await?;
    if let Some((reason, detail)) = sender_block(request, state.as_ref()) {
        return finish(context, base.result(Status::Blocked, Some(reason), detail, None, vec![]), None).await;
    }
    let domain = state.and_then(|state| state.domain).expect("sender_block passed, so the domain exists");

    // Checks 3 and 4: restrictions, suppressions and, for automated replies, governance.
    let recipients: Vec<String> = request.recipients().map(|m| m.address.to_string()).collect();
    let governance = store::governance_state(
        &context.pool,
        request.tenant_id,
        request.origin == Origin::Automation,
        request.automation_id,
        &recipients,
        &request.conversation_id,
        request.request_id,
    )
    .await?;
    let verdict = governance::decide(request, &governance, Utc::now());
    if let Verdict::Block(reason, detail) = verdict {
        return finish(context, base.result(Status::Blocked, Some(reason), detail, None, vec![]), None).await;
    }
    if let Some(checked_at) = governance.checked_at {
        store::record_checked_at(&context.pool, request.tenant_id, request.request_id, checked_at).await?;
    }

    // Compose and sign once; retries send the stored bytes with the same Message-ID.
    let (message_id, signed) = match (prior.message_id.clone(), prior.signed_message.clone()) {
        (Some(message_id), Some(signed)) => (message_id, signed),
        _ => {
            let envelope = thread_envelope(context, request, &domain.domain).await?;
            let unsigned = compose::compose(request, &envelope);
            let key_error = |source| WorkError::Key { domain: domain.domain.clone(), source };
            let signed = sign(context, &domain, &unsigned).map_err(key_error)?;
            if signed.len() > context.settings.limits.max_message_size {
                let detail = format!(
                    "The composed message is {} bytes; the limit is {}, so send large files as links.",
                    signed.len(),
                    context.settings.limits.max_message_size
                );
                return finish(context, base.result(Status::Invalid, Some(Reason::MessageTooLarge), detail, None, vec![]), None).await;
            }
            store::store_composed(&context.pool, request.tenant_id, request.request_id, &envelope.message_id, &envelope.references, &signed).await?;
            (envelope.message_id, signed)
        }
    };

    if verdict == Verdict::Shadow {
        let detail = "The automation is in shadow mode: the message was composed and signed for review, and nothing was sent.".to_string();
        return finish(context, base.result(Status::Shadowed, Some(Reason::ShadowMode), detail, Some(message_id), vec![]), None).await;
    }

    // Relay to the recipients that have no final reply yet.
    let pending: Vec<Address> = request
        .recipients()
        .map(|m| m.address.clone())
        .filter(|address| {
            let text = address.to_string();
            !prior.recipient_results.iter().any(|o| o.address == text && o.status != RecipientStatus::Deferred)
        })
        .collect();
    let renewal = renew_lease_while_running(context, request.tenant_id, request.request_id);
    let report = context.relay.deliver(&request.request_id.to_string(), &request.from.address, &pending, &signed).await;
    renewal.abort();
    let merged = merge_recipients(&prior.recipient_results, &report.recipients);

    let first_attempt_at = prior.first_attempt_at.unwrap_or_else(Utc::now);
    let window_ends = first_attempt_at + chrono::Duration::from_std(context.settings.retry.window).unwrap_or_default();
    let now = Utc::now();
    let decision = decide(&merged, &report, now >= window_ends);
    let (next_attempt_at, detail) = match decision.status {
        Status::Deferred => {
            let delay = crate::retry::jittered_delay(attempt, &context.settings.retry, rand::thread_rng().gen());
            let next = (now + chrono::Duration::from_std(delay).unwrap_or_default()).min(window_ends);
            (Some(next), format!("{} The message is retried at {}.", decision.detail, timestamp(next)))
        }
        _ => (None, decision.detail),
    };
    let mut result = base.result(decision.status, decision.reason, detail, Some(message_id), merged.clone());
    result.next_attempt_at = next_attempt_at.map(timestamp);
    finish(context, result, next_attempt_at).await
}

/// Renews the row's lease every third of its length until the returned task is aborted.
fn renew_lease_while_running(context: &Context, tenant_id: Uuid, request_id: Uuid) -> tokio::task::JoinHandle<()> {
    let pool = context.pool.clone();
    let lease = context.settings.worker.lease;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease / 3).await;
            if let Err(err) = store::renew_lease(&pool, tenant_id, request_id, lease).await {
                tracing::warn!(request_id = %request_id, error = %err, "renewing the lease failed; another worker may take the request over");
            }
        }
    })
}

/// Check 2 of the contract, in order. `None` means the sender may send.
fn sender_block(request: &SendRequest, state: Option<&store::SenderState>) -> Option<(Reason, String)> {
    let domain = request.from.address.domain();
    let Some(state) = state else {
        return Some((
            Reason::TenantNotFound,
            format!("Tenant {} does not exist; check the request's tenant_id.", request.tenant_id),
        ));
    };
    if !state.outbound_enabled {
        return Some((
            Reason::OutboundDisabled,
            "Outbound email is disabled for this tenant; its owner can enable it with `outbound settings set outbound_enabled=true`.".into(),
        ));
    }
    let Some(domain_state) = &state.domain else {
        return Some((
            Reason::SenderDomainMismatch,
            format!("The from domain {domain} is not a sending domain of this tenant; send from one of its domains or add this one with `outbound domain add`."),
        ));
    };
    if !domain_state.status.may_send() {
        let detail = match domain_state.status {
            DomainStatus::Suspended => format!(
                "The sending domain {domain} is suspended: its DNS records failed revalidation for the whole grace period. Fix them and run `outbound domain verify`."
            ),
            status => format!(
                "The sending domain {domain} is {}, not verified; publish its DNS records and run `outbound domain verify`.",
                status.as_str()
            ),
        };
        return Some((Reason::DomainNotVerified, detail));
    }
    None
}

/// Signs with every active key of the domain: RSA, and Ed25519 too when dual signing is on.
fn sign(context: &Context, domain: &store::SenderDomain, unsigned: &[u8]) -> Result<Vec<u8>, dkim::KeyError> {
    let mut decrypted = Vec::with_capacity(domain.active_keys.len());
    for key in &domain.active_keys {
        decrypted.push(dkim::decrypt_private_key(&context.key_encryption_key, &domain.domain, &key.encrypted_private_key)?);
    }
    let keys: Vec<dkim::SigningKey<'_>> = domain
        .active_keys
        .iter()
        .zip(&decrypted)
        .map(|(key, private_pkcs8)| dkim::SigningKey { selector: &key.selector, algorithm: key.algorithm, private_pkcs8 })
        .collect();
    dkim::Signer::new(&domain.domain, &keys)?.sign(unsigned)
}

/// Picks the Message-ID and threading fields: the request's own, or the conversation's
/// latest known message when the request names none.
async fn thread_envelope(context: &Context, request: &SendRequest, domain: &str) -> Result<Envelope, StoreError> {
    let message_id = format!("<{}@{}>", Uuid::new_v4(), domain);
    let (in_reply_to, references) = if request.in_reply_to.is_some() || !request.references.is_empty() {
        let mut references = request.references.clone();
        if references.is_empty() {
            references.extend(request.in_reply_to.clone());
        }
        (request.in_reply_to.clone(), compose::trim_references(references))
    } else {
        match store::latest_in_conversation(&context.pool, request.tenant_id, &request.conversation_id, request.request_id).await? {
            Some((parent, parent_references)) => {
                let references = compose::thread_references(&parent_references, &parent);
                (Some(parent), references)
            }
            None => (None, vec![]),
        }
    };
    Ok(Envelope { message_id, date: Utc::now(), in_reply_to, references })
}

/// Replaces earlier outcomes with this attempt's, keeping the original recipient order.
fn merge_recipients(prior: &[RecipientOutcome], latest: &[RecipientOutcome]) -> Vec<RecipientOutcome> {
    let mut merged: Vec<RecipientOutcome> = prior.to_vec();
    for outcome in latest {
        match merged.iter_mut().find(|o| o.address == outcome.address) {
            Some(existing) => *existing = outcome.clone(),
            None => merged.push(outcome.clone()),
        }
    }
    merged
}

#[derive(Debug, PartialEq)]
struct Decision {
    status: Status,
    reason: Option<Reason>,
    detail: String,
}

/// Decides the request's status from every recipient's latest outcome.
fn decide(recipients: &[RecipientOutcome], report: &RelayReport, window_spent: bool) -> Decision {
    let count = |status: RecipientStatus| recipients.iter().filter(|o| o.status == status).count();
    let (accepted, rejected, deferred) = (count(RecipientStatus::Accepted), count(RecipientStatus::Rejected), count(RecipientStatus::Deferred));
    let first_reply = |status: RecipientStatus| {
        recipients
            .iter()
            .find(|o| o.status == status)
            .and_then(|o| o.smtp_message.clone())
            .or_else(|| report.failure.clone())
            .unwrap_or_default()
    };

    if deferred > 0 && window_spent {
        return Decision {
            status: Status::Failed,
            reason: Some(Reason::RetriesExhausted),
            detail: format!(
                "The relay kept deferring {deferred} recipient(s) until the retry window ended (last reply: {}).",
                first_reply(RecipientStatus::Deferred)
            ),
        };
    }
    if deferred > 0 {
        let reason = if report.unavailable { Reason::SmtpUnavailable } else { Reason::SmtpTransient };
        let what = if report.unavailable { "could not be reached" } else { "answered with a temporary failure" };
        return Decision {
            status: Status::Deferred,
            reason: Some(reason),
            detail: format!("The relay {what} for {deferred} recipient(s) ({}).", first_reply(RecipientStatus::Deferred)),
        };
    }
    if accepted > 0 && rejected == 0 {
        return Decision { status: Status::Sent, reason: None, detail: "The relay accepted the message for every recipient.".into() };
    }
    if accepted > 0 {
        return Decision {
            status: Status::Sent,
            reason: Some(Reason::PartiallyRejected),
            detail: format!("The relay accepted {accepted} recipient(s) and rejected {rejected}; see recipients for each reply."),
        };
    }
    Decision {
        status: Status::Failed,
        reason: Some(Reason::SmtpRejected),
        detail: format!(
            "The relay rejected the message permanently ({}); check the recipient addresses and content.",
            first_reply(RecipientStatus::Rejected)
        ),
    }
}

/// Fields every result of one request shares.
struct ResultBase<'a> {
    request: &'a SendRequest,
    attempt: u32,
    published_at: Option<DateTime<Utc>>,
}

impl ResultBase<'_> {
    fn result(&self, status: Status, reason: Option<Reason>, detail: String, message_id: Option<String>, recipients: Vec<RecipientOutcome>) -> DeliveryResult {
        DeliveryResult {
            schema: RESULT_SCHEMA.into(),
            event_id: Uuid::new_v4(),
            request_id: Some(self.request.request_id),
            tenant_id: Some(self.request.tenant_id),
            conversation_id: Some(self.request.conversation_id.clone()),
            origin: Some(self.request.origin),
            status,
            is_final: status.is_final(),
            reason,
            detail,
            message_id,
            attempt: self.attempt,
            next_attempt_at: None,
            recipients,
            duplicate: false,
            metadata: self.request.metadata.clone(),
            occurred_at: timestamp(Utc::now()),
        }
        .with_end_to_end(self.published_at)
    }
}

trait EndToEnd {
    fn with_end_to_end(self, published_at: Option<DateTime<Utc>>) -> Self;
}

impl EndToEnd for DeliveryResult {
    fn with_end_to_end(self, published_at: Option<DateTime<Utc>>) -> Self {
        if let (true, Some(published_at)) = (self.is_final, published_at) {
            let seconds = (Utc::now() - published_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!(telemetry::END_TO_END).record(seconds);
        }
        self
    }
}

/// Records the result, then publishes it with a confirm and marks it published.
async fn finish(context: &Context, result: DeliveryResult, next_attempt_at: Option<DateTime<Utc>>) -> Result<(), WorkError> {
    store::record_result(&context.pool, &result, next_attempt_at, &result.recipients).await?;
    tracing::debug!(request_id = ?result.request_id, status = result.status.as_str(), reason = reason_label(result.reason), "request processed");
    publish_and_mark(context, &result).await
}

async fn publish_and_mark(context: &Context, result: &DeliveryResult) -> Result<(), WorkError> {
    context.publisher.publish_result(result).await?;
    metrics::counter!(telemetry::RESULTS, "status" => result.status.as_str(), "reason" => reason_label(result.reason)).increment(1);
    if let Some(request_id) = result.request_id {
        store::mark_published(&context.pool, result.tenant_id, request_id, result.event_id).await?;
    }
    Ok(())
}

fn reason_label(reason: Option<Reason>) -> &'static str {
    reason.map(Reason::as_str).unwrap_or("none")
}

/// Polls for deferred requests that are due and for requests whose owner died.
async fn scheduler_loop(context: Arc<Context>, tracker: TaskTracker, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(context.settings.worker.poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_republish = tokio::time::Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(SCHEDULER_CONCURRENCY));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }

        let free = slots.available_permits();
        if free > 0 {
            claim_and_spawn(&context, &tracker, &slots, free).await;
        }

        if last_republish.elapsed() >= REPUBLISH_AFTER {
            last_republish = tokio::time::Instant::now();
            republish_unconfirmed(&context).await;
        }
    }
}

/// Claims up to `free` due rows and runs each in a task that keeps one slot until it ends.
async fn claim_and_spawn(context: &Arc<Context>, tracker: &TaskTracker, slots: &Arc<tokio::sync::Semaphore>, free: usize) {
    match store::claim_due(&context.pool, free as i64, context.settings.worker.lease).await {
        Ok(rows) => {
            for row in rows {
                let context = context.clone();
                let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
                tracker.spawn(async move {
                    retry_row(&context, row).await;
                    drop(permit);
                });
            }
        }
        Err(err) => tracing::warn!(error = %err, "looking for due deferred requests failed; trying again at the next poll"),
    }
}

/// Runs one more attempt for a claimed row.
async fn retry_row(context: &Context, row: DeliveryRow) {
    metrics::gauge!(telemetry::INFLIGHT).increment(1.0);
    let request_id = row.request_id;
    let outcome = async {
        let body = row.request.clone().map(|value| value.to_string()).unwrap_or_default();
        let request = match request::parse(body.as_bytes(), &context.settings.limits) {
            Ok(request) => request,
            Err(invalid) => {
                // Only valid requests get a processing row, so this means the limits changed.
                tracing::error!(request_id = %request_id, error = %invalid, "stored request no longer passes validation; failing it");
                let result = DeliveryResult {
                    schema: RESULT_SCHEMA.into(),
                    event_id: Uuid::new_v4(),
                    request_id: Some(request_id),
                    tenant_id: invalid.ids.tenant_id,
                    conversation_id: invalid.ids.conversation_id,
                    origin: invalid.ids.origin,
                    status: Status::Invalid,
                    is_final: true,
                    reason: Some(invalid.reason),
                    detail: invalid.detail,
                    message_id: row.message_id.clone(),
                    attempt: row.attempt,
                    next_attempt_at: None,
                    recipients: row.recipient_results.clone(),
                    duplicate: false,
                    metadata: invalid.ids.metadata,
                    occurred_at: timestamp(Utc::now()),
                };
                return finish(context, result, None).await;
            }
        };
        deliver(context, &request, Prior::from_row(&row)).await
    }
    .await;
    metrics::gauge!(telemetry::INFLIGHT).decrement(1.0);
    if let Err(err) = outcome {
        metrics::counter!(telemetry::PROCESSING_ERRORS, "kind" => err.kind()).increment(1);
        // The lease runs out and another poll takes the row again.
        tracing::warn!(request_id = %request_id, error = %err, "retry attempt failed before a result was stored; it is taken up again after the lease");
    }
}

async fn republish_unconfirmed(context: &Context) {
    let results = match store::unpublished_results(&context.pool, REPUBLISH_AFTER, 100).await {
        Ok(results) => results,
        Err(err) => {
            tracing::warn!(error = %err, "looking for unpublished results failed");
            return;
        }
    };
    for result in results {
        if let Err(err) = publish_and_mark(context, &result).await {
            tracing::warn!(request_id = ?result.request_id, error = %err, "publishing a stored result failed; trying again later");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(address: &str, status: RecipientStatus, code: u16) -> RecipientOutcome {
        RecipientOutcome { address: address.into(), status, smtp_code: Some(code), enhanced_code: None, smtp_message: Some(format!("{code} reply")) }
    }

    fn report(unavailable: bool) -> RelayReport {
        RelayReport { recipients: vec![], unavailable, failure: None }
    }

    #[test]
    fn all_accepted_is_sent() {
        let decision = decide(&[recipient("a@x.example", RecipientStatus::Accepted, 250)], &report(false), false);
        assert_eq!((decision.status, decision.reason), (Status::Sent, None));
    }

    #[test]
    fn mixed_is_partially_rejected() {
        let outcomes = [recipient("a@x.example", RecipientStatus::Accepted, 250), recipient("b@x.example", RecipientStatus::Rejected, 550)];
        let decision = decide(&outcomes, &report(false), false);
        assert_eq!((decision.status, decision.reason), (Status::Sent, Some(Reason::PartiallyRejected)));
    }

    #[test]
    fn all_rejected_fails() {
        let decision = decide(&[recipient("a@x.example", RecipientStatus::Rejected, 554)], &report(false), false);
        assert_eq!((decision.status, decision.reason), (Status::Failed, Some(Reason::SmtpRejected)));
    }

    #[test]
    fn deferred_reason_depends_on_cause() {
        let outcomes = [recipient("a@x.example", RecipientStatus::Deferred, 450)];
        assert_eq!(decide(&outcomes, &report(false), false).reason, Some(Reason::SmtpTransient));
        assert_eq!(decide(&outcomes, &report(true), false).reason, Some(Reason::SmtpUnavailable));
        let exhausted = decide(&outcomes, &report(false), true);
        assert_eq!((exhausted.status, exhausted.reason), (Status::Failed, Some(Reason::RetriesExhausted)));
    }

    #[test]
    fn merge_keeps_order_and_replaces() {
        let prior = [recipient("a@x.example", RecipientStatus::Accepted, 250), recipient("b@x.example", RecipientStatus::Deferred, 450)];
        let latest = [recipient("b@x.example", RecipientStatus::Accepted, 250)];
        let merged = merge_recipients(&prior, &latest);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[1].status, RecipientStatus::Accepted);
        assert_eq!(merged[0].address, "a@x.example");
    }
}
