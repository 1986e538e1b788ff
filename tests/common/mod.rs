//! Test harness: a fresh database, RabbitMQ vhost and SMTP server per test, and the real
//! `outbound worker` binary between them.
//!
//! Helpers wait on the results exchange, never on sleeps: `final_result` returns as soon
//! as the worker publishes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use outbound::configuration::{DatabaseSettings, KeyEncryptionKey, Settings};
use outbound::outcome::{DeliveryResult, Status};
use sqlx::PgPool;
use uuid::Uuid;

pub const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A tenant with a verified sending domain.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub tenant_id: Uuid,
    pub owner: Uuid,
    pub domain: String,
    pub public_key: String,
}

impl Tenant {
    /// Returns a tenant that exists in no database, for requests that never reach a worker.
    pub fn placeholder() -> Tenant {
        Tenant { tenant_id: Uuid::nil(), owner: Uuid::nil(), domain: "placeholder.example".into(), public_key: String::new() }
    }
}

/// One transaction recorded by the SMTP server.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub reply: String,
    pub wire: Vec<u8>,
    pub content: Vec<u8>,
    pub received_at: String,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.content).into_owned()
    }

    /// Returns the unfolded value of the first header field called `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or_default().to_string();
        let mut fields: Vec<String> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.push_str(line);
                }
            } else {
                fields.push(line.to_string());
            }
        }
        fields.iter().find_map(|field| {
            let (field_name, value) = field.split_once(':')?;
            field_name.eq_ignore_ascii_case(name).then(|| value.trim().to_string())
        })
    }

    pub fn body(&self) -> Vec<u8> {
        let at = self.content.windows(4).position(|w| w == b"\r\n\r\n").expect("a header/body separator");
        self.content[at + 4..].to_vec()
    }
}

/// A published result with the routing key it arrived under.
#[derive(Debug, Clone)]
pub struct Published {
    pub routing_key: String,
    pub result: DeliveryResult,
    pub raw: serde_json::Value,
}

pub struct TestEnv {
    pub database: String,
    pub database_url: String,
    pub vhost: String,
    pub amqp_url: String,
    pub pool: PgPool,
    pub settings: Settings,
    pub spool: tempfile::TempDir,
    pub smtp_port: u16,
    smtp_server: Child,
    worker: Option<Child>,
    extra_workers: Vec<Child>,
    pub worker_log: PathBuf,
    connection: Connection,
    pub channel: Channel,
    results: Consumer,
    pub published: Vec<Published>,
    pub public_keys: Vec<String>,
    pub extra_env: Vec<(String, String)>,
    pub metrics_port: u16,
}

