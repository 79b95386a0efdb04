"""Record builders and the audit/recording config sections."""

from __future__ import annotations

import re

import pytest

from pgwarden.audit import SessionInfo, parse_audit_config, parse_recording_config, records
from pgwarden.resources import ResourceError
from pgwarden.subjects import Identity, Workload

INFO = SessionInfo("s-1", Identity("alice", ("ai-agents",), issuer="https://idp", method="jwt"),
                   Workload(namespace="agents", pod="cursor-7d9f", service_account="cursor"),
                   connection="agents/orders-prod", application_name="cursor", client="10.1.2.3:5555", user="alice")


def fake_detectors(text: str) -> str:
    return re.sub(r"[\w.]+@[\w.]+", "<email>", text)


def test_statement_record_masks_params_and_names_everything() -> None:
    rec = records.statement(INFO, 7, "UPDATE customers SET email = $1 WHERE id = $2", decision="review",
                            rule="AccessPolicy agents/orders rules[1]", params=["bob@example.com", "42", None, b"\x00\x01"],
                            mask_text=fake_detectors, protocol="extended", approval_id="ar-9", approver="dba-carol")
    assert rec["event"] == "statement" and rec["session"] == "s-1" and rec["stmt"] == 7
    assert rec["params"] == ["<email>", "42", None, "<binary 2 bytes>"]
    assert rec["identity"] == {"subject": "alice", "groups": ["ai-agents"], "method": "jwt", "issuer": "https://idp"}
    assert rec["workload"]["pod"] == "cursor-7d9f" and rec["connection"] == "agents/orders-prod"
    assert rec["applicationName"] == "cursor" and rec["client"] == "10.1.2.3:5555"
    assert rec["decision"] == {"action": "review", "rule": "AccessPolicy agents/orders rules[1]"}
    assert rec["approval"] == {"id": "ar-9", "approver": "dba-carol"}
    assert rec["time"].endswith("Z")


def test_what_every_record_of_a_session_repeats_is_built_once_per_session() -> None:
    """Two records per statement repeat the session's identity, workload and client: worked out
    when the session starts, not per record (also compiled, where a cached_property recomputed)."""
    info = SessionInfo("s-3", Identity("bob", ("ai-agents",)), client="10.0.0.9:4000")
    assert info.common is info.common
    first = records.statement(info, 1, "SELECT 1", decision="allow")
    second = records.outcome(info, 1, duration_ms=0.5, tag="SELECT 1", rows=1)
    third = records.statement(info, 2, "SELECT 2", decision="allow")
    assert first["identity"] is third["identity"] and first["identity"] == {"subject": "bob", "groups": ["ai-agents"],
                                                                           "method": "static"}
    assert second["session"] == "s-3" and "identity" not in second
    other = info.with_identity(Identity("carol", ()))
    assert other.common["identity"]["subject"] == "carol" and info.common["identity"]["subject"] == "bob"


def test_record_times_are_utc_with_microseconds() -> None:
    stamp = records.now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp


@pytest.mark.parametrize("decision", ["allow", "deny", "review", "mask"])
def test_every_decision_has_a_record_and_an_outcome(decision: str) -> None:
    rec = records.statement(INFO, 1, "SELECT * FROM customers", decision=decision, masked_columns=["customers.email"])
    out = records.outcome(INFO, 1, duration_ms=2.25, tag="SELECT 3" if decision != "deny" else "",
                          rows=3 if decision != "deny" else None, sqlstate="42501" if decision == "deny" else "",
                          masked_values=3 if decision == "mask" else 0, decision=decision)
    assert rec["decision"]["action"] == decision and out["stmt"] == 1 and out["durationMs"] == 2.25


