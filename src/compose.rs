//! Composes the MIME message of a send request.
//!
//! lettre builds the body parts (transfer encoding, CRLF line ends, boundaries). The
//! top-level header fields are written here, because their encoding decides whether a
//! receiver shows the subject intact and whether the DKIM signature survives. Unicode
//! becomes RFC 2047 encoded-words split only between characters. Long fields are folded
//! at whitespace or between list items, never inside a token.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use lettre::message::header::ContentType;
use lettre::message::{Attachment as MimeAttachment, MultiPart, SinglePart};

use crate::request::{Mailbox, Origin, SendRequest};

/// Preferred maximum line length (RFC 5322 section 2.1.1), met wherever a fold point exists.
const PREFERRED_LINE: usize = 78;
/// Payload bytes per encoded-word: 36 bytes give 48 base64 characters, so one word with
/// its `=?UTF-8?B?...?=` wrapper is 60 characters, within the 75 of RFC 2047.
const ENCODED_WORD_BYTES: usize = 36;
/// Most message ids kept in `References`: the first one and the most recent others.
pub const MAX_REFERENCES: usize = 20;

/// The threading and identity fields chosen for one request, kept across retries.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub message_id: String,
    pub date: DateTime<Utc>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
}

/// Builds the unsigned message, header fields first, with CRLF line ends throughout.
pub fn compose(request: &SendRequest, envelope: &Envelope) -> Vec<u8> {
    let mut out = String::new();
    out.push_str(&address_field("From", std::slice::from_ref(&request.from)));
    if let Some(reply_to) = &request.reply_to {
        out.push_str(&address_field("Reply-To", std::slice::from_ref(reply_to)));
    }
    out.push_str(&address_field("To", &request.to));
    if !request.cc.is_empty() {
        out.push_str(&address_field("Cc", &request.cc));
    }
    out.push_str(&unstructured_field("Subject", &request.subject));
    out.push_str(&format!("Date: {}\r\n", envelope.date.to_rfc2822()));
    out.push_str(&format!("Message-ID: {}\r\n", envelope.message_id));
    if let Some(in_reply_to) = &envelope.in_reply_to {
        out.push_str(&format!("In-Reply-To: {in_reply_to}\r\n"));
    }
    if !envelope.references.is_empty() {
        out.push_str(&fold("References", &envelope.references));
    }
    if request.origin == Origin::Automation {
        out.push_str("Auto-Submitted: auto-replied\r\n");
    }
    for (name, value) in &request.headers {
        out.push_str(&unstructured_field(name, value));
    }
    out.push_str("MIME-Version: 1.0\r\n");

    let mut message = out.into_bytes();
    message.extend_from_slice(&body(request));
    message
}

/// Chooses `References` for a reply: the request's own, or the parent's chain plus the
/// parent, trimmed to the first id and the most recent ones.
pub fn thread_references(parent_references: &[String], parent_message_id: &str) -> Vec<String> {
    let mut references: Vec<String> = parent_references.to_vec();
    references.push(parent_message_id.to_string());
    trim_references(references)
}

/// Keeps the first message id and the most recent ones, so the field stays a sensible size.
pub fn trim_references(references: Vec<String>) -> Vec<String> {
    if references.len() <= MAX_REFERENCES {
        return references;
    }
    let mut kept = vec![references[0].clone()];
    kept.extend_from_slice(&references[references.len() - (MAX_REFERENCES - 1)..]);
    kept
}

fn body(request: &SendRequest) -> Vec<u8> {
    // A top-level single part ends with lettre's CRLF, so its own final line end is
    // dropped. Inside a multipart, the CRLF before the boundary belongs to the boundary.
    let single = request.text_body.is_none() || request.html_body.is_none();
    let single = single && request.attachments.is_empty();
    let prepare = |text: &str| {
        let normalized = normalize_line_ends(text);
        if single { drop_final_line_end(normalized) } else { normalized }
    };
    let text = request.text_body.as_deref().map(|text| SinglePart::builder().header(ContentType::TEXT_PLAIN).body(prepare(text)));
    let html = request.html_body.as_deref().map(|html| SinglePart::builder().header(ContentType::TEXT_HTML).body(prepare(html)));

    enum Content {
        Single(SinglePart),
        Multi(MultiPart),
    }
    let content = match (text, html) {
        (Some(text), Some(html)) => Content::Multi(MultiPart::alternative().singlepart(text).singlepart(html)),
        (Some(part), None) | (None, Some(part)) => Content::Single(part),
        (None, None) => unreachable!("validation requires text_body or html_body"),
    };

    if request.attachments.is_empty() {
        return match content {
            Content::Single(part) => part.formatted(),
            Content::Multi(part) => part.formatted(),
        };
    }

    let mut mixed = match content {
        Content::Single(part) => MultiPart::mixed().singlepart(part),
        Content::Multi(part) => MultiPart::mixed().multipart(part),
    };
    for attachment in &request.attachments {
        let content_type = ContentType::parse(&attachment.content_type)
            .unwrap_or_else(|_| ContentType::parse("application/octet-stream").expect("static MIME type"));
        // NOTE: inline parts (content_id set) go into multipart/mixed, not multipart/related;
        // mail clients resolve cid: references either way.
        let part = match &attachment.content_id {
            Some(content_id) => MimeAttachment::new_inline_with_name(content_id.clone(), attachment.filename.clone()),
            None => MimeAttachment::new(attachment.filename.clone()),
        };
        mixed = mixed.singlepart(part.body(attachment.content.clone(), content_type));
    }
    mixed.formatted()
}