fn short_id() -> String {
    Uuid::new_v4().simple().to_string()[..10].to_string()
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Returns the folder with the contract and the hard cases, beside the repository.
pub fn shared_dir() -> PathBuf {
    let beside = project_root().join("../shared");
    assert!(beside.join("contract/CONTRACT.md").exists(), "../shared/contract is missing beside the repository");
    beside
}

impl TestEnv {
    /// Starts everything but the worker: database, vhost, SMTP server, results queue.
    pub async fn start() -> TestEnv {
        let id = short_id();
        let database = format!("outbound_test_{id}");
        let database_url = format!("postgres://postgres@127.0.0.1:5432/{database}");
        let vhost = format!("outbound-test-{id}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let amqp_url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");

        let environment = vec![
            ("OUTBOUND_DATABASE_URL".to_string(), database_url.clone()),
            ("OUTBOUND_AMQP_URL".to_string(), amqp_url.clone()),
            ("OUTBOUND_KEY_ENCRYPTION_KEY".to_string(), KEY_HEX.to_string()),
        ];
        let settings = Settings::load_from(None, &environment, &[]).expect("test settings load");
        let pool = outbound::startup::migrate(&settings).await.expect("migrate");

        let spool = tempfile::tempdir().expect("temporary spool");
        let (smtp_server, smtp_port) = start_smtp_server(spool.path());

        let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await.expect("test AMQP connection");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        let queue = channel
            .queue_declare("", QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
            .await
            .expect("results queue");
        channel
            .queue_bind(queue.name().as_str(), outbound::broker::RESULTS_EXCHANGE, "#", QueueBindOptions::default(), FieldTable::default())
            .await
            .expect("bind results");
        let results = channel
            .basic_consume(queue.name().as_str(), "test-results", BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume results");

        let worker_log = spool.path().join("worker.log");
        TestEnv {
            database,
            database_url,
            vhost,
            amqp_url,
            pool,
            settings,
            spool,
            smtp_port,
            smtp_server,
            worker: None,
            extra_workers: Vec::new(),
            worker_log,
            connection,
            channel,
            results,
            published: Vec::new(),
            public_keys: Vec::new(),
            extra_env: Vec::new(),
            metrics_port: free_port(),
        }
    }

    /// Starts the environment with a worker already running.
    pub async fn with_worker() -> TestEnv {
        let mut env = TestEnv::start().await;
        env.start_worker();
        env
    }

    pub fn worker_command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbound"));
        command
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OUTBOUND_DATABASE_URL", &self.database_url)
            .env("OUTBOUND_AMQP_URL", &self.amqp_url)
            .env("OUTBOUND_SMTP_URL", format!("smtp://127.0.0.1:{}?tls=none", self.smtp_port))
            .env("OUTBOUND_KEY_ENCRYPTION_KEY", KEY_HEX)
            .env("OUTBOUND_METRICS_ADDR", format!("127.0.0.1:{}", self.metrics_port))
            .env("OUTBOUND_RETRY__INITIAL_DELAY", "1s")
            .env("OUTBOUND_RETRY__MAX_DELAY", "2s")
            .env("OUTBOUND_WORKER__POLL_INTERVAL", "200ms")
            .env("OUTBOUND_SMTP__TIMEOUT", "10s")
            .env("RUST_LOG", "outbound=debug,info");
        for (name, value) in &self.extra_env {
            command.env(name, value);
        }
        command
    }

    /// Starts `outbound worker` as a child process, logging to `worker_log`.
    pub fn start_worker(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.worker_log).expect("worker log");
        let child = self
            .worker_command()
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("worker binary starts");
        self.worker = Some(child);
    }

    /// Starts one more worker process on the same database, vhost and SMTP server.
    pub fn start_extra_worker(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.worker_log).expect("worker log");
        let child = self
            .worker_command()
            .env("OUTBOUND_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("worker binary starts");
        self.extra_workers.push(child);
    }

    pub fn worker_pid(&self) -> u32 {
        self.worker.as_ref().expect("worker running").id()
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn terminate_worker(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, Duration) {
        let mut child = self.worker.take().expect("worker running");
        let started = std::time::Instant::now();
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
        loop {
            if let Some(status) = child.try_wait().expect("wait on worker") {
                return (Some(status), started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                return (None, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the worker with SIGKILL, as a crash or an out-of-memory kill would.
    pub fn kill_worker(&mut self) {
        let mut child = self.worker.take().expect("worker running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap the worker");
    }

    pub fn worker_log_text(&self) -> String {
        std::fs::read_to_string(&self.worker_log).unwrap_or_default()
    }

    /// Creates a tenant with a sending domain, marked verified when `verified` is true.
    pub async fn tenant(&mut self, verified: bool) -> Tenant {
        let domain = format!("t{}.example", short_id());
        let created = outbound::store::create_tenant(&self.pool, "Test Store", &format!("owner@{domain}"), "starter").await.expect("tenant");
        let added = outbound::cli::add_domain(&self.settings, created.tenant_id, &domain, created.owner_user_id).await.expect("domain add");
        if verified {
            outbound::store::mark_domain_verified(&self.pool, created.tenant_id, &domain, "test").await.expect("mark verified");
        }
        self.public_keys.push(added.public_key.clone());
        Tenant { tenant_id: created.tenant_id, owner: created.owner_user_id, domain, public_key: added.public_key }
    }

    /// Publishes a raw body to outbound.requests.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        outbound::broker::publish_request(&self.channel, routing_key, body).await.expect("publish");
    }

    pub async fn publish(&self, request: &serde_json::Value) -> Uuid {
        let routing_key = request["tenant_id"].as_str().unwrap_or("unknown");
        self.publish_raw(routing_key, request.to_string().as_bytes()).await;
        request["request_id"].as_str().and_then(|id| id.parse().ok()).unwrap_or_else(Uuid::nil)
    }

    /// Waits for the next published result that matches `wanted`.
    pub async fn next_result(&mut self, wanted: impl Fn(&DeliveryResult) -> bool) -> DeliveryResult {
        let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.results.next()).await;
            let delivery = match next {
                Ok(Some(Ok(delivery))) => delivery,
                other => panic!(
                    "no matching result within {RESULT_TIMEOUT:?} ({other:?}); worker log:\n{}",
                    tail(&self.worker_log_text(), 60)
                ),
            };
            delivery.acker.ack(BasicAckOptions::default()).await.expect("ack result");
            let raw: serde_json::Value = serde_json::from_slice(&delivery.data).expect("result is JSON");
            let result: DeliveryResult = serde_json::from_value(raw.clone()).expect("result deserializes");
            self.published.push(Published { routing_key: delivery.routing_key.to_string(), result: result.clone(), raw });
            if wanted(&result) {
                return result;
            }
        }
    }

    /// Waits for the final (non-duplicate) result of a request.
    pub async fn final_result(&mut self, request_id: Uuid) -> DeliveryResult {
        if let Some(found) = self.published.iter().find(|p| p.result.request_id == Some(request_id) && p.result.is_final && !p.result.duplicate) {
            return found.result.clone();
        }
        self.next_result(|r| r.request_id == Some(request_id) && r.is_final && !r.duplicate).await
    }

    /// Returns every transaction the SMTP server recorded, in order.
    pub fn received(&self) -> Vec<Received> {
        let Ok(text) = std::fs::read_to_string(self.spool.path().join("log.jsonl")) else { return vec![] };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let record: serde_json::Value = serde_json::from_str(line).expect("spool record");
                let decode = |field: &str| base64::engine::general_purpose::STANDARD.decode(record[field].as_str().unwrap_or_default()).expect("base64");
                Received {
                    mail_from: record["mail_from"].as_str().unwrap_or_default().to_string(),
                    rcpt_tos: record["rcpt_tos"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default(),
                    reply: record["reply"].as_str().unwrap_or_default().to_string(),
                    wire: decode("wire_b64"),
                    content: decode("content_b64"),
                    received_at: record["received_at"].as_str().unwrap_or_default().to_string(),
                }
            })
            .collect()
    }

    /// Returns the RCPT replies the SMTP server sent, as (address, code).
    pub fn rcpt_replies(&self) -> Vec<(String, u16)> {
        let Ok(text) = std::fs::read_to_string(self.spool.path().join("rcpt.jsonl")) else { return vec![] };
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|v| (v["address"].as_str().unwrap_or_default().to_string(), v["code"].as_u64().unwrap_or_default() as u16))
            .collect()
    }

    /// Transactions for a message id.
    pub fn received_with_message_id(&self, message_id: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.header("Message-ID").as_deref() == Some(message_id)).collect()
    }

    /// Checks what every test must hold at its end: each published result validates against
    /// the contract's schema and carries the contract's routing key, and every message the
    /// SMTP server accepted verifies with dkimpy.
    pub fn check_contract(&self) {
        assert!(!self.published.is_empty(), "the test saw no result");
        for published in &self.published {
            assert_eq!(published.routing_key, published.result.routing_key(), "routing key of {:?}", published.result);
            let expected_key = format!(
                "{}.{}",
                published.raw["status"].as_str().unwrap(),
                published.raw["tenant_id"].as_str().unwrap_or("unknown")
            );
            assert_eq!(published.routing_key, expected_key);
        }
        validate_results(&self.published.iter().map(|p| p.raw.clone()).collect::<Vec<_>>());

        let messages: Vec<String> = self
            .received()
            .iter()
            .filter(|r| r.reply.starts_with("250"))
            .map(|r| base64::engine::general_purpose::STANDARD.encode(&r.content))
            .collect();
        if !messages.is_empty() {
            verify_dkim(&messages, &self.public_keys);
        }
    }

    pub async fn publish_and_wait(&mut self, request: &serde_json::Value) -> DeliveryResult {
        let request_id = self.publish(request).await;
        self.final_result(request_id).await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for mut worker in self.worker.take().into_iter().chain(self.extra_workers.drain(..)) {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        let _ = self.smtp_server.kill();
        let _ = self.smtp_server.wait();
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.vhost]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn start_smtp_server(spool: &Path) -> (Child, u16) {
    let script = project_root().join("tests/support/smtp_server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--port", "0", "--spool"])
        .arg(spool)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(spool.join("smtp_server.log")).expect("smtp log"))
        .spawn()
        .expect("python3 runs the SMTP server");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("READY line");
    let port = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("SMTP server did not start: {line:?}; is aiosmtpd installed (pip install -r tests/support/requirements.txt)?"));
    (child, port)
}

