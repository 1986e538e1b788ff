#!/usr/bin/env bash
# Check smtp_server.py and dkim_verify.py against Python's smtplib, dkimpy and openssl.
#
# Usage: tests/support/selftest.sh
# Needs python3 with tests/support/requirements.txt installed and the openssl CLI.
# Prints "selftest passed" and exits 0, or names the failed check and exits 1.
set -euo pipefail

support_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work_dir="$(mktemp -d)"
server_pid=""

cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    rm -rf "$work_dir"
}
trap cleanup EXIT

fail() {
    echo "selftest FAILED: $*" >&2
    if [[ -f "$work_dir/server.err" ]]; then
        echo "--- smtp_server.py stderr ---" >&2
        cat "$work_dir/server.err" >&2
    fi
    exit 1
}

command -v openssl >/dev/null || fail "openssl CLI not found in PATH"

# --- Start the SMTP server and wait for its READY line ---

python3 "$support_dir/smtp_server.py" --port 0 --spool "$work_dir/spool" \
    >"$work_dir/server.out" 2>"$work_dir/server.err" &
server_pid=$!

port=""
for _ in $(seq 100); do
    if read -r word value <"$work_dir/server.out" 2>/dev/null && [[ "$word" == READY ]]; then
        port="$value"
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || fail "smtp_server.py exited before printing READY"
    sleep 0.1
done
[[ -n "$port" ]] || fail "smtp_server.py printed no READY line within 10 seconds"
[[ "$(wc -l <"$work_dir/server.out")" -eq 1 ]] || fail "stdout has more than the READY line"
echo "smtp_server.py listening on port $port"

# --- SMTP scenarios, checked against the replies and the spool ---

python3 - "$port" "$work_dir/spool" <<'PYTHON' || fail "SMTP scenarios"
import base64
import json
import smtplib
import sys
import threading
import time
from pathlib import Path

import jsonschema

port = int(sys.argv[1])
spool = Path(sys.argv[2])

RECORD_SCHEMA = {
    "type": "object",
    "required": ["seq", "received_at", "mail_from", "rcpt_tos", "mail_options",
                 "rcpt_options", "reply", "wire_b64", "content_b64"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "received_at": {
            "type": "string",
            "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$",
        },
        "mail_from": {"type": "string"},
        "rcpt_tos": {"type": "array", "items": {"type": "string"}},
        "mail_options": {"type": "array", "items": {"type": "string"}},
        "rcpt_options": {"type": "array", "items": {"type": "string"}},
        "reply": {"type": "string", "pattern": r"^\d{3} "},
        "wire_b64": {"type": "string"},
        "content_b64": {"type": "string"},
    },
}


def check(condition, message):
    if not condition:
        raise SystemExit(f"check failed: {message}")


def connect():
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("selftest.example")
    return client


def record(seq):
    path = spool / f"{seq:06d}.json"
    check(path.exists(), f"{path.name} missing")
    value = json.loads(path.read_text())
    jsonschema.validate(value, RECORD_SCHEMA)
    check(value["seq"] == seq, f"{path.name} has seq {value['seq']}")
    return value


def message(subject, body):
    return (
        b"From: Support <support@example.com>\r\n"
        b"To: customer@example.org\r\n"
        b"Subject: " + subject + b"\r\n"
        b"\r\n" + body
    )


# EHLO extensions.
client = connect()
for extension in ("smtputf8", "8bitmime", "size"):
    check(client.has_extn(extension), f"EHLO does not advertise {extension}")
for extension in ("auth", "starttls"):
    check(not client.has_extn(extension), f"EHLO advertises {extension}")
check(int(client.esmtp_features["size"]) >= 40 * 1024 * 1024, "SIZE below 40 MiB")

# (a) Dot-stuffing: the wire copy doubles leading dots, the content copy does not.
dotted = message(b"dots", b".leading dot\r\nplain line\r\n..two dots\r\n.\r\nend\r\n")
refused = client.sendmail("sender@example.com", ["user@xn--bcher-kva.example"], dotted,
                          mail_options=["SMTPUTF8", "BODY=8BITMIME"])
