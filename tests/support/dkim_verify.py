#!/usr/bin/env python3
"""Verify every DKIM-Signature of raw messages with given public keys or keys from DNS.

Usage:
  dkim_verify.py --public-key BASE64 [--public-key BASE64 ...] FILE...
  dkim_verify.py --dns HOST:PORT FILE...
  dkim_verify.py (--public-key BASE64 ... | --dns HOST:PORT) --json-stdin < messages.json

Give either --public-key (repeatable) or --dns, not both.

Each --public-key is the p= value of a DKIM TXT record: base64 of a
SubjectPublicKeyInfo DER for RSA, or of the raw 32-byte key for Ed25519. A signature
verifies if any given key of the type named by its a= tag verifies it. The selector
and domain in the signature are not checked against the keys.

With --dns, the key of each signature is the TXT record at <s>._domainkey.<d>,
queried from the DNS server HOST:PORT instead of the system resolver. The query goes
over UDP without EDNS, and again over TCP if the response is truncated. The
character-strings of the record are concatenated without separators (RFC 6376 section
3.6.2.2). A signature fails if the name has no TXT record, or more than one because
RFC 6376 leaves that case undefined. It also fails if the record's k= tag does not
match the a= tag, or if the lookup times out (5 seconds per attempt) or returns an
rcode other than NOERROR or NXDOMAIN.

For each message, one JSON line goes to stdout:
  {"file": ..., "signatures": N, "verified": [true, ...],
   "signers": [{"d": ..., "s": ..., "a": ...}, ...], "error": null or text}
With --json-stdin, stdin contains a JSON list of base64-encoded messages and "file" is
the index in that list.

Exit status: 0 when every message has at least one signature and all of them verify,
1 otherwise, 2 for invalid arguments or input.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import functools
import json
import logging
import struct
import sys
from collections.abc import Callable

import dkim
import dkim.crypto
import dkim.util
from dnslib import QTYPE, RCODE, DNSError, DNSLabelError, DNSRecord

ED25519_KEY_LENGTH = 32
KEY_TYPE_BY_ALGORITHM = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}


class UsageError(Exception):
    """Invalid command-line argument or stdin content."""


class DnsLookupError(dkim.DKIMException):
    """Failed DNS query for a key record: a timeout, a network error or an error rcode.

    dkimpy 1.1's verify() does not catch it, so verify_with_dnsfunc reports its message.
    """


@dataclasses.dataclass(frozen=True)
class PublicKey:
    key_type: str  # "rsa" or "ed25519", as in the k= tag of a DKIM key record
    base64_value: str

    def dns_txt(self, name: bytes, timeout: float = 5) -> bytes:
        """Return the DKIM key record for any name, in place of a DNS lookup."""
        record = f"v=DKIM1; k={self.key_type}; p={self.base64_value}"
        return record.encode("ascii")


def parse_public_key(text: str) -> PublicKey:
    """Parse a p= value, telling Ed25519 from RSA by its decoded length."""
    compact = "".join(text.split())
    try:
        der = base64.b64decode(compact, validate=True)
    except binascii.Error as error:
        raise UsageError(f"invalid --public-key {text[:20]!r}...: not base64 ({error})")

    if len(der) == ED25519_KEY_LENGTH:
        return PublicKey("ed25519", compact)
    try:
        dkim.crypto.parse_public_key(der)
    except dkim.crypto.UnparsableKeyError as error:
        raise UsageError(
            f"invalid --public-key {text[:20]!r}...: neither a 32-byte Ed25519 key "
            f"nor an RSA SubjectPublicKeyInfo ({error})"
        )
    return PublicKey("rsa", compact)


def check_key_type(record: bytes, key_type: str, name: str) -> None:
    """Raise KeyFormatError if the k= tag of a key record is not key_type."""
    try:
        tags = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList:
        return  # dkimpy rejects the record itself, with its own message
    record_key_type = tags.get(b"k", b"rsa").decode("ascii", "replace")
    if record_key_type != key_type:
        raise dkim.KeyFormatError(
            f"key record at {name} has k={record_key_type}, but the signature needs "
            f"k={key_type}"
        )


@dataclasses.dataclass(frozen=True)
class DnsKeyLookup:
    """DNS server that key records are queried from, in place of the system resolver."""

    host: str
    port: int

    def dns_txt(self, name: bytes, timeout: float = 5, *, key_type: str) -> bytes:
        """Look up the DKIM key record at name, as dkimpy's dnsfunc.

        Raises dkim.KeyFormatError unless there is exactly one TXT record and its k=
        tag is key_type, and DnsLookupError if the query fails.
        """
        text_name = name.decode("ascii", "replace")
        response = self.query_txt(name, timeout)
        rcode = response.header.rcode
        if rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            raise DnsLookupError(
                f"TXT query for {text_name} to {self.host}:{self.port} returned "
                f"{RCODE.get(rcode)}"
            )

        # A CNAME chain, if any, precedes the TXT records in the answer section.
        records = [record.rdata for record in response.rr if record.rtype == QTYPE.TXT]
        if not records:
            raise dkim.KeyFormatError(
                f"missing public key: no TXT record at {text_name} ({RCODE.get(rcode)})"
            )
        if len(records) > 1:
            raise dkim.KeyFormatError(
                f"{len(records)} TXT records at {text_name}, but RFC 6376 section "
                f"3.6.2.2 requires one key record per selector"
            )
        record = b"".join(records[0].data)
        check_key_type(record, key_type, text_name)
        return record

    def query_txt(self, name: bytes, timeout: float) -> DNSRecord:
        """Query UDP first, then TCP if the UDP response is truncated."""
        query = DNSRecord.question(name, "TXT")
        response = self.send(query, "UDP", timeout)
        if response.header.tc:
            response = self.send(query, "TCP", timeout)
        return response

    def send(self, query: DNSRecord, transport: str, timeout: float) -> DNSRecord:
        text_name = str(query.q.qname)
        server = f"{self.host}:{self.port} over {transport}"
        try:
            tcp = transport == "TCP"
            data = query.send(self.host, self.port, tcp=tcp, timeout=timeout)
            response = DNSRecord.parse(data)
        except TimeoutError:
            raise DnsLookupError(
                f"TXT query for {text_name} to {server} timed out after {timeout} s"
            )
        except (OSError, struct.error, DNSError, DNSLabelError) as error:
            raise DnsLookupError(f"TXT query for {text_name} to {server} failed: {error}")

        if response.header.id != query.header.id or not response.header.qr:
            raise DnsLookupError(
                f"response from {server} does not match the query for {text_name}"
            )
        if response.header.tc and transport == "TCP":
            raise DnsLookupError(f"response from {server} for {text_name} is truncated")
        return response


# Where verification gets keys from: --public-key values or the --dns server.
KeySource = list[PublicKey] | DnsKeyLookup


def parse_dns_server(text: str) -> DnsKeyLookup:
    """Parse the --dns value HOST:PORT."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected HOST:PORT, for example 127.0.0.1:5353"
        )
    return DnsKeyLookup(host, int(port))