/// Sends `GET path` to the worker's metrics listener; returns the status code and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener accepts");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (status, body)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Validates results against the contract's JSON schema with Python's jsonschema.
pub fn validate_results(results: &[serde_json::Value]) {
    let schema = shared_dir().join("contract/schemas/delivery-result.v1.json");
    let program = r#"
import json, sys
from jsonschema import Draft202012Validator, FormatChecker
schema = json.load(open(sys.argv[1]))
validator = Draft202012Validator(schema, format_checker=FormatChecker())
failed = 0
for index, result in enumerate(json.load(sys.stdin)):
    for error in validator.iter_errors(result):
        failed += 1
        print(f"result {index}: {error.json_path}: {error.message}")
sys.exit(1 if failed else 0)
"#;
    let output = run_python(&[program, schema.to_str().unwrap()], serde_json::to_vec(results).unwrap());
    assert!(output.status.success(), "results do not match the schema:\n{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
}

/// Verifies every DKIM signature of each base64 message with dkimpy.
pub fn verify_dkim(messages_base64: &[String], public_keys: &[String]) {
    let script = project_root().join("tests/support/dkim_verify.py");
    let mut command = Command::new("python3");
    command.arg(script).arg("--json-stdin");
    for key in public_keys {
        command.args(["--public-key", key]);
    }
    let output = pipe(command, serde_json::to_vec(messages_base64).unwrap());
    assert!(output.status.success(), "DKIM verification failed:\n{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let verified = String::from_utf8_lossy(&output.stdout).lines().filter(|line| line.contains("\"error\": null")).count();
    assert_eq!(verified, messages_base64.len(), "{}", String::from_utf8_lossy(&output.stdout));
}