check(refused == {}, f"(a) recipients refused: {refused}")
client.quit()

first = record(1)
wire = base64.b64decode(first["wire_b64"])
content = base64.b64decode(first["content_b64"])
check(content == dotted, f"(a) content differs from the sent message: {content!r}")
expected_wire = dotted.replace(b"\r\n.", b"\r\n..")
check(wire == expected_wire, f"(a) wire is {wire!r}, expected {expected_wire!r}")
for stuffed_line in (b"\r\n..leading dot\r\n", b"\r\n...two dots\r\n", b"\r\n..\r\n"):
    check(stuffed_line in wire, f"(a) wire lacks the stuffed line {stuffed_line!r}")
check(all(line.endswith(b"\r\n") for line in wire.splitlines(keepends=True)),
      "(a) a wire line does not end in CRLF")
check(first["rcpt_tos"] == ["user@xn--bcher-kva.example"], f"(a) rcpt_tos {first['rcpt_tos']}")
check(first["mail_from"] == "sender@example.com", f"(a) mail_from {first['mail_from']}")
check("SMTPUTF8" in first["mail_options"], f"(a) mail_options {first['mail_options']}")
check(first["reply"] == "250 OK", f"(a) reply {first['reply']}")

# A message that starts with a dot on its very first line.
client = connect()
leading = b".first line\r\nSubject: x\r\n\r\nbody\r\n"
client.sendmail("sender@example.com", ["user@example.com"], leading)
client.quit()
second = record(2)
check(base64.b64decode(second["wire_b64"]) == b"." + leading, "first-line dot not stuffed")
check(base64.b64decode(second["content_b64"]) == leading, "first-line dot not unstuffed")

# (b) tempfail- returns 450 once and tempfail3- three times, then both return 250.
for attempt, tempfail_count in (("tempfail-once@example.com", 1),
                                ("TempFail3-thrice@example.com", 3)):
    for i in range(tempfail_count):
        client = connect()
        try:
            client.sendmail("sender@example.com", [attempt], message(b"tempfail", b"x\r\n"))
        except smtplib.SMTPRecipientsRefused as error:
            code, reply = error.recipients[attempt]
            check(code == 450, f"(b) {attempt} attempt {i + 1} got {code}")
            check(reply == b"4.2.1 Mailbox busy, try again later", f"(b) reply {reply!r}")
        else:
            raise SystemExit(f"check failed: (b) {attempt} attempt {i + 1} was accepted")
        client.quit()
    client = connect()
    refused = client.sendmail("sender@example.com", [attempt], message(b"tempfail", b"x\r\n"))
    check(refused == {}, f"(b) {attempt} refused after {tempfail_count} tempfails: {refused}")
    client.quit()
check(record(3)["rcpt_tos"] == ["tempfail-once@example.com"], "(b) record 3")
check(record(4)["rcpt_tos"] == ["TempFail3-thrice@example.com"], "(b) record 4")

# (c) One accepted and one rejected recipient in one transaction.
client = connect()
refused = client.sendmail("sender@example.com",
                          ["ok@example.com", "reject-nobody@example.com"],
                          message(b"mixed", b"x\r\n"))
client.quit()
check(set(refused) == {"reject-nobody@example.com"}, f"(c) refused {refused}")
check(refused["reject-nobody@example.com"][0] == 550, f"(c) code {refused}")
mixed = record(5)
check(mixed["rcpt_tos"] == ["ok@example.com"], f"(c) rcpt_tos {mixed['rcpt_tos']}")
check(mixed["reply"] == "250 OK", f"(c) reply {mixed['reply']}")

# (d) datareject- gets 554 after DATA, and the transaction is still recorded.
client = connect()
try:
    client.sendmail("sender@example.com", ["ok@example.com", "datareject-x@example.com"],
                    message(b"spam", b"x\r\n"))
