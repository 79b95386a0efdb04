"""The proxy's protocol logic byte for byte, without sockets: the codec and the relay.

A tiny gate refuses every statement containing a marker; the tests check what would have gone
to the server and what the client would have seen.
"""

from __future__ import annotations

import struct

import pytest
from rawpg import error_fields, msg

from pgwarden.errors import PolicyDenied, ProtocolViolation
from pgwarden.proxy import messages as m
from pgwarden.proxy.relay import BARRIER, SENTINEL_SQL, ForwardingGate, Relay, Verdict

MARKER = "forbidden_table"


class MarkerGate(ForwardingGate):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def _decide(self, sql: str) -> Verdict | None:
        self.seen.append(sql)
        if MARKER in sql:
            return Verdict(error=PolicyDenied(f"{MARKER} is off limits", hint="Ask for access."))
        return None

    def query(self, sql: str) -> Verdict | None:
        return self._decide(sql)

    def parse(self, name: str, sql: str) -> Verdict | None:
        return self._decide(sql)

    def bind(self, bind: m.BindMsg, statement: object) -> Verdict | None:
        return None

    def execute(self, name: str, portal: object) -> Verdict | None:
        return None


class Wires:
    def __init__(self, gate: MarkerGate | None = None, max_message_bytes: int = 1 << 20) -> None:
        self.upstream: list[bytes] = []
        self.client: list[bytes] = []
        self.gate = gate if gate is not None else MarkerGate()
        self.relay = Relay(
            self.upstream.append, self.client.append, gate=self.gate, max_message_bytes=max_message_bytes
        )

    def sent_up(self) -> bytes:
        return b"".join(self.upstream)

    def seen_by_client(self) -> bytes:
        return b"".join(self.client)


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data)
    return out