fn run_python(args: &[&str], stdin: Vec<u8>) -> std::process::Output {
    let mut command = Command::new("python3");
    command.arg("-c").args(args);
    pipe(command, stdin)
}

fn pipe(mut command: Command, stdin: Vec<u8>) -> std::process::Output {
    use std::io::Write;
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("python3 runs");
    child.stdin.take().unwrap().write_all(&stdin).unwrap();
    child.wait_with_output().expect("python3 finishes")
}

/// Builds a send request from `tenant` to the given recipients.
pub fn request(tenant: &Tenant, recipients: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "schema": "outbound.send_request.v1",
        "request_id": Uuid::new_v4(),
        "tenant_id": tenant.tenant_id,
        "origin": "agent",
        "conversation_id": format!("conv-{}", short_id()),
        "from": {"address": format!("support@{}", tenant.domain), "name": "Your Store Support"},
        "to": recipients.iter().map(|r| serde_json::json!({"address": r})).collect::<Vec<_>>(),
        "subject": "Re: your order",
        "text_body": "Hello,\nyour order is on its way.\n",
        "metadata": {"ticket": "48213"}
    })
}

/// Loads a request from ../shared with this test's tenant, domain and a fresh request id.
pub fn shared_request(path: &Path, tenant: &Tenant) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("shared request");
    let text = text.replace("7d2b9c44-1f3e-4a8b-b6d1-0c9e5f4a2b73", &tenant.tenant_id.to_string()).replace("yourstore.example", &tenant.domain);
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("shared request is JSON");
    value["request_id"] = Uuid::new_v4().to_string().into();
    value
}

