"""OpenTelemetry sink: spans carry the identity, metrics count decisions, a full queue drops and counts."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pgwarden.audit import AuditConfig, AuditLog, SessionInfo, records
from pgwarden.audit.otel import OtelSink
from pgwarden.subjects import Identity, Workload

INFO = SessionInfo("s-1", Identity("alice", ("ai-agents",), issuer="https://idp", service_account="agents/cursor"),
                   Workload(namespace="agents", pod="cursor-7d9f"), connection="agents/orders-prod")


def metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    out: dict[str, list] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = list(m.data.data_points)
    return out


async def test_spans_and_metrics_from_audit_records(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    sink = OtelSink(span_exporter=spans, metric_reader=reader)
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.jsonl")), sinks=[sink])
    await log.open()
    await log.write(records.statement(INFO, 1, "SELECT email FROM customers", decision="allow", rule="rules[0]"))
    log.emit(records.outcome(INFO, 1, duration_ms=3.5, tag="SELECT 2", rows=2, masked_values=2))
    await log.write(records.statement(INFO, 2, "DROP TABLE orders", decision="deny", rule="defaultAction"))
    log.emit(records.outcome(INFO, 2, duration_ms=0.1, sqlstate="42501", message="denied"))
    await log.flush()
    sink.processor.force_flush()  # type: ignore[union-attr]
    got = {s.attributes["pgwarden.statement"]: s for s in spans.get_finished_spans()}
    a = got["1"].attributes
    assert a["enduser.id"] == "alice" and tuple(a["pgwarden.groups"]) == ("ai-agents",)
    assert a["pgwarden.service_account"] == "agents/cursor" and a["k8s.pod.name"] == "cursor-7d9f"
    assert a["pgwarden.decision"] == "allow" and a["db.response.returned_rows"] == 2
    assert got["2"].status.status_code.name == "ERROR" and got["2"].attributes["pgwarden.decision"] == "deny"
    points = metric_points(reader)
    by_decision = {p.attributes["decision"]: p.value for p in points["pgwarden.statements"]}
    assert by_decision == {"allow": 1, "deny": 1}
    assert sum(p.count for p in points["pgwarden.statement.duration"]) == 2
    assert points["pgwarden.masked_values"][0].value == 2
    await log.close()


class StuckExporter(SpanExporter):
    """A collector that does not answer: export blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_stuck_collector_drops_and_counts_without_blocking() -> None:
    exporter = StuckExporter()
    sink = OtelSink(span_exporter=exporter, max_queue_size=8)
    recs = []
    for i in range(100):
        recs.append(records.statement(INFO, i, "SELECT 1", decision="allow"))
        recs.append(records.outcome(INFO, i, duration_ms=1, tag="SELECT 1"))
    sink.publish([], recs)  # returns although the exporter is stuck
    # at most the queue (8) and the batch inside the stuck export (8) are held; the rest is counted
    assert 100 - 16 <= sink.dropped_spans < 100
    exporter.release.set()
    sink.close()


def test_from_env_respects_disabled_and_none() -> None:
    assert OtelSink.from_env({"OTEL_SDK_DISABLED": "true"}) is None
    sink = OtelSink.from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"})
    assert sink is not None and sink.processor is None
    sink.close()
    sink = OtelSink.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXPORTER": "none"})
    assert sink is not None and type(sink.processor.span_exporter).__name__ == "OTLPSpanExporter"  # type: ignore[union-attr]
    sink.close()
