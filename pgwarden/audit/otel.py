"""OpenTelemetry sink: a span per statement with the caller's identity, and metrics.

Configured by the standard variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER = otlp | console | none,
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_MAX_QUEUE_SIZE, ...; OTLP goes
over HTTP/protobuf). The exporters run on the SDK's own threads with bounded queues: a slow or
absent collector costs dropped spans, counted in `dropped_spans`, never a blocked statement.

A `statement` record opens the span (its identity and decision become attributes) and the
matching `statement.outcome` ends it; unmatched statements are forgotten after `max_open`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from pgwarden.cache import BoundedCache

log = logging.getLogger(__name__)

SERVICE_NAME = "pgwarden-proxy"


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """BatchSpanProcessor that counts the spans a full queue turns away (and does not log each)."""

    dropped = 0

    def on_end(self, span: ReadableSpan) -> None:
        bp = getattr(self, "_batch_processor", None)
        q = getattr(bp, "_queue", None)
        cap = getattr(bp, "_max_queue_size", None)
        if q is not None and cap and len(q) >= cap:
            self.dropped += 1
            return
        super().on_end(span)


def _span_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    kind = env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("opentelemetry-exporter-otlp-proto-http is not installed; no spans are exported")
        return None
    return OTLPSpanExporter()


def _metric_reader(env: Mapping[str, str]) -> MetricReader | None:
    kind = env.get("OTEL_METRICS_EXPORTER", "otlp").split(",")[0].strip().lower()
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if kind != "otlp":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        return None
    return PeriodicExportingMetricReader(OTLPMetricExporter())


def _ns(iso: Any) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return None


class OtelSink:
    """Audit sink (see pgwarden.audit.log.Sink). Build with `from_env()` in the proxy."""

    def __init__(self, *, span_exporter: SpanExporter | None = None, metric_reader: MetricReader | None = None,
                 resource: Resource | None = None, max_queue_size: int | None = None, max_open: int = 10_000) -> None:
        resource = resource or Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
        self.tracer_provider = TracerProvider(resource=resource)
        self.processor: CountingBatchSpanProcessor | None = None
        if span_exporter is not None:
            batch = min(512, max_queue_size) if max_queue_size else None
            self.processor = CountingBatchSpanProcessor(span_exporter, max_queue_size=max_queue_size,
                                                        max_export_batch_size=batch)
            self.tracer_provider.add_span_processor(self.processor)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[metric_reader] if metric_reader else [])
        self.tracer = self.tracer_provider.get_tracer("pgwarden.audit")
        meter = self.meter_provider.get_meter("pgwarden.audit")
        self.statements = meter.create_counter("pgwarden.statements", unit="{statement}",
                                               description="statements by decision")
        self.latency = meter.create_histogram("pgwarden.statement.duration", unit="ms",
                                              description="time from forwarding to completion")
        self.masked = meter.create_counter("pgwarden.masked_values", unit="{value}",
                                           description="values masked before reaching the agent")
        self.auth_failures = meter.create_counter("pgwarden.auth.failures", unit="{attempt}")
        self._open: BoundedCache[tuple[str, Any], dict[str, Any]] = BoundedCache(max(1, max_open))
        self.max_open = max_open

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OtelSink | None:
        env = os.environ if env is None else env
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        return cls(span_exporter=_span_exporter(env), metric_reader=_metric_reader(env))

    @property
    def dropped_spans(self) -> int:
        return self.processor.dropped if self.processor else 0

    def publish(self, lines: Sequence[bytes], records: Sequence[dict[str, Any]]) -> None:
        for rec in records:
            event = rec.get("event")
            if event == "statement":
                self._on_statement(rec)
            elif event == "statement.outcome":
                self._on_outcome(rec)
            elif event == "auth.failure":
                self.auth_failures.add(1, {"method": str(rec.get("method", ""))})

    def _on_statement(self, rec: dict[str, Any]) -> None:
        decision = (rec.get("decision") or {}).get("action", "")
        self.statements.add(1, {"decision": decision})
        self._open.put((rec.get("session", ""), rec.get("stmt")), rec)

    def _on_outcome(self, out: dict[str, Any]) -> None:
        stmt = self._open.pop((out.get("session", ""), out.get("stmt"))) or {}
        duration = float(out.get("durationMs") or 0.0)
        self.latency.record(duration, {"decision": out.get("decision") or (stmt.get("decision") or {}).get("action", "")})
        if out.get("maskedValues"):
            self.masked.add(int(out["maskedValues"]))
        end = _ns(out.get("time"))
        start = _ns(stmt.get("time")) or (end - int(duration * 1e6) if end else None)
        span = self.tracer.start_span("pgwarden.statement", kind=SpanKind.SERVER, start_time=start,
                                      attributes=self._attributes(stmt, out))
        if out.get("sqlstate") and not str(out["sqlstate"]).startswith(("00", "01", "02")):
            span.set_status(Status(StatusCode.ERROR, str(out.get("message", ""))[:200]))
        span.end(end_time=end)

    @staticmethod
    def _attributes(stmt: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        ident = stmt.get("identity") or {}
        work = stmt.get("workload") or {}
        dec = stmt.get("decision") or {}
        attrs: dict[str, Any] = {
            "db.system": "postgresql",
            "pgwarden.session": str(out.get("session", "")),
            "pgwarden.statement": str(out.get("stmt", "")),
            "pgwarden.decision": dec.get("action", out.get("decision", "")),
            "pgwarden.rule": dec.get("rule", ""),
            "enduser.id": ident.get("subject", ""),
            "pgwarden.groups": list(ident.get("groups") or []),
            "pgwarden.issuer": ident.get("issuer", ""),
            "pgwarden.service_account": ident.get("serviceAccount", ""),
            "k8s.namespace.name": work.get("namespace", ""),
            "k8s.pod.name": work.get("pod", ""),
            "db.query.text": str(stmt.get("sql", ""))[:4096],
            "db.response.status_code": str(out.get("sqlstate", "")),
            "db.operation.name": str(out.get("tag", "")).split(" ")[0],
            "pgwarden.connection": str(stmt.get("connection", "")),
            "pgwarden.application_name": str(stmt.get("applicationName", "")),
        }
        if "rows" in out:
            attrs["db.response.returned_rows"] = int(out["rows"])
        if (stmt.get("approval") or {}).get("id"):
            attrs["pgwarden.approval.id"] = stmt["approval"]["id"]
        return {k: v for k, v in attrs.items() if v not in ("", [], None)}

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
