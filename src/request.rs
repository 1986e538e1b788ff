//! The send request: parsed from the AMQP body into domain types at the edge.
//!
//! Everything downstream works on [`SendRequest`], which can only be built by
//! [`parse`], so a value of that type has passed every rule of the wire format.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::address::{Address, AddressError};
use crate::configuration::LimitSettings;
use crate::outcome::Reason;

pub const SCHEMA: &str = "outbound.send_request.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Agent,
    Automation,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Agent => "agent",
            Origin::Automation => "automation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub address: Address,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
    pub content_id: Option<String>,
}

/// A send request that passed every validation rule.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub request_id: Uuid,
    pub tenant_id: Uuid,
    pub origin: Origin,
    pub automation_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
    pub conversation_id: String,
    pub from: Mailbox,
    pub reply_to: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub subject: String,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub parent_auto_submitted: Option<String>,
    /// Extra `X-` header fields in the producer's order.
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
    pub created_at: Option<DateTime<Utc>>,
    pub not_after: Option<DateTime<Utc>>,
    pub metadata: Option<serde_json::Value>,
}

impl SendRequest {
    /// Returns every envelope recipient: to, cc and bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &Mailbox> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }
}

/// The ids readable from a request that failed validation, for its `invalid` result.
#[derive(Debug, Clone, Default)]
pub struct ReadableIds {
    pub request_id: Option<Uuid>,
    pub tenant_id: Option<Uuid>,
    pub conversation_id: Option<String>,
    pub origin: Option<Origin>,
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct InvalidRequest {
    pub reason: Reason,
    pub detail: String,
    pub ids: ReadableIds,
}

/// The wire form, field for field as in the JSON schema.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    #[allow(dead_code)] // Checked on the raw JSON before this struct is built.
    schema: String,
    request_id: String,
    tenant_id: String,
    origin: Origin,
    automation_id: Option<String>,
    agent_id: Option<String>,
    conversation_id: String,
    from: WireMailbox,
    reply_to: Option<WireMailbox>,
    to: Vec<WireMailbox>,
    #[serde(default)]
    cc: Vec<WireMailbox>,
    #[serde(default)]
    bcc: Vec<WireMailbox>,
    subject: String,
    text_body: Option<String>,
    html_body: Option<String>,
    in_reply_to: Option<String>,
    #[serde(default)]
    references: Vec<String>,
    parent_auto_submitted: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    attachments: Vec<WireAttachment>,
    created_at: Option<DateTime<Utc>>,
    not_after: Option<DateTime<Utc>>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMailbox {
    address: String,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAttachment {
    filename: String,
    content_type: String,
    content_base64: String,
    content_id: Option<String>,
}

/// Parses and validates one AMQP body.
// The error is as large as the ids it carries, and it is built once per invalid request.
#[allow(clippy::result_large_err)]
pub fn parse(body: &[u8], limits: &LimitSettings) -> Result<SendRequest, InvalidRequest> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|err| InvalidRequest {
        reason: Reason::InvalidJson,
        detail: format!("The body is not JSON ({err}); publish a send request as a UTF-8 JSON object."),
        ids: ReadableIds::default(),
    })?;
    let ids = readable_ids(&value);
    let invalid = |reason: Reason, detail: String| InvalidRequest { reason, detail, ids: ids.clone() };

    let Some(object) = value.as_object() else {
        return Err(invalid(Reason::InvalidField, "The body is JSON but not an object; publish a send request object.".into()));
    };
    match object.get("schema").and_then(|schema| schema.as_str()) {
        None => {
            return Err(invalid(Reason::MissingField, format!("Field schema is missing; set it to \"{SCHEMA}\".")));
        }
        Some(schema) if schema != SCHEMA => {
            return Err(invalid(
                Reason::UnsupportedSchema,
                format!("Field schema is \"{schema}\", which this service does not read; set it to \"{SCHEMA}\"."),
            ));
        }
        Some(_) => {}
    }