/// Turns CRLF, bare CR and bare LF alike into LF; lettre then writes every line end as CRLF.
fn normalize_line_ends(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

fn drop_final_line_end(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
    }
    text
}

/// Writes an unstructured field (Subject, X-...): plain ASCII folded at spaces, or
/// RFC 2047 encoded-words when the value needs encoding.
pub fn unstructured_field(name: &str, value: &str) -> String {
    // Readers drop the white space that starts a field value, so leading spaces survive
    // only inside an encoded-word.
    let needs_encoding = !value.bytes().all(|b| (0x20..0x7f).contains(&b)) || value.contains("=?") || value.starts_with(' ');
    let tokens = if needs_encoding { encoded_words(value) } else { space_tokens(value) };
    fold(name, &tokens)
}

/// Splits at single spaces so that joining the tokens with one space gives back the value.
/// A run of spaces stays attached to the next token, so no fold produces a blank line.
fn space_tokens(value: &str) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    let mut pending_spaces = String::new();
    for (index, piece) in value.split(' ').enumerate() {
        if piece.is_empty() && index > 0 {
            pending_spaces.push(' ');
            continue;
        }
        tokens.push(format!("{pending_spaces}{piece}"));
        pending_spaces.clear();
    }
    if !pending_spaces.is_empty() {
        match tokens.last_mut() {
            Some(last) => last.push_str(&pending_spaces),
            None => tokens.push(pending_spaces),
        }
    }
    tokens
}

