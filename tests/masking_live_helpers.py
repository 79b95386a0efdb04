"""Instruments for the live masking corpus (tests/test_masking_live.py).

* `seeded_secrets()`: every sensitive value the shop seed (pgwarden/demo/shop.sql) puts in
  `customers`, read from the seed itself, with the other spellings a leak could take (digits
  only, upper case, hex as `bytea` prints it, base64, reversed).
* `leaks(data)`: which of those forms occur in some bytes.
* `WireTap`: a real TCP forwarder between a client and the proxy that records every byte the
  proxy sent to the client — the bytes on the wire, before any driver decoded them.
* `live_documents(...)`: the AccessPolicy and MaskingRule the corpus runs under.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

API = "pgwarden.dev/v1alpha1"
OFFICER_USER = "officer"
OFFICER_PASSWORD = "officer-pw"


# -- the seed's secrets ---------------------------------------------------------------------------
def _seed_rows() -> list[tuple[str, ...]]:
    sql = resources.files("pgwarden").joinpath("demo/shop.sql").read_text()
    block = sql.split("INSERT INTO public.customers", 1)[1].split(";", 1)[0]
    rows = []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("('"):
            rows.append(tuple(a if a or not b else "" for a, b in re.findall(r"'([^']*)'|(NULL)", line)))
    return rows


@dataclass(frozen=True)
class Secret:
    column: str
    value: str


def seeded_values() -> list[Secret]:
    """(column, value) for the masked columns of every seeded customer (email, ssn, card, phone)."""
    out = []
    for row in _seed_rows():
        _name, email, ssn, card, phone, _notes = row
        for column, value in (("email", email), ("ssn", ssn), ("card_number", card), ("phone", phone)):
            if value:
                out.append(Secret(column, value))
    return out


def seeded_names() -> list[str]:
    return [row[0] for row in _seed_rows()]


def _forms(value: str) -> set[bytes]:
    raw = value.encode()
    forms = {raw.lower(), raw[::-1].lower(), raw.hex().encode(), base64.b64encode(raw).rstrip(b"=")}
    digits = re.sub(r"\D", "", value)
    if len(digits) >= 9:  # SSNs, card and phone numbers without their separators
        forms.add(digits.encode())
    return forms


def seeded_secrets() -> dict[bytes, str]:
    """Lower-cased byte needle -> the secret it spells."""
    needles: dict[bytes, str] = {}
    for s in seeded_values():
        for f in _forms(s.value):
            needles[f] = s.value
    return needles


NEEDLES = seeded_secrets()


def leaks(data: bytes | str) -> list[str]:
    """The seeded secrets (in any of their forms) found in `data`, compared case-insensitively."""
    blob = (data.encode() if isinstance(data, str) else bytes(data)).lower()
    return sorted({f"{secret!r} as {needle!r}" for needle, secret in NEEDLES.items() if needle in blob})


# -- a recording TCP forwarder ----------------------------------------------------------------
@dataclass
class WireTap:
    """Listens on 127.0.0.1, forwards each accepted connection to (host, port), and keeps every
    byte the upstream side sent back. Point a client at `tap.port` instead of the proxy."""

    host: str
    port_upstream: int
    to_client: bytearray = field(default_factory=bytearray)
    to_server: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True, name="wiretap-accept")
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.host, self.port_upstream))
            self._socks += [client, upstream]
            for src, dst, sink in ((client, upstream, self.to_server), (upstream, client, self.to_client)):
                t = threading.Thread(target=self._pump, args=(src, dst, sink), daemon=True, name="wiretap-pump")
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, sink: bytearray) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    sink += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def received(self) -> bytes:
        """Everything the client has been sent so far."""
        with self._lock:
            return bytes(self.to_client)

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:  # shutdown wakes a pump blocked in recv; close alone would not
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(10)


def server_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """Frame a recording of server->client bytes into (type, payload), skipping the one-byte SSL
    answer a client may have asked for first."""
    out = []
    pos = 0
    if data[:1] == b"N":
        pos = 1
    while pos + 5 <= len(data):
        kind = data[pos:pos + 1]
        n = int.from_bytes(data[pos + 1:pos + 5], "big")
        out.append((kind, data[pos + 5:pos + 1 + n]))
        pos += 1 + n
    return out


# -- the configuration ------------------------------------------------------------------------
def live_documents(*, derived: str = "redact") -> list[dict[str, Any]]:
    """An AccessPolicy that lets the agents read the shop and write where a test needs it (so
    that masking, not the policy, is what stands between them and a value), and the demo's
    MaskingRule (pgwarden/demo/demo.yaml)."""
    tables = ["public.customers", "public.orders", "public.customer_contacts", "public.audit_scratch"]
    policy = {
        "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "live-masking", "namespace": "agents"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}, {"group": "privacy-officers"}],
            "rules": [
                {"action": "allow", "operations": ["select"], "tables": tables},
                {"action": "allow", "operations": ["insert", "update"],
                 "tables": ["public.customers", "public.audit_scratch"]},
            ],
            "defaultAction": "deny",
        },
    }
    rule = {
        "apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "customer-pii", "namespace": "agents"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "columns": [
                {"table": "public.customers", "column": "email", "strategy": "email"},
                {"table": "public.customers", "column": "ssn", "strategy": "redact"},
                {"table": "public.customers", "column": "card_number", "strategy": "last4"},
                {"table": "public.customers", "column": "phone", "strategy": "partial"},
            ],
            "detectors": ["email", "us_ssn", "credit_card", "phone"],
            "derived": derived,
            "exemptSubjects": [{"group": "privacy-officers"}],
        },
    }
    return [policy, rule]


def officer_user() -> dict[str, Any]:
    return {"name": OFFICER_USER, "password": OFFICER_PASSWORD, "groups": ["privacy-officers"]}