    let wire: WireRequest = serde_path_to_error::deserialize(&value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
            let field = if path == "." { field.to_string() } else { format!("{path}.{field}") };
            invalid(Reason::MissingField, format!("Field {field} is missing; add it as the send request schema requires."))
        } else if let Some(field) = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next()) {
            let field = if path == "." { field.to_string() } else { format!("{path}.{field}") };
            invalid(Reason::InvalidField, format!("Field {field} is not part of the send request schema; remove it."))
        } else {
            invalid(Reason::InvalidField, format!("Field {path} is invalid: {message}."))
        }
    })?;

    validate(wire, limits).map_err(|(reason, detail)| invalid(reason, detail))
}

/// Reads the request id of a body, if it has a readable one, for log lines.
pub fn peek_request_id(body: &[u8]) -> Option<Uuid> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    readable_ids(&value).request_id
}

/// Reads the ids that a result needs, tolerating any other damage.
fn readable_ids(value: &serde_json::Value) -> ReadableIds {
    let text = |field: &str| value.get(field).and_then(|v| v.as_str()).map(str::to_string);
    ReadableIds {
        request_id: text("request_id").and_then(|id| Uuid::parse_str(&id).ok()),
        tenant_id: text("tenant_id").and_then(|id| Uuid::parse_str(&id).ok()),
        conversation_id: text("conversation_id"),
        origin: value.get("origin").and_then(|v| serde_json::from_value(v.clone()).ok()),
        metadata: value.get("metadata").filter(|v| v.is_object()).cloned(),
    }
}

type Rejection = (Reason, String);

fn validate(wire: WireRequest, limits: &LimitSettings) -> Result<SendRequest, Rejection> {
    let request_id = parse_uuid("request_id", &wire.request_id)?;
    let tenant_id = parse_uuid("tenant_id", &wire.tenant_id)?;
    let agent_id = wire.agent_id.as_deref().map(|id| parse_uuid("agent_id", id)).transpose()?;
    let automation_id = wire.automation_id.as_deref().map(|id| parse_uuid("automation_id", id)).transpose()?;
    match (wire.origin, automation_id) {
        (Origin::Automation, None) => {
            return Err((Reason::MissingField, "Field automation_id is missing; automated replies must name their automation.".into()));
        }
        (Origin::Agent, Some(_)) => {
            return Err((
                Reason::InvalidField,
                "Field automation_id is set on an agent reply; remove it or set origin to automation.".into(),
            ));
        }
        _ => {}
    }

    let conversation_chars = wire.conversation_id.chars().count();
    if conversation_chars == 0 || conversation_chars > 200 {
        return Err((Reason::InvalidField, "Field conversation_id must be 1 to 200 characters long.".into()));
    }
    reject_line_breaks("conversation_id", &wire.conversation_id)?;

    let from = mailbox("from", wire.from)?;
    let reply_to = wire.reply_to.map(|m| mailbox("reply_to", m)).transpose()?;
    if wire.to.is_empty() {
        return Err((Reason::InvalidField, "Field to is empty; give at least one recipient.".into()));
    }
    let to = mailboxes("to", wire.to)?;
    let cc = mailboxes("cc", wire.cc)?;
    let bcc = mailboxes("bcc", wire.bcc)?;
    let recipient_count = to.len() + cc.len() + bcc.len();
    if recipient_count > limits.max_recipients {
        return Err((
            Reason::TooManyRecipients,
            format!(
                "The request has {recipient_count} recipients in to, cc and bcc; the limit is {}, so split it into several requests.",
                limits.max_recipients
            ),
        ));
    }

    reject_line_breaks("subject", &wire.subject)?;
    if wire.subject.chars().count() > 998 {
        return Err((Reason::InvalidField, "Field subject is longer than 998 characters; shorten it.".into()));
    }
    if wire.text_body.is_none() && wire.html_body.is_none() {
        return Err((Reason::MissingField, "Neither text_body nor html_body is set; give at least one of them.".into()));
    }

    if let Some(in_reply_to) = &wire.in_reply_to {
        message_id("in_reply_to", in_reply_to)?;
    }
    for (index, reference) in wire.references.iter().enumerate() {
        message_id(&format!("references[{index}]"), reference)?;
    }
    if let Some(parent) = &wire.parent_auto_submitted {
        reject_line_breaks("parent_auto_submitted", parent)?;
    }

    let mut headers = Vec::with_capacity(wire.headers.len());
    for (name, value) in wire.headers {
        extra_header(&name, &value)?;
        headers.push((name, value));
    }

    let mut attachments = Vec::with_capacity(wire.attachments.len());
    for (index, attachment) in wire.attachments.into_iter().enumerate() {
        attachments.push(decode_attachment(index, attachment)?);
    }

    let metadata = wire.metadata.map(serde_json::Value::Object);
    if let Some(metadata) = &metadata {
        let size = metadata.to_string().len();
        if size > limits.max_metadata_size {
            return Err((
                Reason::InvalidField,
                format!("Field metadata is {size} bytes serialized; the limit is {}, so keep only ids in it.", limits.max_metadata_size),
            ));
        }
    }

    Ok(SendRequest {
        request_id,
        tenant_id,
        origin: wire.origin,
        automation_id,
        agent_id,
        conversation_id: wire.conversation_id,
        from,
        reply_to,
        to,
        cc,
        bcc,
        subject: wire.subject,
        text_body: wire.text_body,
        html_body: wire.html_body,
        in_reply_to: wire.in_reply_to,
        references: wire.references,
        parent_auto_submitted: wire.parent_auto_submitted,
        headers,
        attachments,
        created_at: wire.created_at,
        not_after: wire.not_after,
        metadata,
    })
}