/// Encodes text as base64 encoded-words, each cut only at a character boundary.
fn encoded_words(value: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in value.chars() {
        if chunk.len() + c.len_utf8() > ENCODED_WORD_BYTES {
            words.push(encode_word(&chunk));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() || words.is_empty() {
        words.push(encode_word(&chunk));
    }
    words
}

fn encode_word(text: &str) -> String {
    format!("=?UTF-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(text))
}

/// Writes `Name: token token ...` with a fold (CRLF and a space) before any token that
/// would push the line past 78 octets. A single token longer than that stays whole.
fn fold(name: &str, tokens: &[String]) -> String {
    let mut out = format!("{name}:");
    let mut line_length = out.len();
    for token in tokens {
        if line_length + 1 + token.len() > PREFERRED_LINE && line_length > name.len() + 1 {
            out.push_str("\r\n");
            line_length = 0;
        }
        out.push(' ');
        out.push_str(token);
        line_length += 1 + token.len();
    }
    out.push_str("\r\n");
    out
}

/// Writes an address-list field, folding between mailboxes and encoded-words.
fn address_field(name: &str, mailboxes: &[Mailbox]) -> String {
    let mut tokens = Vec::new();
    for (index, mailbox) in mailboxes.iter().enumerate() {
        if let Some(display) = &mailbox.name {
            tokens.extend(display_name_tokens(display));
        }
        let mut address = if mailbox.name.is_some() {
            format!("<{}>", mailbox.address)
        } else {
            mailbox.address.to_string()
        };
        if index + 1 < mailboxes.len() {
            address.push(',');
        }
        tokens.push(address);
    }
    fold(name, &tokens)
}

/// Encodes a display name as atoms, one quoted-string, or encoded-words.
fn display_name_tokens(name: &str) -> Vec<String> {
    let name = name.trim();
    if !name.is_ascii() || name.contains("=?") || name.chars().any(|c| c.is_ascii_control()) {
        return encoded_words(name);
    }
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~ ".contains(c);
    if name.chars().all(atext) {
        return name.split(' ').filter(|word| !word.is_empty()).map(str::to_string).collect();
    }
    let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
    vec![format!("\"{escaped}\"")]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_encoded_words(value: &str) -> String {
        let mut out = Vec::new();
        for word in value.split_whitespace() {
            let inner = word.strip_prefix("=?UTF-8?B?").and_then(|w| w.strip_suffix("?=")).expect("an encoded-word");
            out.extend(base64::engine::general_purpose::STANDARD.decode(inner).unwrap());
        }
        String::from_utf8(out).expect("each word contains whole characters")
    }

    #[test]
    fn unicode_subject_round_trips() {
        let subject = "Livraison retardée. Arrivée prévue : 5 août, 11h48";
        let field = unstructured_field("Subject", subject);
        let value = field.strip_prefix("Subject:").unwrap().replace("\r\n", "");
        assert_eq!(decode_encoded_words(&value), subject);
        for line in field.trim_end().split("\r\n") {
            assert!(line.len() <= PREFERRED_LINE, "{line}");
        }
        for word in value.split_whitespace() {
            assert!(word.len() <= 75, "{word}");
            let inner = word.trim_start_matches("=?UTF-8?B?").trim_end_matches("?=");
            let bytes = base64::engine::general_purpose::STANDARD.decode(inner).unwrap();
            assert!(std::str::from_utf8(&bytes).is_ok(), "a word split a character: {word}");
        }
    }

    #[test]
    fn multibyte_never_split() {
        let subject = "✓".repeat(40);
        let field = unstructured_field("Subject", &subject);
        let value = field.strip_prefix("Subject:").unwrap().replace("\r\n", "");
        assert_eq!(decode_encoded_words(&value), subject);
    }

    #[test]
    fn ascii_folds_at_spaces_only() {
        let value = "ticket=48213; queue=returns; ".to_string() + &"word ".repeat(30) + "end";
        let field = unstructured_field("X-Ticket-Context", &value);
        let lines: Vec<&str> = field.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(lines.len() > 1);
        for line in &lines {
            assert!(line.len() <= PREFERRED_LINE, "{line}");
        }
        let unfolded = field.trim_end_matches("\r\n").replace("\r\n", "");
        assert_eq!(unfolded, format!("X-Ticket-Context: {value}"));
    }

    #[test]
    fn repeated_spaces_survive_folding() {
        let value = format!("{}  two spaces   three {}", "a".repeat(60), "b".repeat(60));
        let field = unstructured_field("Subject", &value);
        assert!(!field.contains("\r\n \r\n"), "no blank continuation line");
        assert_eq!(field.trim_end_matches("\r\n").replace("\r\n", ""), format!("Subject: {value}"));
    }

    #[test]
    fn encoded_word_lookalike_is_encoded() {
        let field = unstructured_field("Subject", "=?UTF-8?B?Zm9v?=");
        let value = field.strip_prefix("Subject:").unwrap().replace("\r\n", "");
        assert_eq!(decode_encoded_words(&value), "=?UTF-8?B?Zm9v?=");
    }

    #[test]
    fn empty_subject_keeps_field() {
        assert_eq!(unstructured_field("Subject", ""), "Subject: \r\n");
    }

    #[test]
    fn references_fold_between_ids() {
        let ids: Vec<String> = (0..30).map(|i| format!("<20240101.{i:06}.a1b2c3d4e5f6@mail.example.org>")).collect();
        let field = fold("References", &ids);
        for line in field.trim_end_matches("\r\n").split("\r\n") {
            let line = line.trim_start_matches("References:");
            for token in line.split_whitespace() {
                assert!(token.starts_with('<'), "split inside an id: {token}");
                assert!(token.ends_with('>'), "split inside an id: {token}");
            }
        }
    }

    #[test]
    fn references_trimmed_to_first_and_recent() {
        let ids: Vec<String> = (0..30).map(|i| format!("<{i}@x.example>")).collect();
        let kept = trim_references(ids.clone());
        assert_eq!(kept.len(), MAX_REFERENCES);
        assert_eq!(kept[0], ids[0]);
        assert_eq!(kept.last(), ids.last());
        assert_eq!(kept[1], ids[30 - (MAX_REFERENCES - 1)]);
    }

    #[test]
    fn display_names_quoted_or_encoded() {
        assert_eq!(display_name_tokens("Jamie Doe"), vec!["Jamie", "Doe"]);
        assert_eq!(display_name_tokens("Doe, Jamie \"JD\""), vec!["\"Doe, Jamie \\\"JD\\\"\""]);
        let encoded = display_name_tokens("René Müller");
        assert_eq!(decode_encoded_words(&encoded.join(" ")), "René Müller");
    }

    #[test]
    fn line_ends_normalized() {
        assert_eq!(normalize_line_ends("a\nb\r\nc\rd"), "a\nb\nc\nd");
        assert_eq!(drop_final_line_end("a\n".into()), "a");
        assert_eq!(drop_final_line_end("a\n\n".into()), "a\n");
    }
}
