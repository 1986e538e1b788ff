//! Inputs on which mail software has failed in public, each with its expected result,
//! plus further inputs of the same kinds. Messages are read back as the SMTP server
//! received them and parsed with Python's `email` package, an independent reader.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use common::{assert_status, Received, TestEnv, Tenant};
use outbound::outcome::{DeliveryResult, Status};

/// Subject, text body and address fields as Python's `email` package decodes them.
fn python_view(message: &Received) -> serde_json::Value {
    let program = r#"
import email, email.policy, json, sys
m = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
body = m.get_body(("plain", "html"))
print(json.dumps({
    "subject": str(m["Subject"]) if m["Subject"] is not None else None,
    "from": str(m["From"]),
    "to": str(m["To"]),
    "content_type": m.get_content_type(),
    "body": body.get_content().replace("\r\n", "\n") if body is not None else None,
    "defects": [type(d).__name__ for part in m.walk() for d in part.defects],
}))
"#;
    let mut child = Command::new("python3")
        .args(["-c", program])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&message.content).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).expect("python prints JSON")
}

/// Returns the raw lines of one header field, folded as on the wire.
fn raw_field_lines(message: &Received, name: &str) -> Vec<String> {
    let text = message.text();
    let head = text.split("\r\n\r\n").next().unwrap().to_string();
    let mut lines = Vec::new();
    let mut inside = false;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if inside {
                lines.push(line.to_string());
            }
            continue;
        }
        inside = line.to_ascii_lowercase().starts_with(&format!("{}:", name.to_ascii_lowercase()));
        if inside {
            lines.push(line.to_string());
        }
    }
    lines
}

fn assert_crlf_only(bytes: &[u8], what: &str) {
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b'\n' {
            assert!(index > 0, "bare LF at the start of {what}");
            assert_eq!(bytes[index - 1], b'\r', "bare LF at {index} in {what}");
        }
        if *byte == b'\r' {
            assert!(bytes.get(index + 1) == Some(&b'\n'), "bare CR at {index} in {what}");
        }
    }
}