class ErrorCollector(logging.Handler):
    """Logging handler that stores dkimpy's error messages.

    dkimpy 1.1 logs some failures, such as an unparsable key, instead of raising them.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def create_dkimpy_logger() -> tuple[logging.Logger, ErrorCollector]:
    # A Logger built directly is not registered in the logging tree, so each
    # attempt gets its own collector and nothing reaches the root logger.
    logger = logging.Logger("dkimpy")
    logger.propagate = False
    collector = ErrorCollector()
    logger.addHandler(collector)
    return logger, collector


def describe_signer(tags: dict[bytes, bytes]) -> dict[str, str | None]:
    def text(tag: bytes) -> str | None:
        value = tags.get(tag)
        return None if value is None else value.decode("ascii", "replace")

    return {"d": text(b"d"), "s": text(b"s"), "a": text(b"a")}


def verify_with_dnsfunc(
    message: bytes, index: int, dnsfunc: Callable[..., bytes]
) -> str | None:
    """Verify signature number index with the key record that dnsfunc returns.

    Returns None if it verifies, otherwise the reason it failed.
    """
    logger, collector = create_dkimpy_logger()
    verifier = dkim.DKIM(message, logger=logger)
    try:
        if verifier.verify(idx=index, dnsfunc=dnsfunc):
            return None
        return "; ".join(collector.messages) or "signature (b=) does not match"
    except dkim.DKIMException as error:
        return str(error)


def verify_signature(
    message: bytes, index: int, tags: dict[bytes, bytes], keys: KeySource
) -> str | None:
    """Verify signature number index with its key from DNS or each given key of its type.

    Returns None if one key verifies it, otherwise the reason it failed.
    """
    algorithm = tags.get(b"a", b"").decode("ascii", "replace")
    if algorithm == "rsa-sha1":
        # RFC 8301 section 3.1: verifiers must not consider rsa-sha1 signatures valid.
        return "a=rsa-sha1 is not accepted (RFC 8301)"
    key_type = KEY_TYPE_BY_ALGORITHM.get(algorithm)
    if key_type is None:
        return f"unsupported signature algorithm a={algorithm!r}"
    if isinstance(keys, DnsKeyLookup):
        dnsfunc = functools.partial(keys.dns_txt, key_type=key_type)
        return verify_with_dnsfunc(message, index, dnsfunc)

    candidates = [key for key in keys if key.key_type == key_type]
    if not candidates:
        return f"no --public-key of type {key_type!r} given for a={algorithm}"

    reasons = []
    for key_number, key in enumerate(candidates, start=1):
        reason = verify_with_dnsfunc(message, index, key.dns_txt)
        if reason is None:
            return None
        if len(candidates) > 1:
            reason = f"key {key_number}: {reason}"
        reasons.append(reason)
    return "; ".join(reasons)


def verify_message(label: str | int, message: bytes, keys: KeySource) -> dict:
    """Verify every DKIM-Signature header of one message and return its report line."""
    report = {"file": label, "signatures": 0, "verified": [], "signers": [], "error": None}
    try:
        headers = dkim.DKIM(message).headers
    except dkim.DKIMException as error:
        report["error"] = f"message could not be parsed: {error}"
        return report

    signature_values = [value for name, value in headers if name.lower() == b"dkim-signature"]
    report["signatures"] = len(signature_values)
    if not signature_values:
        report["error"] = "no DKIM-Signature header"
        return report

    failures = []
    for index, value in enumerate(signature_values):
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList as error:
            tags = {}
            reason = f"invalid tag list: {error}"
        else:
            reason = verify_signature(message, index, tags, keys)

        signer = describe_signer(tags)
        report["signers"].append(signer)
        report["verified"].append(reason is None)
        if reason is not None:
            failures.append(f"signature {index} (d={signer['d']} s={signer['s']}): {reason}")

    if failures:
        report["error"] = "; ".join(failures)
    return report


def read_stdin_messages() -> list[tuple[int, bytes]]:
    try:
        encoded = json.load(sys.stdin)
    except json.JSONDecodeError as error:
        raise UsageError(f"stdin is not valid JSON: {error}")
    if not isinstance(encoded, list):
        raise UsageError("stdin must contain a JSON list of base64 strings")

    messages = []
    for index, item in enumerate(encoded):
        if not isinstance(item, str):
            raise UsageError(f"stdin item {index} is not a string")
        try:
            messages.append((index, base64.b64decode(item, validate=True)))
        except binascii.Error as error:
            raise UsageError(f"stdin item {index} is not valid base64: {error}")
    return messages


def read_file_messages(paths: list[str]) -> list[tuple[str, bytes | OSError]]:
    messages = []
    for path in paths:
        try:
            with open(path, "rb") as file:
                messages.append((path, file.read()))
        except OSError as error:
            messages.append((path, error))
    return messages


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 if every message has signatures and all verify, "
        "1 otherwise, 2 for invalid arguments or input.",
    )
    key_source = parser.add_mutually_exclusive_group(required=True)
    key_source.add_argument(
        "--public-key",
        action="append",
        metavar="BASE64",
        help="p= value of a DKIM key record (RSA SubjectPublicKeyInfo or raw "
        "Ed25519 key, base64); repeat to try several keys",
    )
    key_source.add_argument(
        "--dns",
        type=parse_dns_server,
        metavar="HOST:PORT",
        help="DNS server to query for each signature's key record "
        "(TXT at <s>._domainkey.<d>), instead of --public-key",
    )
    parser.add_argument(
        "--json-stdin",
        action="store_true",
        help="read a JSON list of base64-encoded messages from stdin instead of files",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="raw RFC 5322 message")
    args = parser.parse_args(argv)
    if args.json_stdin and args.files:
        parser.error("give either FILE arguments or --json-stdin, not both")
    if not args.json_stdin and not args.files:
        parser.error("no FILE given (or use --json-stdin)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        keys: KeySource
        if args.dns is not None:
            keys = args.dns
        else:
            keys = [parse_public_key(text) for text in args.public_key]
        if args.json_stdin:
            messages = read_stdin_messages()
        else:
            messages = read_file_messages(args.files)
    except UsageError as error:
        print(f"dkim_verify.py: error: {error}", file=sys.stderr)
        return 2

    if not messages:
        print("dkim_verify.py: error: no messages on stdin", file=sys.stderr)
        return 1

    all_verified = True
    for label, message in messages:
        if isinstance(message, OSError):
            report = {"file": label, "signatures": 0, "verified": [], "signers": [],
                      "error": f"could not read file: {message}"}
        else:
            report = verify_message(label, message, keys)
        print(json.dumps(report), flush=True)
        if report["error"] is not None:
            all_verified = False
    return 0 if all_verified else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
