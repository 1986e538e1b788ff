//! The administrative commands, run as an operator would run them.

mod common;

use std::process::{Command, Output};

use common::{TestEnv, Tenant};
use outbound::outcome::Status;

fn outbound(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbound"))
        .args(args)
        .env("OUTBOUND_DATABASE_URL", &env.database_url)
        .env("OUTBOUND_AMQP_URL", &env.amqp_url)
        .env("OUTBOUND_KEY_ENCRYPTION_KEY", common::KEY_HEX)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_flow_from_tenant_to_delivery_log() {
    let mut env = TestEnv::with_worker().await;
    let domain = format!("cli{}.example", &uuid::Uuid::new_v4().simple().to_string()[..8]);

    let created = stdout_json(&outbound(&env, &["tenant", "create", "--name", "CLI Store", "--owner-email", "owner@cli.example", "--json"]));
    let tenant = created["tenant_id"].as_str().unwrap().to_string();
    let owner = created["owner_user_id"].as_str().unwrap().to_string();

    let admin = stdout_json(&outbound(&env, &["tenant", "member", "add", "--tenant", &tenant, "--email", "admin@cli.example", "--role", "admin", "--actor", &owner, "--json"]));
    let admin = admin["user_id"].as_str().unwrap().to_string();

    // Only the owner may add a domain: exit 3, the contract's sentence, and no row.
    let denied = outbound(&env, &["domain", "add", "--tenant", &tenant, "--domain", &domain, "--actor", &admin]);
    assert_eq!(denied.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("permission denied: only the tenant owner can change outbound email settings"));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sending_domains").fetch_one(&env.pool).await.unwrap();
    assert_eq!(rows, 0);

    let added = stdout_json(&outbound(&env, &["domain", "add", "--tenant", &tenant, "--domain", &domain, "--actor", &owner, "--json"]));
    assert_eq!(added["domain"], domain.as_str());
    let records = added["records"].as_array().unwrap();
    let dkim = records.iter().find(|r| r["name"].as_str().unwrap().contains("._domainkey.")).expect("a DKIM record");
    assert_eq!(dkim["type"], "TXT");
    assert_eq!(dkim["required"], true);
    let value = dkim["value"].as_str().unwrap();
    for piece in value.split("\" \"") {
        assert!(piece.trim_matches('"').len() <= 255, "a DKIM string over 255 octets");
    }
    let public_key = added["public_key"].as_str().unwrap().to_string();
    assert!(value.replace("\" \"", "").contains(&public_key));
    for purpose in ["_outbound-verification.", "_dmarc."] {
        assert!(records.iter().any(|r| r["name"].as_str().unwrap().starts_with(purpose)), "{purpose}");
    }
    assert!(records.iter().any(|r| r["value"].as_str().unwrap().contains("include:_spf.outbound.example")));
    let stored_key: Vec<u8> = sqlx::query_scalar("SELECT private_key FROM dkim_keys").fetch_one(&env.pool).await.unwrap();
    assert!(!String::from_utf8_lossy(&stored_key).contains("PRIVATE KEY"), "the private key is stored encrypted");

    let marked = outbound(&env, &["domain", "mark-verified", "--tenant", &tenant, "--domain", &domain, "--reason", "DNS checked by hand"]);
    assert!(marked.status.success(), "{}", String::from_utf8_lossy(&marked.stderr));
    let audit: (String, String) = sqlx::query_as("SELECT action, reason FROM audit_log WHERE action = 'domain.mark_verified'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(audit, ("domain.mark_verified".to_string(), "DNS checked by hand".to_string()));

    // `outbound send` publishes a file; the worker sends it.
    let file = env.spool.path().join("request.json");
    let request_id = uuid::Uuid::new_v4();
    let body = serde_json::json!({
        "schema": "outbound.send_request.v1",
        "request_id": request_id,
        "tenant_id": tenant,
        "origin": "agent",
        "conversation_id": "conv-cli",
        "from": {"address": format!("support@{domain}")},
        "to": [{"address": "jamie@customer.example"}],
        "subject": "Sent from a file",
        "text_body": "Hello from outbound send.\n"
    });
    std::fs::write(&file, body.to_string()).unwrap();
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let sent = outbound(&env, &["send", file.to_str().unwrap()]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    env.public_keys.push(public_key);
    let result = env.final_result(request_id).await;
    assert_eq!(result.status, Status::Sent, "{result:?}");

    // Support finds it from a recipient and a time.
    let since = before.to_rfc3339();
    let log = stdout_json(&outbound(&env, &["deliveries", "--tenant", &tenant, "--recipient", "jamie@customer.example", "--since", &since, "--json"]));
    let entries = log.as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["request_id"], request_id.to_string());
    assert_eq!(entries[0]["status"], "sent");
    assert_eq!(entries[0]["message_id"], result.message_id.clone().unwrap());
    let none = stdout_json(&outbound(&env, &["deliveries", "--tenant", &tenant, "--recipient", "other@customer.example", "--json"]));
    assert_eq!(none.as_array().unwrap().len(), 0);
    let text = outbound(&env, &["deliveries", "--tenant", &tenant]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&request_id.to_string()));

    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_two_with_the_fix() {
    let env = TestEnv::start().await;
    let plan = outbound(&env, &["tenant", "create", "--name", "X", "--owner-email", "o@x.example", "--plan", "gold"]);
    assert_eq!(plan.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&plan.stderr).contains("starter, growth or enterprise"));

    let email = outbound(&env, &["tenant", "create", "--name", "X", "--owner-email", "not-an-address"]);
    assert_eq!(email.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&email.stderr).contains("--owner-email"));

    let unknown_tenant = outbound(&env, &["domain", "mark-verified", "--tenant", &uuid::Uuid::new_v4().to_string(), "--domain", "nowhere.example", "--reason", "x"]);
    assert_eq!(unknown_tenant.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown_tenant.stderr).contains("not found"), "{}", String::from_utf8_lossy(&unknown_tenant.stderr));

    let tenant = outbound::store::create_tenant(&env.pool, "X", "o@x.example", "starter").await.unwrap();
    let unknown_domain = outbound(&env, &["domain", "mark-verified", "--tenant", &tenant.tenant_id.to_string(), "--domain", "nowhere.example", "--reason", "x"]);
    assert_eq!(unknown_domain.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown_domain.stderr).contains("outbound domain add"));

    let missing_file = outbound(&env, &["send", "/nonexistent/request.json"]);
    assert_eq!(missing_file.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing_file.stderr).contains("/nonexistent/request.json"));

    let usage = outbound(&env, &["deliveries", "--since", "yesterday"]);
    assert_eq!(usage.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_validates_before_publishing() {
    let mut env = TestEnv::start().await;
    let tenant = env.tenant(true).await;
    let mut body = common::request(&tenant, &["customer@example.net"]);
    body["subject"] = "Hello\r\nBcc: everyone@victim.example".into();
    let file = env.spool.path().join("bad.json");
    std::fs::write(&file, body.to_string()).unwrap();

    let refused = outbound(&env, &["send", file.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("header_injection"), "{stderr}");
    assert!(stderr.contains("subject"), "{stderr}");
    assert!(stderr.contains("Nothing was published"), "{stderr}");

    let forced = outbound(&env, &["send", "--no-validate", file.to_str().unwrap()]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    env.start_worker();
    let request_id: uuid::Uuid = body["request_id"].as_str().unwrap().parse().unwrap();
    let result = env.final_result(request_id).await;
    assert_eq!(result.status, Status::Invalid);
    let published_ids: Vec<_> = env.published.iter().filter_map(|p| p.result.request_id).collect();
    assert_eq!(published_ids, vec![request_id], "only the forced copy was published");
    env.check_contract();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_named_quickly() {
    let env = TestEnv::start().await;
    let port = common::free_port();

    let started = std::time::Instant::now();
    let database = Command::new(env!("CARGO_BIN_EXE_outbound"))
        .args(["deliveries"])
        .env("OUTBOUND_DATABASE_URL", format!("postgres://postgres@127.0.0.1:{port}/outbound"))
        .output()
        .unwrap();
    assert_eq!(database.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&database.stderr);
    assert!(stderr.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}/outbound")), "{stderr}");
    assert!(stderr.contains("OUTBOUND_DATABASE_URL"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "a command fails fast: {:?}", started.elapsed());

    let file = env.spool.path().join("request.json");
    std::fs::write(&file, common::request(&Tenant::placeholder(), &["a@example.net"]).to_string()).unwrap();
    let broker = Command::new(env!("CARGO_BIN_EXE_outbound"))
        .args(["send", file.to_str().unwrap()])
        .env("OUTBOUND_AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        .output()
        .unwrap();
    assert_eq!(broker.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&broker.stderr);
    assert!(stderr.contains("cannot connect to RabbitMQ"), "{stderr}");
    assert!(stderr.contains("OUTBOUND_AMQP_URL"), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "the password is redacted: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stops_while_waiting_for_database() {
    let mut env = TestEnv::start().await;
    env.extra_env = vec![("OUTBOUND_DATABASE_URL".into(), format!("postgres://postgres@127.0.0.1:{}/outbound", common::free_port()))];
    env.start_worker();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !env.worker_log_text().contains("database connection failed, retrying") {
        assert!(std::time::Instant::now() < deadline, "{}", env.worker_log_text());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (status, took) = env.terminate_worker(std::time::Duration::from_secs(10));

    let status = status.expect("the worker stops during its start-up retries");
    assert!(status.success(), "{status:?}");
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_only_commands_reject_others() {
    let mut env = TestEnv::start().await;
    let tenant = env.tenant(true).await;
    let owner = tenant.owner.to_string();
    let tenant_id = tenant.tenant_id.to_string();
    let add = |email: &str, role: &str| outbound(&env, &["tenant", "member", "add", "--tenant", &tenant_id, "--email", email, "--role", role, "--actor", &owner, "--json"]);
    let admin = stdout_json(&add("admin@shop.example", "admin"))["user_id"].as_str().unwrap().to_string();
    let agent = stdout_json(&add("agent@shop.example", "agent"))["user_id"].as_str().unwrap().to_string();
    let automation = stdout_json(&outbound(&env, &["automation", "create", "--tenant", &tenant_id, "--name", "Bot", "--actor", &owner, "--json"]));
    let automation = automation["automation_id"].as_str().unwrap().to_string();

    let audit_count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log").fetch_one(&env.pool).await.unwrap()
    };
    let before = audit_count().await;
    for actor in [&admin, &agent] {
        let attempts: Vec<Vec<&str>> = vec![
            vec!["settings", "set", "--tenant", &tenant_id, "--actor", actor, "outbound_enabled=false"],
            vec!["automation", "create", "--tenant", &tenant_id, "--name", "Other", "--actor", actor],
            vec!["automation", "set", "--tenant", &tenant_id, "--automation", &automation, "--actor", actor, "mode=live"],
            vec!["tenant", "member", "add", "--tenant", &tenant_id, "--email", "new@shop.example", "--role", "agent", "--actor", actor],
            vec!["domain", "add", "--tenant", &tenant_id, "--domain", "other-shop.example", "--actor", actor],
        ];
        for args in attempts {
            let output = outbound(&env, &args);
            assert_eq!(output.status.code(), Some(3), "{args:?}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains("permission denied: only the tenant owner can change outbound email settings"), "{args:?}: {stderr}");
        }
    }
    assert_eq!(audit_count().await, before, "refused changes leave no audit entry");
    let enabled: bool = sqlx::query_scalar("SELECT outbound_enabled FROM tenants WHERE id = $1").bind(tenant.tenant_id).fetch_one(&env.pool).await.unwrap();
    assert!(enabled);
    let automations: i64 = sqlx::query_scalar("SELECT count(*) FROM automations").fetch_one(&env.pool).await.unwrap();
    assert_eq!(automations, 1);
    let mode: String = sqlx::query_scalar("SELECT mode FROM automations").fetch_one(&env.pool).await.unwrap();
    assert_eq!(mode, "shadow");

    // The owner succeeds, and `settings show` lists the audited change.
    let changed = outbound(&env, &["settings", "set", "--tenant", &tenant_id, "--actor", &owner, "outbound_enabled=false", "plan=growth"]);
    assert!(changed.status.success(), "{}", String::from_utf8_lossy(&changed.stderr));
    let shown = stdout_json(&outbound(&env, &["settings", "show", "--tenant", &tenant_id, "--json"]));
    assert_eq!(shown["outbound_enabled"], false);
    assert_eq!(shown["plan"], "growth");
    let latest = &shown["recent_changes"][0];
    assert_eq!(latest["actor"], owner.as_str());
    assert_eq!(latest["action"], "settings.set");
    assert_eq!(latest["subject"], "plan");
    assert_eq!(latest["old"], "starter");
    assert_eq!(latest["new"], "growth");

    let invalid = outbound(&env, &["settings", "set", "--tenant", &tenant_id, "--actor", &owner, "outbound_enabled=maybe", "colour=blue"]);
    assert_eq!(invalid.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert!(stderr.contains("outbound_enabled=maybe"), "{stderr}");
    assert!(stderr.contains("colour=blue"), "{stderr}");

    let killed = outbound(&env, &["platform", "kill-switch", "on", "--reason", "incident 42"]);
    assert!(killed.status.success());
    let switch: bool = sqlx::query_scalar("SELECT kill_switch FROM platform_settings").fetch_one(&env.pool).await.unwrap();
    assert!(switch);
}
