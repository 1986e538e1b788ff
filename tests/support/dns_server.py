#!/usr/bin/env python3
"""Serve DNS records from a JSON zone file on 127.0.0.1 over UDP and TCP, for tests.

Usage: dns_server.py --zone-file PATH

The server listens on one free port, for UDP and TCP alike. Once both sockets listen,
it prints one line {"port": N} to stdout and serves until SIGTERM or SIGINT, then
exits with status 0. Logs go to stderr, with one line per query.

The zone file is read again for every query, so a test can change the records while
the server runs. Replace the file atomically (write a temporary file, then rename it).
While the file is missing or invalid, every query gets SERVFAIL and the error is
logged. Format:

  {"records": [
     {"name": "sel._domainkey.t1.example", "type": "TXT",
      "value": ["v=DKIM1; k=rsa; p=AAA", "BBB"]},
     {"name": "t1.example", "type": "A", "value": "192.0.2.1"},
     {"name": "t1.example", "type": "MX", "value": [10, "mx.t1.example"]},
     {"name": "www.t1.example", "type": "CNAME", "value": "t1.example"}],
   "servfail": ["broken.example"],
   "drop": ["silent.example"]}

  name      owner name, matched case-insensitively, with or without trailing dot
  TXT       list of strings, the character-strings of one TXT record. A string
            longer than 255 bytes (UTF-8) is split into 255-byte character-strings.
  A         IPv4 address
  MX        [preference, exchange host]
  CNAME     target name
  servfail  names whose queries get SERVFAIL
  drop      names whose queries get no response, so that the client times out

All keys are optional. Several entries with the same name and type make an RRset of
several records. The servfail and drop lists match the exact name only, not the names
below it.

Responses have the AA flag and TTL 1:
- records of the requested type (or all records, for type ANY): NOERROR with them
- a CNAME at the name: the CNAME, and the chain is followed through the zone file
  (at most 8 CNAMEs). The target name decides the rest of the response, and
  servfail and drop apply to it as well.
- the name has other records only, or is an ancestor of a name with records (an
  empty non-terminal): NOERROR with an empty answer section and an SOA record in
  the authority section (NODATA)
- otherwise: NXDOMAIN with the SOA record in the authority section

The SOA record belongs to the zone named by the last label of the name, for example
"example." with mname "ns.example." and rname "hostmaster.example.".

Over UDP, a response larger than 512 bytes, or than the EDNS UDP payload size of the
query, is sent with the TC flag and no records, so the client retries over TCP.
RA is set because tests point stub resolvers straight at this server, which then
takes the place of a recursive resolver.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import signal
import socket
import socketserver
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from dnslib import (
    CNAME,
    EDNS0,
    MX,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSLabel,
    DNSRecord,
)

log = logging.getLogger("dns_server")

TTL = 1
SOA_TIMES = (1, 3600, 3600, 3600, 1)  # serial, refresh, retry, expire, minimum
MAX_CHARACTER_STRING_BYTES = 255
MAX_UDP_BYTES_WITHOUT_EDNS = 512
MAX_TCP_MESSAGE_BYTES = 65535
# Advertised in the OPT record of responses to EDNS queries: the size that
# DNS Flag Day 2020 recommends to avoid IP fragmentation.
EDNS_PAYLOAD_SIZE = 1232
MAX_NAME_WIRE_BYTES = 255  # RFC 1035 section 2.3.4, counted in wire format
MAX_CNAME_CHAIN = 8
MAX_BIND_ATTEMPTS = 20
ZONE_KEYS = {"records", "servfail", "drop"}
RECORD_KEYS = {"name", "type", "value"}

NameKey = tuple[bytes, ...]  # lowercased labels, for case-insensitive lookups


class ZoneError(Exception):
    """Invalid zone file content."""


@dataclasses.dataclass(frozen=True)
class Zone:
    """Records of one zone file read, indexed by lowercased owner name."""

    records: dict[NameKey, list[tuple[int, Any]]]  # (QTYPE value, dnslib RD)
    existing_names: set[NameKey]  # owner names and all their ancestors
    servfail: set[NameKey]
    drop: set[NameKey]


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Outcome of a lookup, before it is packed into a DNS response."""

    rcode: int
    answers: list[RR]
    soa_name: NameKey | None  # name whose zone's SOA goes to the authority section