async fn run_case(env: &mut TestEnv, tenant: &Tenant, file: &str) -> (serde_json::Value, DeliveryResult, Option<Received>) {
    let path = common::shared_dir().join("cases").join(file);
    let body = common::shared_request(&path, tenant);
    let result = env.publish_and_wait(&body).await;
    let received = result.message_id.as_ref().and_then(|id| env.received_with_message_id(id).into_iter().next());
    (body, result, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_cases_have_expected_results() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;
    let mut checked = HashMap::new();

    // dkim-multipart: multipart/alternative, signature verifies (check_contract below).
    let (_, result, received) = run_case(&mut env, &tenant, "dkim-multipart.json").await;
    assert_status(&result, Status::Sent, None);
    let view = python_view(received.as_ref().unwrap());
    assert_eq!(view["content_type"], "multipart/alternative");
    assert_eq!(view["body"], "Plain part.\nSecond line.\n");
    checked.insert("dkim-multipart.json", true);

    // long-x-header: folded at whitespace, every line at most 78 octets where a fold point exists.
    let (body, result, received) = run_case(&mut env, &tenant, "long-x-header.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    let lines = raw_field_lines(&message, "X-Ticket-Context");
    assert!(lines.len() > 1, "the long header is folded: {lines:?}");
    for line in &lines {
        let has_fold_point = line.trim_start().contains(' ');
        assert!(line.len() <= 78 || !has_fold_point, "line of {} octets with a fold point: {line}", line.len());
        assert!(line.len() <= 998);
    }
    let unfolded: String = lines.concat();
    assert_eq!(unfolded, format!("X-Ticket-Context: {}", body["headers"]["X-Ticket-Context"].as_str().unwrap()));
    checked.insert("long-x-header.json", true);

    // long-references: folded only between ids, lines within 998 octets.
    let (body, result, received) = run_case(&mut env, &tenant, "long-references.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    let lines = raw_field_lines(&message, "References");
    for line in &lines {
        assert!(line.len() <= 998);
        for token in line.trim_start_matches("References:").split_whitespace() {
            assert!(token.starts_with('<'), "split inside an id: {token}");
            assert!(token.ends_with('>'), "split inside an id: {token}");
            assert!(token.contains('@'), "split inside an id: {token}");
        }
    }
    let sent_ids: Vec<String> = lines.concat().trim_start_matches("References:").split_whitespace().map(str::to_string).collect();
    let requested: Vec<String> = body["references"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(sent_ids.first(), requested.first(), "the first id is kept");
    assert_eq!(sent_ids.last(), requested.last(), "the most recent id is kept");
    assert_eq!(message.header("In-Reply-To").as_deref(), body["in_reply_to"].as_str());
    checked.insert("long-references.json", true);

    // bare-lf-body: CRLF everywhere on the wire, the three lines intact.
    let (_, result, received) = run_case(&mut env, &tenant, "bare-lf-body.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    assert_crlf_only(&message.wire, "the wire data");
    assert_eq!(String::from_utf8(message.body()).unwrap(), "line one\r\nline two\r\nline three\r\n");
    assert_eq!(python_view(&message)["body"], "line one\nline two\nline three\n");
    checked.insert("bare-lf-body.json", true);

    // empty-body: the relaxed body hash of nothing.
    let (_, result, received) = run_case(&mut env, &tenant, "empty-body.json").await;
    assert_status(&result, Status::Sent, None);
    let signature = received.unwrap().header("DKIM-Signature").unwrap();
    let body_hash: String = signature.split("bh=").nth(1).unwrap().split(';').next().unwrap().split_whitespace().collect();
    assert_eq!(body_hash, "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
    checked.insert("empty-body.json", true);

    // empty-subject: the field is present, empty and signed.
    let (_, result, received) = run_case(&mut env, &tenant, "empty-subject.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    assert_eq!(message.header("Subject").as_deref(), Some(""));
    let signed = message.header("DKIM-Signature").unwrap().to_ascii_lowercase().replace([' ', '\t'], "");
    assert!(signed.contains("subject"), "{signed}");
    checked.insert("empty-subject.json", true);

    // subject-encoded-words: decodes to the exact input; each word at most 75 characters.
    let (body, result, received) = run_case(&mut env, &tenant, "subject-encoded-words.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    assert_eq!(python_view(&message)["subject"], body["subject"]);
    let raw_subject = raw_field_lines(&message, "Subject").concat();
    for word in raw_subject.trim_start_matches("Subject:").split_whitespace() {
        assert!(word.len() <= 75, "encoded-word of {} characters: {word}", word.len());
        assert!(word.starts_with("=?"), "{word}");
        assert!(word.ends_with("?="), "{word}");
    }
    checked.insert("subject-encoded-words.json", true);

    // Header injection: invalid, naming the field, and nothing sent.
    let before = env.received().len();
    for (file, field, reasons) in [
        ("header-injection-subject.json", "subject", vec!["header_injection"]),
        ("header-injection-in-reply-to.json", "in_reply_to", vec!["header_injection", "invalid_field"]),
        ("header-injection-display-name.json", "to[0].name", vec!["header_injection"]),
    ] {
        let (_, result, received) = run_case(&mut env, &tenant, file).await;
        assert_eq!(result.status, Status::Invalid, "{file}");
        assert!(reasons.contains(&result.reason.unwrap().as_str()), "{file}: {result:?}");
        assert!(result.detail.contains(field), "{file}: {}", result.detail);
        assert!(received.is_none());
        checked.insert(file, true);
    }
    assert_eq!(env.received().len(), before, "nothing reached the SMTP server");
    assert!(!env.rcpt_replies().iter().any(|(address, _)| address.contains("victim")));

    // dot-stuffing: stuffed on the wire, the stored body equals the input.
    let (body, result, received) = run_case(&mut env, &tenant, "dot-stuffing.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    let input = body["text_body"].as_str().unwrap().replace('\n', "\r\n");
    assert_eq!(String::from_utf8(message.body()).unwrap(), format!("{input}\r\n"));
    let wire = String::from_utf8(message.wire.clone()).unwrap();
    let wire_body = wire.split("\r\n\r\n").skip(1).collect::<Vec<_>>().join("\r\n\r\n");
    for line in wire_body.split("\r\n").filter(|line| !line.is_empty()) {
        if let Some(rest) = line.strip_prefix('.') {
            assert!(rest.starts_with('.'), "an unstuffed dot line went over the wire: {line:?}");
        }
    }
    assert!(wire_body.contains("\r\n...two dots\r\n"), "{wire_body}");
    checked.insert("dot-stuffing.json", true);

    // idn-recipient-domain: IDNA in RCPT TO and in the To field.
    let (_, result, received) = run_case(&mut env, &tenant, "idn-recipient-domain.json").await;
    assert_status(&result, Status::Sent, None);
    let message = received.unwrap();
    assert_eq!(message.rcpt_tos, vec!["user@xn--exmple-cua.org"]);
    assert_eq!(message.header("To").as_deref(), Some("user@xn--exmple-cua.org"));
    checked.insert("idn-recipient-domain.json", true);

    // Every request file in the folder was checked.
    let files: Vec<String> = std::fs::read_dir(common::shared_dir().join("cases"))
        .unwrap()
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.ends_with(".json"))
        .collect();
    for file in files {
        assert!(checked.contains_key(file.as_str()), "no check for {file}");
    }

    env.check_contract();
}

/// More inputs of the same kinds: other scripts and emoji in subjects and names, long
/// lines, lone CR, HTML only, a lone dot line that would end DATA, and attachments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_kinds_of_input_survive() {
    let mut env = TestEnv::with_worker().await;
    let tenant = env.tenant(true).await;

    let long_line = "word ".repeat(400) + &"x".repeat(1500);
    let subjects = [
        "注文 #48213 の配送状況について、詳細をお知らせします。ご確認ください。",
        "Réponse 📦🚚 — livraison «express» = demain ?",
        "   leading and trailing spaces   ",
        "=?UTF-8?B?bm90IGVuY29kZWQ=?= looks encoded but is plain",
        &"a".repeat(120),
    ];
    for subject in subjects {
        let mut body = common::request(&tenant, &["customer@example.net"]);
        body["subject"] = subject.into();
        body["from"]["name"] = "Zoë «Support» 😀".into();
        body["to"][0]["name"] = "Doe, Jamie \"JD\"".into();
        body["text_body"] = format!("first\rsecond\n.\n..\n{long_line}\n").into();
        let result = env.publish_and_wait(&body).await;
        assert_status(&result, Status::Sent, None);
        let message = &env.received_with_message_id(result.message_id.as_ref().unwrap())[0];
        assert_crlf_only(&message.wire, "the wire data");
        for line in message.content.split(|b| *b == b'\n') {
            assert!(line.len() <= 1000, "a line of {} octets", line.len());
        }
        let view = python_view(message);
        assert_eq!(view["subject"], subject, "subject round trip");
        assert_eq!(view["from"], format!("Zoë «Support» 😀 <support@{}>", tenant.domain));
        assert_eq!(view["to"], "\"Doe, Jamie \\\"JD\\\"\" <customer@example.net>");
        let body_text = view["body"].as_str().unwrap();
        let expected = format!("first\nsecond\n.\n..\n{long_line}\n");
        assert_eq!(body_text.len(), expected.len(), "tail: {:?}", &body_text[body_text.len().saturating_sub(40)..]);
        assert_eq!(body_text, expected);
        assert_eq!(view["defects"], serde_json::json!([]));
    }

    let mut html_only = common::request(&tenant, &["customer@example.net"]);
    html_only.as_object_mut().unwrap().remove("text_body");
    html_only["html_body"] = "<p>Bonjour,</p>\n<p>votre colis arrive demain.</p>\n".into();
    html_only["attachments"] = serde_json::json!([
        {"filename": "facture été.pdf", "content_type": "application/pdf", "content_base64": "JVBERi0xLjQKJcfs"}
    ]);
    let result = env.publish_and_wait(&html_only).await;
    assert_status(&result, Status::Sent, None);
    let message = &env.received_with_message_id(result.message_id.as_ref().unwrap())[0];
    assert_eq!(python_view(message)["content_type"], "multipart/mixed");

    env.check_contract();
}