except smtplib.SMTPDataError as error:
    check(error.smtp_code == 554, f"(d) code {error.smtp_code}")
else:
    raise SystemExit("check failed: (d) datareject- message was accepted")
client.quit()
rejected = record(6)
check(rejected["reply"] == "554 5.7.1 Message rejected as spam", f"(d) reply {rejected['reply']}")
check(rejected["rcpt_tos"] == ["ok@example.com", "datareject-x@example.com"], "(d) rcpt_tos")

# slow- delays its own reply by 3 seconds without delaying other sessions.
slow_result = {}


def send_slow():
    started = time.monotonic()
    slow_client = connect()
    slow_client.sendmail("sender@example.com", ["slow-x@example.com"], message(b"slow", b"x\r\n"))
    slow_result["seconds"] = time.monotonic() - started
    slow_client.quit()


slow_thread = threading.Thread(target=send_slow)
slow_thread.start()
time.sleep(0.5)
started = time.monotonic()
client = connect()
client.sendmail("sender@example.com", ["fast@example.com"], message(b"fast", b"x\r\n"))
client.quit()
fast_seconds = time.monotonic() - started
slow_thread.join()
check(slow_result.get("seconds", 0) >= 3.0, f"slow- took {slow_result.get('seconds')} s")
check(fast_seconds < 2.0, f"a session during slow- took {fast_seconds:.1f} s")
check(record(7)["rcpt_tos"] == ["fast@example.com"], "record 7 is not the fast message")
check(record(8)["rcpt_tos"] == ["slow-x@example.com"], "record 8 is not the slow message")

# log.jsonl repeats the record files in order, and rcpt.jsonl lists every RCPT reply.
log_records = [json.loads(line) for line in (spool / "log.jsonl").read_text().splitlines()]
check([entry["seq"] for entry in log_records] == list(range(1, 9)), "log.jsonl seq order")
check(log_records == [record(seq) for seq in range(1, 9)], "log.jsonl differs from files")
check(not list(spool.glob(".*.tmp")), "temporary files left in the spool")

rcpt_lines = [json.loads(line) for line in (spool / "rcpt.jsonl").read_text().splitlines()]
codes = [(entry["address"], entry["code"]) for entry in rcpt_lines]
expected_codes = [
    ("user@xn--bcher-kva.example", 250),
    ("user@example.com", 250),
    ("tempfail-once@example.com", 450),
    ("tempfail-once@example.com", 250),
    ("TempFail3-thrice@example.com", 450),
    ("TempFail3-thrice@example.com", 450),
    ("TempFail3-thrice@example.com", 450),
    ("TempFail3-thrice@example.com", 250),
    ("ok@example.com", 250),
    ("reject-nobody@example.com", 550),
    ("ok@example.com", 250),
    ("datareject-x@example.com", 250),
    ("slow-x@example.com", 250),
    ("fast@example.com", 250),
]
check(codes == expected_codes, f"rcpt.jsonl lists {codes}")
print("SMTP scenarios passed")
PYTHON

# --- DKIM: sign with dkimpy, verify with dkim_verify.py ---

# dkimpy 1.1 reads only PKCS#1 RSA private keys, which OpenSSL 3 writes with -traditional.
openssl genrsa -traditional -out "$work_dir/rsa.pem" 2048 2>/dev/null \
    || fail "openssl genrsa failed"
rsa_public="$(openssl rsa -in "$work_dir/rsa.pem" -pubout -outform DER 2>/dev/null | base64 -w0)"
[[ -n "$rsa_public" ]] || fail "openssl rsa -pubout failed"

python3 - "$work_dir" "$port" <<'PYTHON' || fail "DKIM signing"
import base64
import json
import smtplib
import sys
import time
from pathlib import Path

import dkim
import nacl.signing

work_dir = Path(sys.argv[1])
port = int(sys.argv[2])