# --- Zone file ---


def parse_name(text: Any, where: str) -> DNSLabel:
    if not isinstance(text, str):
        raise ZoneError(f"{where}: name must be a string, not {text!r}")
    try:
        label = DNSLabel(text)
    except UnicodeError as error:
        raise ZoneError(f"{where}: invalid name {text!r}: {error}")
    if sum(len(part) + 1 for part in label.label) + 1 > MAX_NAME_WIRE_BYTES:
        raise ZoneError(
            f"{where}: name {text!r} is longer than {MAX_NAME_WIRE_BYTES} bytes "
            f"in wire format"
        )
    return label


def name_key(label: DNSLabel) -> NameKey:
    return tuple(part.lower() for part in label.label)


def split_character_strings(text: str) -> list[bytes]:
    """Split a TXT string into character-strings of at most 255 bytes (UTF-8)."""
    data = text.encode("utf-8")
    if not data:
        return [b""]
    return [
        data[start : start + MAX_CHARACTER_STRING_BYTES]
        for start in range(0, len(data), MAX_CHARACTER_STRING_BYTES)
    ]


def parse_rdata(record_type: Any, value: Any, where: str) -> tuple[int, Any]:
    """Convert the type and value of a zone file entry to a QTYPE value and dnslib RD."""
    if record_type == "TXT":
        if not isinstance(value, list) or not value:
            raise ZoneError(f"{where}: TXT value must be a non-empty list of strings")
        if not all(isinstance(text, str) for text in value):
            raise ZoneError(f"{where}: TXT value must contain only strings, not {value!r}")
        chunks = [chunk for text in value for chunk in split_character_strings(text)]
        return QTYPE.TXT, TXT(chunks)

    if record_type == "A":
        try:
            # IPv4Address also accepts an int, which the zone format does not allow.
            address = ipaddress.IPv4Address(value if isinstance(value, str) else None)
        except ValueError:
            raise ZoneError(f"{where}: A value must be an IPv4 address string, not {value!r}")
        return QTYPE.A, A(str(address))

    if record_type == "MX":
        valid = (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], int)
            and 0 <= value[0] <= 65535
        )
        if not valid:
            raise ZoneError(
                f"{where}: MX value must be [preference 0-65535, host], not {value!r}"
            )
        return QTYPE.MX, MX(parse_name(value[1], where), value[0])

    if record_type == "CNAME":
        return QTYPE.CNAME, CNAME(parse_name(value, where))

    raise ZoneError(f"{where}: unsupported type {record_type!r}, use TXT, A, MX or CNAME")


def parse_name_list(document: dict, key: str) -> set[NameKey]:
    names = document.get(key, [])
    if not isinstance(names, list):
        raise ZoneError(f'"{key}" must be a list of names')
    keys = set()
    for index, name in enumerate(names):
        keys.add(name_key(parse_name(name, f'"{key}" item {index}')))
    return keys


def parse_zone(document: Any) -> Zone:
    if not isinstance(document, dict):
        raise ZoneError("top level must be a JSON object")
    unknown = set(document) - ZONE_KEYS
    if unknown:
        raise ZoneError(f"unknown keys {sorted(unknown)} (expected {sorted(ZONE_KEYS)})")
    entries = document.get("records", [])
    if not isinstance(entries, list):
        raise ZoneError('"records" must be a list')

    records: dict[NameKey, list[tuple[int, Any]]] = {}
    for index, entry in enumerate(entries):
        where = f"record {index}"
        if not isinstance(entry, dict) or set(entry) != RECORD_KEYS:
            raise ZoneError(f"{where}: must be an object with exactly the keys name, type, value")
        key = name_key(parse_name(entry["name"], where))
        rdata = parse_rdata(entry["type"], entry["value"], where)
        records.setdefault(key, []).append(rdata)

    existing_names = {key[start:] for key in records for start in range(len(key) + 1)}
    return Zone(
        records=records,
        existing_names=existing_names,
        servfail=parse_name_list(document, "servfail"),
        drop=parse_name_list(document, "drop"),
    )