def test_session_and_auth_records() -> None:
    anon = SessionInfo("s-2", client="10.9.9.9", user="mallory", database="orders")
    fail = records.auth_failure(anon, reason="token authentication failed: the token expired", method="jwt",
                                failures=4, delay_s=1.0)
    assert "identity" not in fail and fail["user"] == "mallory" and fail["failuresFromSource"] == 4
    start = records.session_start(INFO, tls=True)
    assert start["event"] == "session.start" and start["tls"] is True
    end = records.session_end(INFO, duration_ms=1000, statements=5, reason="client closed")
    assert end["statements"] == 5
    ap = records.approval(INFO, 3, approval_id="ar-1", event="approved", approver="carol")
    assert ap["approval"] == {"id": "ar-1", "event": "approved", "approver": "carol"}


def test_audit_config() -> None:
    cfg = parse_audit_config({"audit": {"path": "/var/lib/pgwarden/audit.jsonl", "rotateBytes": "10Mi", "keep": 3,
                                        "stdout": True, "otel": True, "writeTimeout": "2s"}})
    assert (cfg.rotate_bytes, cfg.keep, cfg.stdout, cfg.otel, cfg.write_timeout) == (10 * 1024**2, 3, True, True, 2.0)
    assert parse_audit_config({}).path.endswith("audit.jsonl")
    with pytest.raises(ResourceError, match=r"spec.audit.rotateBytes.*size"):
        parse_audit_config({"audit": {"rotateBytes": "lots"}})
    with pytest.raises(ResourceError, match="unknown field"):
        parse_audit_config({"audit": {"pth": "x"}})


def test_recording_config() -> None:
    cfg = parse_recording_config({"recording": {"dir": "/rec", "maxRowsPerResult": 10, "maxBytesPerResult": "1Ki"}})
    assert (cfg.enabled, cfg.dir, cfg.max_rows_per_result, cfg.max_bytes_per_result) == (True, "/rec", 10, 1024)
    assert not parse_recording_config({"recording": {"enabled": False}}).enabled


@pytest.mark.parametrize(("took", "shown"), [(2.25, 2.25), (0.1234567, 0.123), (0.0125, 0.012), (0.0004, 0.0),
                                               (86_400_000.1236, 86_400_000.124), (-0.0016, -0.002)])
def test_an_outcome_shows_its_duration_to_the_microsecond(took: float, shown: float) -> None:
    out = records.outcome(INFO, 1, duration_ms=took, tag="SELECT 1")
    assert out["durationMs"] == shown


def test_a_prefiltered_scrubber_sends_only_candidates_to_the_detectors() -> None:
    """The audit's parameter scrubber runs the detectors' prefilter itself: a value without a
    candidate comes back as it is, without the detectors being asked; any other value (a
    candidate, non-ASCII text, or every value when there is no prefilter) goes to them."""
    asked: list[str] = []

    def detectors(text: str) -> str:
        asked.append(text)
        return text.replace("123-45-6789", "[redacted:us_ssn]")

    scrub = records.PrefilteredText(detectors, re.compile(r"[0-9][0-9 .()-]{6,}[0-9]"))
    assert records.mask_params(["42", "ssn 123-45-6789", "ünïcode 1", None, b"\x00\x01"], scrub) == [
        "42", "ssn [redacted:us_ssn]", "ünïcode 1", None, "<binary 2 bytes>"]
    assert asked == ["ssn 123-45-6789", "ünïcode 1"]
    every = records.PrefilteredText(detectors, None)
    assert every("42") == "42" and asked[-1] == "42"


def test_the_duration_rounds_as_round_does_ties_included() -> None:
    """The compiled rounding (floor and comparisons) gives what `round(x * 1000) / 1000` gives:
    random durations, negative ones (a clock stepped back), and every tie to even."""
    import random

    rng = random.Random(7)
    took = ([rng.uniform(-1e3, 1e3) for _ in range(20000)] + [k / 2000 for k in range(-4000, 4000)]
            + [rng.uniform(0, 1e9) for _ in range(5000)])
    for x in took:
        assert records.to_microsecond(x) == round(x * 1000.0) / 1000.0, x
