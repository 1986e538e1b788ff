//! RabbitMQ: connection, the topology of the contract, and confirmed publishing.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::RwLock;

use crate::configuration::{redact_url, AmqpSettings};
use crate::outcome::DeliveryResult;

/// Producers publish send requests here, routing key = tenant id.
pub const REQUESTS_EXCHANGE: &str = "outbound.requests";
/// Every result goes here, routing key `<status>.<tenant_id>`.
pub const RESULTS_EXCHANGE: &str = "outbound.results";
/// Unreadable and invalid requests, unchanged, with an `x-outbound-error` header.
pub const DEAD_LETTER_QUEUE: &str = "outbound.dead-letter";
/// The quorum queue that every worker process consumes; it receives every request.
pub const WORK_QUEUE: &str = "outbound.requests.work";
pub const ERROR_HEADER: &str = "x-outbound-error";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the message (negative acknowledgement)")]
    Nacked,
    #[error("the broker connection is down")]
    Disconnected,
    #[error("cannot connect to RabbitMQ at {url} ({reason}); check OUTBOUND_AMQP_URL and that RabbitMQ is running")]
    Unreachable { url: String, reason: String },
}

/// Connects to RabbitMQ. With `retry`, it keeps trying with backoff for about a minute,
/// which covers a broker restart; without, it makes one attempt.
pub async fn connect(settings: &AmqpSettings, retry: bool) -> Result<Connection, BrokerError> {
    let uri = with_heartbeat(&settings.url, settings.heartbeat);
    let attempt = || Connection::connect(&uri, ConnectionProperties::default().with_connection_name("outbound".into()));
    let attempts = if retry { 10 } else { 0 };
    attempt
        .retry(ExponentialBuilder::default().with_min_delay(Duration::from_millis(250)).with_max_delay(Duration::from_secs(10)).with_max_times(attempts))
        .notify(|err, delay| tracing::warn!(error = %err, url = %redact_url(&settings.url), retry_in = ?delay, "RabbitMQ connection failed, retrying"))
        .await
        .map_err(|err| BrokerError::Unreachable { url: redact_url(&settings.url), reason: first_cause(&err) })
}

/// Returns the innermost cause of an error, which names what really failed.
fn first_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Adds `heartbeat=N` to the URI unless the operator set one.
fn with_heartbeat(url: &str, heartbeat: Duration) -> String {
    if url.contains("heartbeat=") {
        return url.to_string();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={}", heartbeat.as_secs().max(1))
}

/// Declares the exchanges and queues; declaring again with the same arguments changes nothing.
pub async fn declare_topology(channel: &Channel) -> Result<(), BrokerError> {
    let durable_exchange = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(REQUESTS_EXCHANGE, ExchangeKind::Topic, durable_exchange, FieldTable::default()).await?;
    channel.exchange_declare(RESULTS_EXCHANGE, ExchangeKind::Topic, durable_exchange, FieldTable::default()).await?;

    let durable_queue = QueueDeclareOptions { durable: true, ..Default::default() };
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(WORK_QUEUE, durable_queue, quorum.clone()).await?;
    channel.queue_bind(WORK_QUEUE, REQUESTS_EXCHANGE, "#", QueueBindOptions::default(), FieldTable::default()).await?;
    channel.queue_declare(DEAD_LETTER_QUEUE, durable_queue, quorum).await?;
    Ok(())
}

/// A confirm-mode channel that is replaced when the worker reconnects.
#[derive(Default)]
pub struct Publisher {
    channel: RwLock<Option<Channel>>,
}

impl Publisher {
    pub async fn attach(&self, connection: &Connection) -> Result<(), BrokerError> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        *self.channel.write().await = Some(channel);
        Ok(())
    }

    pub async fn detach(&self) -> Option<Channel> {
        self.channel.write().await.take()
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let guard = self.channel.read().await;
        match guard.as_ref() {
            Some(channel) if channel.status().connected() => Ok(channel.clone()),
            _ => Err(BrokerError::Disconnected),
        }
    }

    /// Publishes a result, persistent, and waits for the broker's confirmation.
    pub async fn publish_result(&self, result: &DeliveryResult) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(result).expect("results serialize");
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(result.event_id.to_string().into())
            .with_type("outbound.delivery_result.v1".into());
        self.publish(RESULTS_EXCHANGE, &result.routing_key(), &body, properties).await
    }

    /// Copies an unreadable request, body unchanged, to the dead-letter queue.
    pub async fn dead_letter(&self, body: &[u8], original: &BasicProperties, reason: &str) -> Result<(), BrokerError> {
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(ShortString::from(ERROR_HEADER), AMQPValue::LongString(LongString::from(reason.as_bytes().to_vec())));
        let mut properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        if let Some(content_type) = original.content_type() {
            properties = properties.with_content_type(content_type.clone());
        }
        if let Some(message_id) = original.message_id() {
            properties = properties.with_message_id(message_id.clone());
        }
        self.publish("", DEAD_LETTER_QUEUE, body, properties).await
    }

    async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        let confirmation = channel
            .basic_publish(exchange, routing_key, BasicPublishOptions::default(), body, properties)
            .await?
            .await?;
        match confirmation {
            Confirmation::Nack(_) => Err(BrokerError::Nacked),
            _ => Ok(()),
        }
    }
}

/// Publishes send requests for `outbound send` and the demo, with confirms.
pub async fn publish_request(channel: &Channel, tenant_routing_key: &str, body: &[u8]) -> Result<(), BrokerError> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
    let confirmation = channel
        .basic_publish(REQUESTS_EXCHANGE, tenant_routing_key, BasicPublishOptions::default(), body, properties)
        .await?
        .await?;
    match confirmation {
        Confirmation::Nack(_) => Err(BrokerError::Nacked),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_added_once() {
        assert_eq!(with_heartbeat("amqp://h/%2f", Duration::from_secs(10)), "amqp://h/%2f?heartbeat=10");
        assert_eq!(with_heartbeat("amqp://h/%2f?x=1", Duration::from_secs(5)), "amqp://h/%2f?x=1&heartbeat=5");
        assert_eq!(with_heartbeat("amqp://h/%2f?heartbeat=3", Duration::from_secs(5)), "amqp://h/%2f?heartbeat=3");
    }
}