def load_zone(path: Path) -> Zone:
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as error:
        raise ZoneError(str(error))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ZoneError(f"invalid JSON: {error}")
    return parse_zone(document)


# --- Lookup and response ---


def resolve(zone: Zone, qname: DNSLabel, qtype: int) -> Resolution | None:
    """Look up qname and qtype in the zone, following CNAMEs.

    Returns None when the query must be dropped.
    """
    answers: list[RR] = []
    name = qname
    for _ in range(MAX_CNAME_CHAIN + 1):
        key = name_key(name)
        if key in zone.drop:
            return None
        if key in zone.servfail:
            return Resolution(RCODE.SERVFAIL, [], None)

        present = zone.records.get(key, [])
        matching = [
            RR(name, rtype, rdata=rdata, ttl=TTL)
            for rtype, rdata in present
            if qtype in (rtype, QTYPE.ANY)
        ]
        if matching:
            answers += matching
            return Resolution(RCODE.NOERROR, answers, None)

        cname = next((rdata for rtype, rdata in present if rtype == QTYPE.CNAME), None)
        if cname is None:
            rcode = RCODE.NOERROR if key in zone.existing_names else RCODE.NXDOMAIN
            return Resolution(rcode, answers, key)
        answers.append(RR(name, QTYPE.CNAME, rdata=cname, ttl=TTL))
        name = cname.label

    log.error(
        "answering SERVFAIL because the CNAME chain from %s is longer than %d",
        qname,
        MAX_CNAME_CHAIN,
    )
    return Resolution(RCODE.SERVFAIL, [], None)


def build_soa(name: NameKey) -> RR:
    """Build the SOA record of the zone named by the last label of name."""
    zone = name[-1:]
    mname = DNSLabel((b"ns",) + zone)
    rname = DNSLabel((b"hostmaster",) + zone)
    return RR(DNSLabel(zone), QTYPE.SOA, rdata=SOA(mname, rname, SOA_TIMES), ttl=TTL)


def find_edns(request: DNSRecord) -> RR | None:
    return next((record for record in request.ar if record.rtype == QTYPE.OPT), None)


def build_empty_response(request: DNSRecord, rcode: int) -> DNSRecord:
    """Build a response without records, plus an OPT record if the request has one."""
    response = request.reply(ra=1, aa=1)
    # request.reply() adds a placeholder question when the request has none.
    response.questions = list(request.questions)
    response.header.rcode = rcode
    if find_edns(request) is not None:
        response.add_ar(EDNS0(udp_len=EDNS_PAYLOAD_SIZE))
    return response


def max_response_size(request: DNSRecord, transport: str) -> int:
    if transport == "tcp":
        return MAX_TCP_MESSAGE_BYTES
    edns = find_edns(request)
    if edns is None:
        return MAX_UDP_BYTES_WITHOUT_EDNS
    # RFC 6891 section 6.2.3: values lower than 512 must be treated as equal to 512.
    return max(MAX_UDP_BYTES_WITHOUT_EDNS, edns.rclass)


