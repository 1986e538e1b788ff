#!/usr/bin/env python3
"""Run a scripted SMTP server on 127.0.0.1 that records every transaction for tests.

Usage: smtp_server.py --port PORT --spool DIR

Once listening, the server prints one line "READY <port>" to stdout and serves until
SIGTERM or SIGINT. Logs go to stderr.

The local part of each recipient selects the reply (prefixes are case-insensitive):

  tempfail-...    450 at RCPT the first time this server process receives the
                  exact address, 250 afterwards
  tempfail3-...   450 at RCPT the first 3 times, 250 afterwards
  reject-...      550 at RCPT, always
  datareject-...  250 at RCPT, then 554 after DATA for the whole transaction
  slow-...        250 at RCPT, then a 3 second delay after DATA before the 250
  anything else   250

Spool layout in DIR:

  NNNNNN.json  one record per transaction that reaches the end of DATA, whether the
               reply is 250 or 554. Fields: seq, received_at, mail_from, rcpt_tos,
               mail_options, rcpt_options, reply, wire_b64, content_b64.
  log.jsonl    the same records, one per line, in seq order.
  rcpt.jsonl   one line per RCPT reply that the scripted handler sends, with the
               fields at, address, code and reply.

wire_b64 holds the DATA bytes exactly as sent by the client: after the 354 reply, up
to but excluding the final ".\\r\\n", still dot-stuffed. content_b64 holds the message
after dot-unstuffing. Neither converts line endings. A null reverse-path (MAIL
FROM:<>) is recorded as mail_from "<>".

NOTE: aiosmtpd 1.4 itself rejects some input before this script sees it, so those
transactions are neither recorded nor scripted: RCPT parameters such as DSN's
NOTIFY= (555), DATA lines longer than 1001 bytes including CRLF (500), and DATA
beyond --data-size-limit (552).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

log = logging.getLogger("smtp_server")

DEFAULT_DATA_SIZE_LIMIT = 40 * 1024 * 1024
SLOW_REPLY_DELAY_SECONDS = 3.0

REPLY_OK = "250 OK"
REPLY_TEMPFAIL = "450 4.2.1 Mailbox busy, try again later"
REPLY_NO_SUCH_USER = "550 5.1.1 No such user here"
REPLY_SPAM = "554 5.7.1 Message rejected as spam"

TEMPFAIL_COUNTS = {"tempfail3-": 3, "tempfail-": 1}
RECORD_NAME = re.compile(r"^(\d{6,})\.json$")


def utc_timestamp() -> str:
    """Return the current time as RFC 3339 UTC with microseconds."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def local_part(address: str) -> str:
    """Return the lowercased local part of an address (all of it if there is no @)."""
    local, _, _ = address.rpartition("@")
    return (local or address).lower()


class Spool:
    """Directory of transaction records and RCPT log lines."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "log.jsonl"
        self.rcpt_log_path = directory / "rcpt.jsonl"
        # Continue after existing records so that a reused spool is never overwritten.
        existing = [
            int(match.group(1))
            for match in map(RECORD_NAME.match, os.listdir(directory))
            if match
        ]
        self.next_seq = max(existing, default=0) + 1
        if existing:
            log.warning(
                "spool %s already contains records, so numbering continues at %d",
                directory,
                self.next_seq,
            )

    def append_rcpt(self, address: str, reply: str) -> None:
        line = {
            "at": utc_timestamp(),
            "address": address,
            "code": int(reply[:3]),
            "reply": reply,
        }
        self._append_line(self.rcpt_log_path, line)

    def write_transaction(self, fields: dict[str, Any]) -> int:
        """Write one transaction record atomically and append it to log.jsonl.

        Returns the sequence number, which is assigned here, so seq follows the order
        in which records are written rather than the order in which DATA ended.
        """
        seq = self.next_seq
        self.next_seq += 1
        record = {"seq": seq, **fields}

        final_path = self.directory / f"{seq:06d}.json"
        temporary_path = self.directory / f".{seq:06d}.json.tmp"
        with open(temporary_path, "w", encoding="utf-8") as file:
            json.dump(record, file)
            file.write("\n")
        os.replace(temporary_path, final_path)

        self._append_line(self.log_path, record)
        return seq

    @staticmethod
    def _append_line(path: Path, value: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(value) + "\n")


class RecordingReader:
    """StreamReader proxy that keeps a copy of every byte read through it."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.captured = bytearray()

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(separator)
        self.captured += data
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self.captured += data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class RecordingSMTP(SMTP):
    """aiosmtpd SMTP session that also keeps the raw bytes of the DATA section.

    aiosmtpd 1.4 reads the DATA section in smtp_DATA through self._reader, using only
    readuntil() and read(). Wrapping that reader for the duration of the command
    captures the section before dot-unstuffing, including the final ".\\r\\n".
    """

    open_sessions: set[RecordingSMTP] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._data_recorder: RecordingReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        RecordingSMTP.open_sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        RecordingSMTP.open_sessions.discard(self)
        super().connection_lost(error)

    # aiosmtpd lists only decorated smtp_* methods in its HELP reply.
    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        original_reader = self._reader
        self._data_recorder = RecordingReader(original_reader)
        self._reader = self._data_recorder
        try:
            # The handler's handle_DATA runs inside this call and reads the
            # captured bytes through take_data_wire().
            await super().smtp_DATA(arg)
        finally:
            self._reader = original_reader
            self._data_recorder = None

    def take_data_wire(self) -> bytes:
        """Return the DATA bytes read so far, without the ".\\r\\n" terminator line."""
        if self._data_recorder is None:
            raise RuntimeError("take_data_wire() called outside the DATA command")
        captured = bytes(self._data_recorder.captured)
        if not captured.endswith(b".\r\n"):
            raise RuntimeError("DATA section does not end with the .CRLF terminator")
        return captured[: -len(b".\r\n")]