message = (
    b"From: Support <support@example.com>\r\n"
    b"To: customer@example.org\r\n"
    b"Subject: Your ticket\r\n"
    b"Message-ID: <selftest@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".a line that SMTP dot-stuffs\r\n"
    b"Regards\r\n"
)
rsa_private = (work_dir / "rsa.pem").read_bytes()
relaxed = (b"relaxed", b"relaxed")
rsa_header = dkim.sign(message, b"rsa2048", b"example.com", rsa_private, canonicalize=relaxed)
rsa_signed = rsa_header + message
(work_dir / "rsa_signed.eml").write_bytes(rsa_signed)

tampered = rsa_signed.replace(b"Regards", b"Regardz")
assert tampered != rsa_signed
(work_dir / "rsa_tampered.eml").write_bytes(tampered)
(work_dir / "unsigned.eml").write_bytes(message)

ed25519_key = nacl.signing.SigningKey.generate()
ed25519_header = dkim.sign(
    rsa_signed, b"ed", b"example.com", base64.b64encode(bytes(ed25519_key)),
    canonicalize=relaxed, signature_algorithm=b"ed25519-sha256")
(work_dir / "dual_signed.eml").write_bytes(ed25519_header + rsa_signed)
(work_dir / "ed25519.pub").write_text(base64.b64encode(bytes(ed25519_key.verify_key)).decode())

# Send the signed message through smtp_server.py and keep what the server recorded.
spool = work_dir / "spool"
before = len(list(spool.glob("*.json")))
client = smtplib.SMTP("127.0.0.1", port, timeout=30)
client.sendmail("support@example.com", ["customer@example.org"], ed25519_header + rsa_signed)
client.quit()
seq = before + 1
received = json.loads((spool / f"{seq:06d}.json").read_text())
(work_dir / "relayed.json").write_text(json.dumps([received["content_b64"]]))
print("DKIM messages written")
PYTHON

verify() {
    python3 "$support_dir/dkim_verify.py" "$@"
}
ed25519_public="$(cat "$work_dir/ed25519.pub")"

output="$(verify --public-key "$rsa_public" "$work_dir/rsa_signed.eml")" \
    || fail "valid RSA signature rejected: $output"
[[ "$output" == *'"signatures": 1, "verified": [true]'* ]] || fail "unexpected output: $output"

if output="$(verify --public-key "$rsa_public" "$work_dir/rsa_tampered.eml")"; then
    fail "tampered body accepted: $output"
fi
[[ "$output" == *'"verified": [false]'*'body hash mismatch'* ]] || fail "unexpected output: $output"

if output="$(verify --public-key "$rsa_public" "$work_dir/unsigned.eml")"; then
    fail "unsigned message accepted: $output"
fi
[[ "$output" == *'"signatures": 0'*'no DKIM-Signature header'* ]] || fail "unexpected output: $output"

output="$(verify --public-key "$rsa_public" --public-key "$ed25519_public" \
    "$work_dir/dual_signed.eml")" || fail "RSA plus Ed25519 signatures rejected: $output"
[[ "$output" == *'"signatures": 2, "verified": [true, true]'* ]] || fail "unexpected output: $output"

if output="$(verify --public-key "$rsa_public" "$work_dir/dual_signed.eml")"; then
    fail "Ed25519 signature accepted without its key: $output"
fi
[[ "$output" == *'"verified": [false, true]'* ]] || fail "unexpected output: $output"

output="$(verify --public-key "$rsa_public" --public-key "$ed25519_public" --json-stdin \
    <"$work_dir/relayed.json")" || fail "message relayed through smtp_server.py rejected: $output"
[[ "$output" == *'"file": 0, "signatures": 2, "verified": [true, true]'* ]] \
    || fail "unexpected output: $output"

if verify --public-key "not base64!" "$work_dir/rsa_signed.eml" 2>/dev/null; then
    fail "invalid --public-key accepted"
fi
echo "DKIM checks passed"

# --- Stop the server: SIGTERM must end it with status 0 ---

kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=""
[[ "$status" -eq 0 ]] || fail "smtp_server.py exited with status $status after SIGTERM"

echo "selftest passed"