/// Counts distinct final, non-duplicate result events per request. A result published
/// again with the same `event_id` counts once, because consumers deduplicate by it.
pub fn final_counts(published: &[Published]) -> HashMap<Uuid, usize> {
    let mut seen = std::collections::HashSet::new();
    let mut counts = HashMap::new();
    for p in published.iter().filter(|p| p.result.is_final && !p.result.duplicate) {
        if !seen.insert(p.result.event_id) {
            continue;
        }
        if let Some(id) = p.result.request_id {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

pub fn assert_status(result: &DeliveryResult, status: Status, reason: Option<&str>) {
    assert_eq!(result.status, status, "{result:#?}");
    assert_eq!(result.reason.map(|r| r.as_str()), reason, "{result:#?}");
}

pub fn key_bytes() -> KeyEncryptionKey {
    KeyEncryptionKey(std::array::from_fn(|i| i as u8))
}

pub fn database_settings(url: &str) -> DatabaseSettings {
    DatabaseSettings { url: url.to_string(), max_connections: 2 }
}

/// An authoritative DNS server on loopback (`tests/support/dns_server.py`) that answers from
/// a zone file. The server rereads the file on every query, so tests change records while
/// it runs.
pub struct DnsServer {
    pub port: u16,
    process: Child,
    zone_file: PathBuf,
    records: Vec<serde_json::Value>,
}

impl DnsServer {
    pub fn start(dir: &Path) -> DnsServer {
        let zone_file = dir.join("zone.json");
        std::fs::write(&zone_file, r#"{"records": []}"#).expect("write zone file");
        let mut process = Command::new("python3")
            .arg(project_root().join("tests/support/dns_server.py"))
            .arg("--zone-file")
            .arg(&zone_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the DNS server");
        let mut line = String::new();
        BufReader::new(process.stdout.take().expect("stdout piped")).read_line(&mut line).expect("DNS server prints its port");
        let port = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|started| started["port"].as_u64())
            .unwrap_or_else(|| panic!("DNS server did not start: {line:?}; is dnslib installed (pip install -r tests/support/requirements.txt)?"));
        // The platform's own SPF include, published as in production.
        let platform = serde_json::json!({"name": "_spf.outbound.example", "type": "TXT", "value": ["v=spf1 ip4:127.0.0.1 -all"]});
        let server = DnsServer { port: port as u16, process, zone_file, records: vec![platform] };
        server.write();
        server
    }

    /// `IP:PORT`, as `OUTBOUND_DNS_SERVERS` takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Adds a TXT record made of `strings` (each one character-string).
    pub fn add_txt(&mut self, name: &str, strings: &[&str]) {
        self.records.push(serde_json::json!({"name": name, "type": "TXT", "value": strings}));
        self.write();
    }

    /// Removes every record at `name`.
    pub fn remove(&mut self, name: &str) {
        self.records.retain(|record| !record["name"].as_str().unwrap_or_default().eq_ignore_ascii_case(name));
        self.write();
    }

    /// Replaces the TXT records at `name` with one record of `strings`.
    pub fn set_txt(&mut self, name: &str, strings: &[&str]) {
        self.remove(name);
        self.add_txt(name, strings);
    }

    /// Publishes records as `domain add` printed them: each quoted string stays one
    /// character-string, so a split DKIM record arrives split.
    pub fn publish(&mut self, records: &[serde_json::Value]) {
        for record in records {
            let name = record["name"].as_str().expect("record name");
            let strings = quoted_strings(record["value"].as_str().expect("record value"));
            let strings: Vec<&str> = strings.iter().map(String::as_str).collect();
            self.set_txt(name, &strings);
        }
    }

    fn write(&self) {
        let temporary = self.zone_file.with_extension("tmp");
        std::fs::write(&temporary, serde_json::json!({"records": self.records}).to_string()).expect("write zone");
        std::fs::rename(&temporary, &self.zone_file).expect("replace zone");
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Splits `"a" "b"` into its strings.
pub fn quoted_strings(value: &str) -> Vec<String> {
    value.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

/// Verifies each base64 message's DKIM signatures with dkimpy, looking each key up in the
/// DNS server as a receiver would. Returns dkimpy's report per message: `verified` (one
/// flag per signature) and `signers` (`d`, `s`, `a` of each).
pub fn verify_dkim_by_dns(messages_base64: &[String], dns: &DnsServer) -> Vec<serde_json::Value> {
    let script = project_root().join("tests/support/dkim_verify.py");
    let mut command = Command::new("python3");
    command.arg(script).arg("--json-stdin").args(["--dns", &dns.address()]);
    let output = pipe(command, serde_json::to_vec(messages_base64).unwrap());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect()
}

impl TestEnv {
    /// Runs an `outbound` command against this environment, with `dns` as the resolver.
    pub fn cli(&self, args: &[&str], dns: Option<&DnsServer>) -> std::process::Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbound"));
        command
            .args(args)
            .env("OUTBOUND_DATABASE_URL", &self.database_url)
            .env("OUTBOUND_AMQP_URL", &self.amqp_url)
            .env("OUTBOUND_KEY_ENCRYPTION_KEY", KEY_HEX)
            .env("RUST_LOG", "warn");
        if let Some(dns) = dns {
            command.env("OUTBOUND_DNS_SERVERS", dns.address());
        }
        command.output().expect("the binary runs")
    }
}