class ScriptedHandler:
    """aiosmtpd handler that picks replies from the recipient's local part."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.rcpt_seen = collections.Counter()

    def rcpt_reply(self, address: str) -> str:
        local = local_part(address)
        self.rcpt_seen[address] += 1

        if local.startswith("reject-"):
            return REPLY_NO_SUCH_USER
        for prefix, tempfail_count in TEMPFAIL_COUNTS.items():
            if local.startswith(prefix) and self.rcpt_seen[address] <= tempfail_count:
                return REPLY_TEMPFAIL
        return REPLY_OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.rcpt_reply(address)
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        log.info("RCPT %s from %s: %s", address, session.peer, reply)
        self.spool.append_rcpt(address, reply)
        return reply

    async def handle_DATA(
        self, server: RecordingSMTP, session: Session, envelope: Envelope
    ) -> str:
        received_at = utc_timestamp()
        wire = server.take_data_wire()
        recipient_locals = [local_part(address) for address in envelope.rcpt_tos]

        if any(local.startswith("slow-") for local in recipient_locals):
            await asyncio.sleep(SLOW_REPLY_DELAY_SECONDS)

        if any(local.startswith("datareject-") for local in recipient_locals):
            reply = REPLY_SPAM
        else:
            reply = REPLY_OK

        seq = self.spool.write_transaction(
            {
                "received_at": received_at,
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "mail_options": list(envelope.mail_options),
                "rcpt_options": list(envelope.rcpt_options),
                "reply": reply,
                "wire_b64": base64.b64encode(wire).decode("ascii"),
                "content_b64": base64.b64encode(envelope.original_content).decode(
                    "ascii"
                ),
            }
        )
        log.info(
            "recorded transaction seq=%d from=%s to=%s size=%d reply=%r",
            seq,
            envelope.mail_from,
            ",".join(envelope.rcpt_tos),
            len(envelope.original_content),
            reply,
        )
        return reply


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    handler = ScriptedHandler(Spool(args.spool))

    def create_session() -> RecordingSMTP:
        return RecordingSMTP(
            handler,
            data_size_limit=args.data_size_limit,
            enable_SMTPUTF8=True,
            hostname=args.hostname,
            ident="outbound test SMTP server",
            loop=loop,
        )

    try:
        server = await loop.create_server(create_session, host="127.0.0.1", port=args.port)
    except OSError as error:
        log.error(
            "failed to listen on 127.0.0.1:%d: %s (pass --port 0 to pick a free port)",
            args.port,
            error,
        )
        return 1

    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)

    log.info("listening on 127.0.0.1:%d, spool %s", port, args.spool)
    print(f"READY {port}", flush=True)

    await stop.wait()
    log.info("stopping, closing %d open sessions", len(RecordingSMTP.open_sessions))
    server.close()
    for session in list(RecordingSMTP.open_sessions):
        if session.transport is not None:
            session.transport.close()
    await server.wait_closed()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--port",
        type=int,
        required=True,
        help="TCP port on 127.0.0.1 to listen on, or 0 to pick a free port",
    )
    parser.add_argument(
        "--spool",
        type=Path,
        required=True,
        help="directory for transaction records, created if missing",
    )
    parser.add_argument(
        "--data-size-limit",
        type=int,
        default=DEFAULT_DATA_SIZE_LIMIT,
        help="maximum DATA size in bytes, counted before dot-unstuffing and "
        "advertised as SIZE (default: %(default)s, which is 40 MiB)",
    )
    parser.add_argument(
        "--hostname",
        default="localhost",
        help="host name sent in the greeting and the EHLO reply (default: %(default)s)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also log aiosmtpd's per-session messages",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mail.log").setLevel(
        logging.INFO if args.verbose else logging.WARNING
    )
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
