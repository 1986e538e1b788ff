//! Statuses, reason codes and the delivery result published to `outbound.results`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::request::Origin;

pub const RESULT_SCHEMA: &str = "outbound.delivery_result.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Sent,
    Deferred,
    Failed,
    Blocked,
    Shadowed,
    Invalid,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Failed => "failed",
            Status::Blocked => "blocked",
            Status::Shadowed => "shadowed",
            Status::Invalid => "invalid",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(text.to_string())).ok()
    }

    /// Returns true for every status but `deferred`, which is the only non-final one.
    pub fn is_final(self) -> bool {
        self != Status::Deferred
    }
}

/// The reason codes of the contract, one per cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    PartiallyRejected,
    RateLimited,
    SmtpTransient,
    SmtpUnavailable,
    SmtpRejected,
    RetriesExhausted,
    Expired,
    TenantNotFound,
    OutboundDisabled,
    DomainNotVerified,
    SenderDomainMismatch,
    TenantRestricted,
    RecipientSuppressed,
    KillSwitchActive,
    AutomationPaused,
    AutomationNotFound,
    ShadowValidationMissing,
    ReadinessBelowThreshold,
    RevalidationOverdue,
    AutoReplyLoop,
    ShadowMode,
    InvalidJson,
    UnsupportedSchema,
    MissingField,
    InvalidField,
    InvalidAddress,
    HeaderInjection,
    TooManyRecipients,
    MessageTooLarge,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PartiallyRejected => "partially_rejected",
            Reason::RateLimited => "rate_limited",
            Reason::SmtpTransient => "smtp_transient",
            Reason::SmtpUnavailable => "smtp_unavailable",
            Reason::SmtpRejected => "smtp_rejected",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::Expired => "expired",
            Reason::TenantNotFound => "tenant_not_found",
            Reason::OutboundDisabled => "outbound_disabled",
            Reason::DomainNotVerified => "domain_not_verified",
            Reason::SenderDomainMismatch => "sender_domain_mismatch",
            Reason::TenantRestricted => "tenant_restricted",
            Reason::RecipientSuppressed => "recipient_suppressed",
            Reason::KillSwitchActive => "kill_switch_active",
            Reason::AutomationPaused => "automation_paused",
            Reason::AutomationNotFound => "automation_not_found",
            Reason::ShadowValidationMissing => "shadow_validation_missing",
            Reason::ReadinessBelowThreshold => "readiness_below_threshold",
            Reason::RevalidationOverdue => "revalidation_overdue",
            Reason::AutoReplyLoop => "auto_reply_loop",
            Reason::ShadowMode => "shadow_mode",
            Reason::InvalidJson => "invalid_json",
            Reason::UnsupportedSchema => "unsupported_schema",
            Reason::MissingField => "missing_field",
            Reason::InvalidField => "invalid_field",
            Reason::InvalidAddress => "invalid_address",
            Reason::HeaderInjection => "header_injection",
            Reason::TooManyRecipients => "too_many_recipients",
            Reason::MessageTooLarge => "message_too_large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    Accepted,
    Rejected,
    Deferred,
}

/// The relay's reply for one envelope recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientOutcome {
    pub address: String,
    pub status: RecipientStatus,
    pub smtp_code: Option<u16>,
    pub enhanced_code: Option<String>,
    pub smtp_message: Option<String>,
}

/// The delivery result event, field for field as in the JSON schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryResult {
    pub schema: String,
    pub event_id: Uuid,
    pub request_id: Option<Uuid>,
    pub tenant_id: Option<Uuid>,
    pub conversation_id: Option<String>,
    pub origin: Option<Origin>,
    pub status: Status,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub reason: Option<Reason>,
    pub detail: String,
    pub message_id: Option<String>,
    pub attempt: u32,
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub recipients: Vec<RecipientOutcome>,
    pub duplicate: bool,
    pub metadata: Option<serde_json::Value>,
    pub occurred_at: String,
}

impl DeliveryResult {
    /// Returns the routing key on `outbound.results`: `<status>.<tenant_id>`.
    pub fn routing_key(&self) -> String {
        let tenant = self.tenant_id.map(|id| id.to_string()).unwrap_or_else(|| "unknown".to_string());
        format!("{}.{}", self.status.as_str(), tenant)
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds, as every result field does.
pub fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_match_serde() {
        for reason in [Reason::PartiallyRejected, Reason::SmtpTransient, Reason::HeaderInjection, Reason::AutoReplyLoop] {
            assert_eq!(serde_json::to_value(reason).unwrap(), reason.as_str());
        }
    }

    #[test]
    fn routing_key_uses_unknown_without_tenant() {
        let result = DeliveryResult {
            schema: RESULT_SCHEMA.into(),
            event_id: Uuid::new_v4(),
            request_id: None,
            tenant_id: None,
            conversation_id: None,
            origin: None,
            status: Status::Invalid,
            is_final: true,
            reason: Some(Reason::InvalidJson),
            detail: "x".into(),
            message_id: None,
            attempt: 0,
            next_attempt_at: None,
            recipients: vec![],
            duplicate: false,
            metadata: None,
            occurred_at: timestamp(Utc::now()),
        };
        assert_eq!(result.routing_key(), "invalid.unknown");
    }
}