class QueryHandler:
    """DNS query handler that reads the zone file again for every query."""

    def __init__(self, zone_path: Path) -> None:
        self.zone_path = zone_path

    def handle_message(self, data: bytes, transport: str, client: str) -> bytes | None:
        """Build and log the packed response to one DNS message, or None to send nothing."""
        try:
            request = DNSRecord.parse(data)
        except DNSError as error:
            log.warning("%s %s: ignored invalid DNS message: %s", transport, client, error)
            return None

        response, description = self.build_response(request)
        if response is None:
            log.info("%s %s: %s -> dropped (no response)", transport, client, description)
            return None

        packed = response.pack()
        truncated = len(packed) > max_response_size(request, transport)
        if truncated:
            response = build_empty_response(request, response.header.rcode)
            response.header.tc = 1
            packed = response.pack()
        log.info(
            "%s %s: %s -> %s, answers: %d%s",
            transport,
            client,
            description,
            RCODE.get(response.header.rcode),
            len(response.rr),
            ", truncated (TC)" if truncated else "",
        )
        return packed

    def build_response(self, request: DNSRecord) -> tuple[DNSRecord | None, str]:
        """Build the response to a parsed query, or None if the query is to be dropped.

        Also returns the query's name and type, for the log line.
        """
        if request.header.opcode != OPCODE.QUERY:
            description = f"opcode {OPCODE.get(request.header.opcode)}"
            return build_empty_response(request, RCODE.NOTIMP), description
        if len(request.questions) != 1:
            description = f"{len(request.questions)} questions"
            return build_empty_response(request, RCODE.FORMERR), description

        question = request.q
        description = f"{question.qname} {QTYPE.get(question.qtype)}"
        try:
            zone = load_zone(self.zone_path)
        except ZoneError as error:
            log.error(
                "answering SERVFAIL because zone file %s could not be loaded: %s",
                self.zone_path,
                error,
            )
            return build_empty_response(request, RCODE.SERVFAIL), description

        resolution = resolve(zone, question.qname, question.qtype)
        if resolution is None:
            return None, description
        response = build_empty_response(request, resolution.rcode)
        response.add_answer(*resolution.answers)
        if resolution.soa_name is not None:
            response.add_auth(build_soa(resolution.soa_name))
        return response, description


# --- Servers ---


class UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        client = "%s:%d" % self.client_address
        response = self.server.query_handler.handle_message(data, "udp", client)
        if response is not None:
            sock.sendto(response, self.client_address)


def receive_exactly(sock: socket.socket, length: int) -> bytes | None:
    """Read length bytes, or return None if the peer closes the connection first."""
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class TcpHandler(socketserver.BaseRequestHandler):
    """Handler for the queries on one TCP connection, each framed by a 2-byte length."""

    def handle(self) -> None:
        client = "%s:%d" % self.client_address
        try:
            while True:
                prefix = receive_exactly(self.request, 2)
                if prefix is None:
                    return
                (length,) = struct.unpack("!H", prefix)
                data = receive_exactly(self.request, length)
                if data is None:
                    log.warning("tcp %s: connection closed inside a query", client)
                    return
                response = self.server.query_handler.handle_message(data, "tcp", client)
                if response is not None:
                    self.request.sendall(struct.pack("!H", len(response)) + response)
        except OSError as error:
            log.warning("tcp %s: connection failed: %s", client, error)


class UdpServer(socketserver.UDPServer):
    query_handler: QueryHandler


class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # open connections must not delay the exit
    block_on_close = False
    query_handler: QueryHandler


def bind_servers(query_handler: QueryHandler) -> tuple[UdpServer, TcpServer]:
    """Bind UDP to a free port on 127.0.0.1, then TCP to the same port.

    A port that is free for UDP can be taken for TCP, so this retries with new ports.
    """
    for attempt in range(1, MAX_BIND_ATTEMPTS + 1):
        udp_server = UdpServer(("127.0.0.1", 0), UdpHandler)
        port = udp_server.server_address[1]
        try:
            tcp_server = TcpServer(("127.0.0.1", port), TcpHandler)
        except OSError as error:
            log.info("attempt %d: TCP port %d is in use (%s)", attempt, port, error)
            udp_server.server_close()
            continue
        udp_server.query_handler = query_handler
        tcp_server.query_handler = query_handler
        return udp_server, tcp_server
    raise OSError(f"no port free for both UDP and TCP in {MAX_BIND_ATTEMPTS} attempts")


def serve(zone_path: Path) -> int:
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda number, frame: stop.set())

    try:
        servers = bind_servers(QueryHandler(zone_path))
    except OSError as error:
        log.error("failed to listen on 127.0.0.1: %s", error)
        return 1
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()

    port = servers[0].server_address[1]
    log.info("listening on 127.0.0.1:%d (UDP and TCP), zone file %s", port, zone_path)
    print(json.dumps({"port": port}), flush=True)

    stop.wait()
    log.info("stopping")
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zone-file",
        type=Path,
        required=True,
        metavar="PATH",
        help="JSON zone file, read again for every query (format: see module docstring)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(args.zone_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