fn parse_uuid(field: &str, text: &str) -> Result<Uuid, Rejection> {
    Uuid::parse_str(text)
        .map_err(|_| (Reason::InvalidField, format!("Field {field} is \"{text}\", not a UUID; use the canonical 8-4-4-4-12 form.")))
}

/// Rejects CR and LF, which would end the header field and start a forged one.
fn reject_line_breaks(field: &str, value: &str) -> Result<(), Rejection> {
    if value.contains(['\r', '\n']) {
        return Err((
            Reason::HeaderInjection,
            format!("Field {field} contains a line break (CR or LF), which could inject header fields; remove it."),
        ));
    }
    if value.contains('\0') {
        return Err((Reason::InvalidField, format!("Field {field} contains a NUL character; remove it.")));
    }
    Ok(())
}

fn mailbox(field: &str, wire: WireMailbox) -> Result<Mailbox, Rejection> {
    if let Some(name) = &wire.name {
        reject_line_breaks(&format!("{field}.name"), name)?;
    }
    reject_line_breaks(&format!("{field}.address"), &wire.address)?;
    let address = Address::parse(&wire.address).map_err(|err: AddressError| {
        (
            Reason::InvalidAddress,
            format!("Field {field}.address is \"{}\", which is not an email address: {err}.", wire.address),
        )
    })?;
    let name = wire.name.filter(|name| !name.trim().is_empty());
    Ok(Mailbox { address, name })
}

fn mailboxes(field: &str, wire: Vec<WireMailbox>) -> Result<Vec<Mailbox>, Rejection> {
    wire.into_iter()
        .enumerate()
        .map(|(index, m)| mailbox(&format!("{field}[{index}]"), m))
        .collect()
}

/// Checks the `<left@right>` form of a message id, with no spaces or line breaks.
fn message_id(field: &str, value: &str) -> Result<(), Rejection> {
    reject_line_breaks(field, value)?;
    let valid = value.len() <= 998
        && value.starts_with('<')
        && value.ends_with('>')
        && value[1..value.len() - 1]
            .split_once('@')
            .is_some_and(|(left, right)| {
                let allowed = |part: &str| {
                    !part.is_empty() && part.chars().all(|c| !c.is_whitespace() && !c.is_control() && c != '<' && c != '>' && c != '@')
                };
                allowed(left) && allowed(right)
            });
    if valid {
        Ok(())
    } else {
        Err((Reason::InvalidField, format!("Field {field} is \"{value}\", not a message id; write it as <left@right>.")))
    }
}