# -- client messages as a driver sends them ------------------------------------------------
def Q(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def P(sql: str, name: str = "") -> bytes:
    return msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def B(portal: str = "", stmt: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!h", 0)
    body += struct.pack("!h", len(params)) + b"".join(struct.pack("!i", len(p)) + p for p in params)
    body += struct.pack("!h", 0)
    return msg(b"B", body)


def D(kind: bytes = b"P", name: str = "") -> bytes:
    return msg(b"D", kind + name.encode() + b"\0")


def E(portal: str = "") -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


SYNC = msg(b"S")


# -- server messages -----------------------------------------------------------------------
def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for n in names:
        body += n.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    return msg(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg(b"D", body)


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def server_error(sqlstate: str, text: str) -> bytes:
    return msg(b"E", f"SERROR\0VERROR\0C{sqlstate}\0M{text}\0\0".encode())


SYNTAX_ERROR = server_error("42601", 'syntax error at or near "pgwarden"')


# == messages.py ===========================================================================
class TestFraming:
    def test_frames_yields_each_complete_message_and_stops_at_a_partial_one(self) -> None:
        data = Q("select 1") + SYNC + Q("select 2")[:7]
        got = list(m.frames(data, 0, 1 << 20))
        assert [chr(t) for t, _, _ in got] == ["Q", "S"]
        assert data[got[0][1] : got[0][2]] == b"select 1\0"
        assert got[-1][2] == len(Q("select 1") + SYNC)

    def test_a_length_below_four_is_refused(self) -> None:
        with pytest.raises(m.FrameError):
            list(m.frames(b"Q\0\0\0\x03", 0, 1 << 20))

    def test_a_huge_length_prefix_is_refused_before_its_bytes_arrive(self) -> None:
        with pytest.raises(m.FrameError, match="limit"):
            list(m.frames(b"Q\x7f\xff\xff\xff", 0, 1 << 20))

    def test_a_length_is_read_big_endian_with_every_byte_in_play(self) -> None:
        payload = bytes(range(256)) * 258  # 66,048 bytes: length 0x00010204 uses three of four bytes
        data = b"d" + struct.pack("!I", len(payload) + 4) + payload + SYNC
        got = list(m.frames(data, 0, 1 << 20))
        assert [(chr(t), ps, end) for t, ps, end in got] == [("d", 5, 5 + len(payload)), ("S", 10 + len(payload), len(data))]
        with pytest.raises(m.FrameError, match="limit"):  # 0x80000000: past any limit, never negative
            list(m.frames(b"d\x80\0\0\0", 0, 1 << 20))

    def test_message_builder_matches_the_wire_format(self) -> None:
        assert m.message(b"Q", b"x\0") == b"Q\0\0\0\x06x\0"
        assert m.ready_for_query(b"T") == b"Z\0\0\0\x05T"


class TestStartup:
    def test_startup_parameters(self) -> None:
        pkt = m.build_startup({"user": "agent", "database": "shop", "application_name": "a b"})
        parsed = m.parse_startup(pkt)
        assert parsed.code == m.PROTOCOL_3
        assert parsed.params == {"user": "agent", "database": "shop", "application_name": "a b"}
        assert m.startup_length(pkt) == len(pkt)

    def test_a_newer_minor_version_is_accepted_for_negotiation(self) -> None:
        pkt = struct.pack("!II", 24, (3 << 16) | 2) + b"user\0agent\0\0"
        assert m.parse_startup(pkt).params == {"user": "agent"}
        ((kind, payload),) = split(m.negotiate_protocol_version(["_pq_.x"]))
        assert (kind, payload) == (b"v", struct.pack("!II", m.PROTOCOL_3, 1) + b"_pq_.x\0")

    def test_ssl_gss_and_cancel_requests(self) -> None:
        assert m.parse_startup(m.build_ssl_request()).code == m.SSL_REQUEST
        assert m.parse_startup(struct.pack("!II", 8, m.GSSENC_REQUEST)).code == m.GSSENC_REQUEST
        cancel = m.parse_startup(m.build_cancel(-5, 0xFFFFFFFF))
        assert (cancel.code, cancel.pid, cancel.secret) == (m.CANCEL_REQUEST, -5, 0xFFFFFFFF)

    @pytest.mark.parametrize(
        "packet",
        [
            struct.pack("!II", 8, 0x00020000),  # protocol 2
            struct.pack("!I", 6) + b"xx",  # too short
            struct.pack("!II", 12, m.PROTOCOL_3) + b"user",  # unterminated
            struct.pack("!II", 14, m.PROTOCOL_3) + b"user\0\0",  # name without value
            struct.pack("!II", 12, m.CANCEL_REQUEST) + b"1234",  # short CancelRequest
        ],
    )
    def test_malformed_startup_packets_are_refused(self, packet: bytes) -> None:
        with pytest.raises(m.FrameError):
            m.parse_startup(packet)


class TestFrontendMessages:
    def test_parse(self) -> None:
        payload = P("select $1", "s1")[5:]
        assert m.parse_parse(payload) == m.ParseMsg("s1", "select $1", ())
        typed = b"s\0select $1\0" + struct.pack("!hI", 1, 23)
        assert m.parse_parse(typed).param_types == (23,)
        with pytest.raises(m.FrameError):
            m.parse_parse(b"s\0select 1")
        with pytest.raises(m.FrameError):
            m.parse_parse(b"s\0select 1\0" + struct.pack("!h", 3))

    def test_bind(self) -> None:
        bind = m.parse_bind(B("p", "s", (b"42", b""))[5:])
        assert (bind.portal, bind.statement, bind.params) == ("p", "s", (b"42", b""))
        null = b"\0\0" + struct.pack("!hhih", 0, 1, -1, 1) + struct.pack("!h", 1)
        assert m.parse_bind(null).params == (None,)
        assert m.parse_bind(null).result_formats == (1,)
        with pytest.raises(m.FrameError):
            m.parse_bind(b"\0\0" + struct.pack("!hhi", 0, 1, 1000) + b"x")

    def test_bind_format_codes_are_read_as_signed_int16_however_many_there_are(self) -> None:
        """One code (the common case) is read byte by byte; each count gives what the server reads."""
        for codes in [(), (0,), (1,), (-1,), (-32768,), (32767,), (0, 1), (1, 0, -2)]:
            for results in [(), (1,), (-5,), (0, 1, 1)]:
                payload = (b"p\0s\0" + struct.pack(f"!h{len(codes)}h", len(codes), *codes) + struct.pack("!h", 0)
                           + struct.pack(f"!h{len(results)}h", len(results), *results))
                bind = m.parse_bind(payload)
                assert (bind.param_formats, bind.result_formats) == (codes, results)
        with pytest.raises(m.FrameError):  # one format code announced, one byte of it sent
            m.parse_bind(b"\0\0" + struct.pack("!h", 1) + b"\0")

    @pytest.mark.parametrize("payload", [
        b"\0\0" + struct.pack("!hhi", 0, 1, -2) + struct.pack("!h", 0),  # a negative length other than -1
        b"\0\0" + struct.pack("!hh", 0, 1) + b"\0\0",  # a parameter length cut short
        b"\0\0" + struct.pack("!hh", 0, 2) + struct.pack("!i", 1) + b"x",  # a second parameter missing
        b"\0\0" + struct.pack("!h", 0) + b"\0",  # the parameter count cut short
        b"\0\0" + struct.pack("!hh", 0, 0),  # no result format count
        b"\0\0\0",  # no format count
        b"p\0s",  # no statement name terminator
        b"\0\0" + struct.pack("!hhh", 0, 0, 0) + b"extra",  # bytes after the last field
    ])
    def test_malformed_bind_is_a_frame_error(self, payload: bytes) -> None:
        """A Bind the server would reject never reaches the gate half-read: every way of cutting or
        stretching it is a FrameError (the proxy then ends the session with a protocol violation)."""
        with pytest.raises(m.FrameError):
            m.parse_bind(payload)

    def test_bind_reads_binary_parameters_and_formats(self) -> None:
        payload = b"p1\0s1\0" + struct.pack("!hhh", 2, 0, 1) + struct.pack("!h", 3) + struct.pack("!i", 0) \
            + struct.pack("!i", 4) + b"\x00\x00\x01\x00" + struct.pack("!i", -1) + struct.pack("!hh", 1, 1)
        bind = m.parse_bind(payload)
        assert (bind.portal, bind.statement, bind.param_formats) == ("p1", "s1", (0, 1))
        assert bind.params == (b"", b"\x00\x00\x01\x00", None) and bind.result_formats == (1,)

    def test_describe_close_execute(self) -> None:
        assert m.parse_target(b"Sname\0") == ("S", "name")
        with pytest.raises(m.FrameError):
            m.parse_target(b"Xname\0")
        assert m.parse_execute(b"p\0" + struct.pack("!i", 10)) == ("p", 10)
        # the row limit is a signed Int32 read byte by byte: every byte in play, and the sign
        for rows in (0, 1, 0x01020304, 2**31 - 1, -1, -(2**31)):
            assert m.parse_execute(b"\0" + struct.pack("!i", rows)) == ("", rows)
        assert m.parse_execute("pörtal".encode() + b"\0" + struct.pack("!i", 5)) == ("pörtal", 5)
        with pytest.raises(m.FrameError):
            m.parse_execute(b"p\0\0")

    def test_error_response_round_trip(self) -> None:
        data = m.error_response("42501", "no", detail="d", hint="h")
        fields = m.parse_fields(split(data)[0][1])
        assert fields["C"] == "42501" and fields["M"] == "no" and fields["D"] == "d" and fields["H"] == "h"
        assert fields == error_fields(split(data)[0][1])

    def test_row_description_and_data_row(self) -> None:
        fields = m.parse_row_description(row_description("a", "b")[5:])
        assert [f.name for f in fields] == ["a", "b"] and fields[0].type_oid == 25
        assert m.parse_data_row(data_row(b"x", None, b"")[5:]) == [b"x", None, b""]
        assert m.command_tag_rows("INSERT 0 3") == 3 and m.command_tag_rows("BEGIN") is None


# == relay.py ==============================================================================
class TestSimpleQuery:
    def test_an_allowed_query_is_forwarded_as_the_same_bytes(self) -> None:
        w = Wires()
        data = Q("select 1")
        w.relay.client_data(data)
        assert w.upstream == [data]
        assert w.upstream[0] is data  # no copy on the hot path
        assert w.relay.busy

    def test_server_results_pass_unchanged_even_in_odd_chunks(self) -> None:
        w = Wires()
        w.relay.client_data(Q("select 1"))
        answer = row_description("x") + data_row(b"1") + complete("SELECT 1") + ready()
        for i in range(0, len(answer), 3):
            w.relay.server_data(answer[i : i + 3])
        assert w.seen_by_client() == answer
        assert not w.relay.busy

    def test_a_refused_query_becomes_the_sentinel_and_the_server_error_is_swapped(self) -> None:
        w = Wires()
        w.relay.client_data(Q(f"delete from {MARKER}"))
        assert w.sent_up() == Q(SENTINEL_SQL)
        assert MARKER.encode() not in w.sent_up()
        w.relay.server_data(SYNTAX_ERROR + ready(b"I"))
        (k1, p1), (k2, p2) = split(w.seen_by_client())
        assert k1 == b"E" and error_fields(p1)["C"] == "42501"
        assert MARKER in error_fields(p1)["M"] and error_fields(p1)["H"] == "Ask for access."
        assert (k2, p2) == (b"Z", b"I")
        assert w.relay.stats.refused == 1

    def test_the_transaction_status_is_the_servers(self) -> None:
        w = Wires()
        w.relay.client_data(Q(f"select * from {MARKER}"))
        w.relay.server_data(SYNTAX_ERROR + ready(b"E"))  # inside BEGIN: now aborted
        assert split(w.seen_by_client())[-1] == (b"Z", b"E")
        assert w.relay.tx_status == b"E"

    def test_a_query_split_across_reads_is_judged_once_whole(self) -> None:
        w = Wires()
        data = Q(f"select * from {MARKER}") + Q("select 2")
        for i in range(len(data)):
            w.relay.client_data(data[i : i + 1])
        assert w.sent_up() == Q(SENTINEL_SQL) + Q("select 2")
        assert w.gate.seen == [f"select * from {MARKER}", "select 2"]


class TestLargeResults:
    def test_a_server_message_larger_than_the_client_limit_passes(self) -> None:
        w = Wires(max_message_bytes=1000)
        w.relay.client_data(Q("select big"))
        answer = row_description("big") + data_row(b"x" * 5000) + complete("SELECT 1") + ready()
        w.relay.server_data(answer)
        assert w.seen_by_client() == answer

    def test_a_huge_row_arriving_in_many_reads_is_forwarded_whole_once(self) -> None:
        w = Wires()
        w.relay.client_data(Q("select big"))
        value = bytes(range(256)) * 4096 * 3  # 3 MB
        answer = row_description("big") + data_row(value) + complete("SELECT 1") + ready()
        for i in range(0, len(answer), 4096):
            w.relay.server_data(answer[i : i + 4096])
        assert w.seen_by_client() == answer
        rows = [p for k, p in split(w.seen_by_client()) if k == b"D"]
        assert len(rows) == 1 and not w.relay.busy


class TestPipelining:
    def test_pipelined_queries_stay_in_order_and_only_the_refused_one_is_replaced(self) -> None:
        w = Wires()
        w.relay.client_data(Q("select 1") + Q(f"drop table {MARKER}") + Q("select 3"))
        assert w.sent_up() == Q("select 1") + Q(SENTINEL_SQL) + Q("select 3")
        first = row_description("a") + data_row(b"1") + complete("SELECT 1") + ready()
        third = row_description("c") + data_row(b"3") + complete("SELECT 1") + ready()
        w.relay.server_data(first + SYNTAX_ERROR + ready() + third)
        kinds = split(w.seen_by_client())
        assert w.seen_by_client().startswith(first)
        assert w.seen_by_client().endswith(third)
        err = [error_fields(p) for k, p in kinds if k == b"E"]
        assert [e["C"] for e in err] == ["42501"]
        assert not w.relay.busy

    def test_a_real_server_error_after_a_refusal_is_passed_through(self) -> None:
        w = Wires()
        w.relay.client_data(Q(f"select {MARKER}") + Q("select 1/0"))
        w.relay.server_data(SYNTAX_ERROR + ready() + server_error("22012", "division by zero") + ready())
        codes = [error_fields(p)["C"] for k, p in split(w.seen_by_client()) if k == b"E"]
        assert codes == ["42501", "22012"]

    def test_extended_batches_are_forwarded_unchanged(self) -> None:
        w = Wires()
        first = P("select $1", "s1") + B("", "s1", (b"7",)) + D() + E() + SYNC
        second = P("select 2") + B() + E() + SYNC
        held = w.relay.client_data(first + second)
        assert w.sent_up() == first
        # the second batch is decided only once the server has made (or refused) s1 and the portal
        assert held is not None
        held.close()  # type: ignore[attr-defined]
        w.relay.server_data(msg(b"1") + msg(b"2") + row_description("a") + data_row(b"7")
                            + complete("SELECT 1") + ready())
        assert w.relay.resume(BARRIER) is None
        assert w.sent_up() == first + second


class TestExtendedRefusal:
    def test_a_refused_parse_drops_everything_up_to_sync_and_forwards_the_sync(self) -> None:
        w = Wires()
        w.relay.client_data(
            P(f"update {MARKER} set x = $1") + B(params=(b"secret-param",)) + D() + E() + SYNC
        )
        sent = w.sent_up()
        assert [k for k, _ in split(sent)] == [b"P", b"S"]
        assert SENTINEL_SQL.encode() in sent
        assert MARKER.encode() not in sent and b"secret-param" not in sent
        w.relay.server_data(SYNTAX_ERROR + ready())
        (k1, p1), (k2, _) = split(w.seen_by_client())
        assert k1 == b"E" and error_fields(p1)["C"] == "42501" and k2 == b"Z"
        assert not w.relay.busy

    def test_the_drop_spans_reads_and_ends_at_sync(self) -> None:
        w = Wires()
        w.relay.client_data(P(f"select {MARKER}") + B())
        w.relay.client_data(D() + E())
        w.relay.client_data(SYNC + P("select 1") + B() + E() + SYNC)
        assert [k for k, _ in split(w.sent_up())] == [b"P", b"S", b"P", b"B", b"E", b"S"]
        assert w.sent_up().endswith(P("select 1") + B() + E() + SYNC)

    def test_a_batch_after_the_refused_one_gets_its_own_answers(self) -> None:
        w = Wires()
        w.relay.client_data(P(f"select {MARKER}") + B() + E() + SYNC + P("select 1") + B() + E() + SYNC)
        good = msg(b"1") + msg(b"2") + data_row(b"1") + complete("SELECT 1") + ready()
        w.relay.server_data(SYNTAX_ERROR + ready() + good)
        assert w.seen_by_client().endswith(good)
        assert [error_fields(p)["C"] for k, p in split(w.seen_by_client()) if k == b"E"] == ["42501"]
        assert not w.relay.busy


class TestFunctionCall:
    def test_function_call_is_refused_and_never_reaches_the_server(self) -> None:
        w = Wires()
        fcall = msg(
            b"F", struct.pack("!I", 1234) + struct.pack("!hhih", 0, 1, 1, 1) + b"x" + struct.pack("!h", 0)
        )
        w.relay.client_data(fcall + Q("select 1"))
        assert w.sent_up() == Q(SENTINEL_SQL) + Q("select 1")
        w.relay.server_data(SYNTAX_ERROR + ready() + complete("SELECT 1") + ready())
        (k1, p1), *rest = split(w.seen_by_client())
        assert k1 == b"E" and error_fields(p1)["C"] == "42501" and "FunctionCall" in error_fields(p1)["M"]
        assert rest[-1][0] == b"Z"

    def test_function_call_is_refused_without_a_gate(self) -> None:
        upstream: list[bytes] = []
        relay = Relay(upstream.append, lambda b: None, gate=None)
        relay.client_data(msg(b"F", struct.pack("!I", 1234) + b"\0\0\0\0\0\0"))
        assert b"".join(upstream) == Q(SENTINEL_SQL)


class TestBadInput:
    def test_an_oversized_message_is_a_protocol_violation(self) -> None:
        w = Wires(max_message_bytes=1000)
        with pytest.raises(ProtocolViolation) as e:
            w.relay.client_data(b"Q" + struct.pack("!I", 5000))
        assert e.value.sqlstate == "08P01"
        assert w.upstream == []

    def test_an_unknown_message_type_is_a_protocol_violation(self) -> None:
        w = Wires()
        with pytest.raises(ProtocolViolation):
            w.relay.client_data(msg(b"z", b"abc"))

    def test_an_unknown_type_byte_is_refused_before_its_body_arrives(self) -> None:
        w = Wires(max_message_bytes=64 << 20)
        with pytest.raises(ProtocolViolation, match="message type"):
            w.relay.client_data(b"\x00\x01\x02\x03 garbage")  # claims a 16 MB body

    def test_a_malformed_parse_is_a_protocol_violation(self) -> None:
        w = Wires()
        with pytest.raises(ProtocolViolation):
            w.relay.client_data(msg(b"P", b"no terminators"))

    def test_terminate_is_noticed(self) -> None:
        w = Wires()
        w.relay.client_data(msg(b"X"))
        assert w.relay.terminated


class TestSchemaChangeWatch:
    """The session registry watches a schema change from the moment the relay sends it until the
    transaction it ran in ends (masking plans against no relation meanwhile, docs/masking.md)."""

    class Ctx:
        def __init__(self, ddl: bool) -> None:
            self.ddl = ddl

    class HoldingGate(MarkerGate):
        """Holds the DDL text (as an approval in wait mode would) and lets everything else through."""

        def query(self, sql: str) -> Verdict | None:
            if sql.startswith("CREATE"):
                async def approval() -> Verdict:
                    return Verdict()
                return Verdict(wait=approval())
            return None

    @staticmethod
    def watched(w: Wires) -> list[str]:
        """What the session registry reports to the gate, in order."""
        events: list[str] = []
        w.relay.names.on_unsettled = lambda: events.append("unsettled")
        w.relay.names.on_settled = lambda: events.append("settled")
        return events

    def test_a_held_change_is_watched_from_when_it_is_sent_not_settled_by_an_earlier_answer(self) -> None:
        w = Wires(self.HoldingGate())
        names, events = w.relay.names, self.watched(w)
        held = w.relay.client_data(Q("SELECT 1") + Q("CREATE VIEW v AS SELECT 1"))
        assert held is not None
        held.close()  # type: ignore[attr-defined]
        # the earlier statement's ReadyForQuery 'I' arrives while the change is held: nothing to settle
        w.relay.server_data(row_description("a") + data_row(b"1") + complete("SELECT 1") + ready(b"I"))
        assert events == [] and not names.ddl_watch
        # approved: sent now, inside a transaction the client opened
        assert w.relay.resume(Verdict(context=self.Ctx(ddl=True))) is None
        assert events == ["unsettled"] and names.ddl_in_flight == 1
        w.relay.server_data(complete("CREATE VIEW") + ready(b"T"))
        assert events == ["unsettled"] and names.ddl_in_flight == 0  # answered, its transaction open
        w.relay.client_data(Q("COMMIT"))
        w.relay.server_data(complete("COMMIT") + ready(b"I"))
        assert events == ["unsettled", "settled"] and not names.ddl_watch

    class ChangeGate(MarkerGate):
        """Lets everything through; a Parse of CREATE carries a context that says it changes the schema."""

        def parse(self, name: str, sql: str) -> Verdict | None:
            if sql.startswith("CREATE"):
                from pgwarden.proxy.session import PreparedEntry

                ctx = TestSchemaChangeWatch.Ctx(ddl=True)
                return Verdict(context=ctx, entry=PreparedEntry(name, sql, "parse", context=ctx))
            return None

    def test_a_change_the_server_skips_after_an_error_is_settled_at_the_next_idle(self) -> None:
        w = Wires(self.ChangeGate())
        names, events = w.relay.names, self.watched(w)
        w.relay.client_data(P("select 1/0") + B() + E() + P("CREATE VIEW v AS SELECT 1", "ddl") + B("", "ddl") + E()
                            + SYNC)
        assert events == ["unsettled"] and names.ddl_in_flight == 1  # sent with the batch
        # the first Execute fails: the server skips the rest up to Sync, the change never runs
        w.relay.server_data(msg(b"1") + msg(b"2") + server_error("22012", "division by zero") + ready(b"I"))
        assert events == ["unsettled", "settled"] and names.ddl_in_flight == 0 and not names.ddl_watch
