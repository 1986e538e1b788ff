#!/usr/bin/env python3
"""Verify every DKIM-Signature of raw messages against given public keys, without DNS.

Usage:
  dkim_verify.py --public-key BASE64 [--public-key BASE64 ...] FILE...
  dkim_verify.py --public-key BASE64 --json-stdin < messages.json

Each --public-key is the p= value of a DKIM TXT record: base64 of a
SubjectPublicKeyInfo DER for RSA, or of the raw 32-byte key for Ed25519. A signature
verifies if any given key of the type named by its a= tag verifies it. The selector
and domain in the signature are not checked against the keys.

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
import json
import logging
import sys

import dkim
import dkim.crypto
import dkim.util

ED25519_KEY_LENGTH = 32
KEY_TYPE_BY_ALGORITHM = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}


class UsageError(Exception):
    """Invalid command-line argument or stdin content."""


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


def verify_signature(
    message: bytes, index: int, tags: dict[bytes, bytes], keys: list[PublicKey]
) -> str | None:
    """Verify signature number index with each key of matching type.

    Returns None if one key verifies it, otherwise the reason it failed.
    """
    algorithm = tags.get(b"a", b"").decode("ascii", "replace")
    if algorithm == "rsa-sha1":
        # RFC 8301 section 3.1: verifiers must not consider rsa-sha1 signatures valid.
        return "a=rsa-sha1 is not accepted (RFC 8301)"
    key_type = KEY_TYPE_BY_ALGORITHM.get(algorithm)
    if key_type is None:
        return f"unsupported signature algorithm a={algorithm!r}"
    candidates = [key for key in keys if key.key_type == key_type]
    if not candidates:
        return f"no --public-key of type {key_type!r} given for a={algorithm}"

    reasons = []
    for key_number, key in enumerate(candidates, start=1):
        logger, collector = create_dkimpy_logger()
        verifier = dkim.DKIM(message, logger=logger)
        try:
            if verifier.verify(idx=index, dnsfunc=key.dns_txt):
                return None
            reason = "; ".join(collector.messages) or "signature (b=) does not match"
        except dkim.DKIMException as error:
            reason = str(error)
        if len(candidates) > 1:
            reason = f"key {key_number}: {reason}"
        reasons.append(reason)
    return "; ".join(reasons)


def verify_message(label: str | int, message: bytes, keys: list[PublicKey]) -> dict:
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
    parser.add_argument(
        "--public-key",
        action="append",
        required=True,
        metavar="BASE64",
        help="p= value of a DKIM key record (RSA SubjectPublicKeyInfo or raw "
        "Ed25519 key, base64); repeat to try several keys",
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