fn extra_header(name: &str, value: &str) -> Result<(), Rejection> {
    let field = format!("headers.{name}");
    let valid_name = name.len() > 2
        && name.len() <= 76
        && name[..2].eq_ignore_ascii_case("x-")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_name {
        return Err((
            Reason::InvalidField,
            format!("Field {field} has a name this service does not accept; extra headers must be X- followed by letters, digits or hyphens."),
        ));
    }
    reject_line_breaks(&field, value)
}

fn decode_attachment(index: usize, wire: WireAttachment) -> Result<Attachment, Rejection> {
    let field = format!("attachments[{index}]");
    reject_line_breaks(&format!("{field}.filename"), &wire.filename)?;
    reject_line_breaks(&format!("{field}.content_type"), &wire.content_type)?;
    if wire.filename.is_empty() || wire.filename.chars().count() > 255 {
        return Err((Reason::InvalidField, format!("Field {field}.filename must be 1 to 255 characters long.")));
    }
    let content_type_valid = wire.content_type.split_once('/').is_some_and(|(kind, subtype)| {
        let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
        token(kind) && token(subtype.split(';').next().unwrap_or("").trim())
    });
    if !content_type_valid {
        return Err((Reason::InvalidField, format!("Field {field}.content_type is \"{}\", not a MIME type like application/pdf.", wire.content_type)));
    }
    if let Some(content_id) = &wire.content_id {
        reject_line_breaks(&format!("{field}.content_id"), content_id)?;
    }
    let compact: String = wire.content_base64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let content = base64::engine::general_purpose::STANDARD.decode(compact).map_err(|err| {
        (Reason::InvalidField, format!("Field {field}.content_base64 is not valid base64 ({err}); encode the file with standard base64."))
    })?;
    Ok(Attachment {
        filename: wire.filename,
        content_type: wire.content_type,
        content,
        content_id: wire.content_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitSettings {
        LimitSettings { max_recipients: 50, max_message_size: 10 << 20, max_metadata_size: 4096 }
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "schema": SCHEMA,
            "request_id": "0b6f3c1e-5a4d-4c1b-9a57-2f0e8d6c9a11",
            "tenant_id": "7d2b9c44-1f3e-4a8b-b6d1-0c9e5f4a2b73",
            "origin": "agent",
            "conversation_id": "conv-1",
            "from": {"address": "support@yourstore.example"},
            "to": [{"address": "jamie@customer.example", "name": "Jamie"}],
            "subject": "Hi",
            "text_body": "Hello"
        })
    }

    fn rejection(value: serde_json::Value) -> InvalidRequest {
        parse(value.to_string().as_bytes(), &limits()).unwrap_err()
    }

    #[test]
    fn valid_request_parses() {
        let request = parse(base().to_string().as_bytes(), &limits()).unwrap();
        assert_eq!(request.to[0].address.to_string(), "jamie@customer.example");
        assert_eq!(request.origin, Origin::Agent);
    }

    #[test]
    fn not_json_is_invalid_json() {
        let err = parse(b"hello", &limits()).unwrap_err();
        assert_eq!(err.reason, Reason::InvalidJson);
        assert!(err.ids.request_id.is_none());
    }

    #[test]
    fn other_schema_is_unsupported() {
        let mut value = base();
        value["schema"] = "outbound.send_request.v9".into();
        let err = rejection(value);
        assert_eq!(err.reason, Reason::UnsupportedSchema);
        assert!(err.detail.contains("outbound.send_request.v9"));
        assert!(err.ids.request_id.is_some(), "ids stay readable");
    }

    #[test]
    fn missing_field_is_named() {
        let mut value = base();
        value.as_object_mut().unwrap().remove("conversation_id");
        let err = rejection(value);
        assert_eq!(err.reason, Reason::MissingField);
        assert!(err.detail.contains("conversation_id"), "{}", err.detail);
    }

    #[test]
    fn unknown_field_is_named() {
        let mut value = base();
        value["priority"] = "high".into();
        let err = rejection(value);
        assert_eq!(err.reason, Reason::InvalidField);
        assert!(err.detail.contains("priority"), "{}", err.detail);
    }

    #[test]
    fn line_breaks_are_header_injection() {
        let cases = [
            ("/subject", serde_json::json!("a\r\nBcc: x@y.example"), "subject"),
            ("/to/0/name", serde_json::json!("Jamie\nBcc: x@y.example"), "to[0].name"),
            ("/from/name", serde_json::json!("Support\rX"), "from.name"),
        ];
        for (pointer, bad, field) in cases {
            let mut value = base();
            value["from"]["name"] = "Support".into();
            *value.pointer_mut(pointer).unwrap() = bad;
            let err = rejection(value);
            assert_eq!(err.reason, Reason::HeaderInjection, "{pointer}");
            assert!(err.detail.contains(field), "{pointer}: {}", err.detail);
        }
        let mut value = base();
        value["headers"] = serde_json::json!({"X-Ticket": "1\r\nBcc: x@y.example"});
        assert_eq!(rejection(value).reason, Reason::HeaderInjection);
    }

    #[test]
    fn bad_message_ids_are_rejected() {
        for bad in ["<id1@example.com>\r\nBcc: v@x.example", "id@example.com", "<no-at>", "<a b@c>"] {
            let mut value = base();
            value["in_reply_to"] = bad.into();
            let err = rejection(value);
            assert!(matches!(err.reason, Reason::HeaderInjection | Reason::InvalidField), "{bad}");
            assert!(err.detail.contains("in_reply_to"), "{bad}: {}", err.detail);
        }
    }

    #[test]
    fn only_x_headers_are_accepted() {
        let mut value = base();
        value["headers"] = serde_json::json!({"Bcc": "x@y.example"});
        let err = rejection(value);
        assert_eq!(err.reason, Reason::InvalidField);
        assert!(err.detail.contains("headers.Bcc"));
    }

    #[test]
    fn recipient_limit_counts_every_list() {
        let mut value = base();
        let many: Vec<_> = (0..30).map(|i| serde_json::json!({"address": format!("c{i}@example.net")})).collect();
        value["to"] = many.clone().into();
        value["bcc"] = many.into();
        let err = rejection(value);
        assert_eq!(err.reason, Reason::TooManyRecipients);
        assert!(err.detail.contains("60"));
    }

    #[test]
    fn automation_id_matches_origin() {
        let mut value = base();
        value["origin"] = "automation".into();
        assert_eq!(rejection(value.clone()).reason, Reason::MissingField);
        let mut agent = base();
        agent["automation_id"] = "a3f1c9e2-6d4b-4a7e-8f0c-2b1d9e8a7c6b".into();
        assert_eq!(rejection(agent).reason, Reason::InvalidField);
    }

    #[test]
    fn body_is_required() {
        let mut value = base();
        value.as_object_mut().unwrap().remove("text_body");
        let err = rejection(value);
        assert_eq!(err.reason, Reason::MissingField);
        assert!(err.detail.contains("text_body"));
    }

    #[test]
    fn bad_base64_attachment_is_named() {
        let mut value = base();
        value["attachments"] = serde_json::json!([{"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "not base64!"}]);
        let err = rejection(value);
        assert_eq!(err.reason, Reason::InvalidField);
        assert!(err.detail.contains("attachments[0].content_base64"), "{}", err.detail);
    }

    #[test]
    fn bad_address_is_invalid_address() {
        let mut value = base();
        value["to"][0]["address"] = "no-at-sign".into();
        let err = rejection(value);
        assert_eq!(err.reason, Reason::InvalidAddress);
        assert!(err.detail.contains("to[0].address"));
    }
}
