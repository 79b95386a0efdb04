"""Audit trail (fail-closed, group-committed, hash-chained), its sinks, and session recordings.

The proxy's calls, in order of a connection's life:

    log = AuditLog(parse_audit_config(spec), sinks=build_sinks(cfg)); await log.open()
    info = SessionInfo(session_id, workload=..., connection=..., client=..., user=...)
    await log.write(records.auth_failure(info, reason=..., method=...))        # on a failed login
    info = info.with_identity(identity); await log.write(records.session_start(info))
    await log.write(records.statement(info, stmt_id, sql, decision=..., rule=..., params=..., mask_text=...))
    log.emit(records.outcome(info, stmt_id, duration_ms=..., tag=..., rows=..., sqlstate=...))
    log.emit(records.session_end(info, duration_ms=..., statements=...))
"""

from pgwarden.audit import records
from pgwarden.audit.config import AuditConfig, RecordingConfig, parse_audit_config, parse_recording_config
from pgwarden.audit.log import AuditLog, AuditStats
from pgwarden.audit.recording import SessionRecorder
from pgwarden.audit.records import SessionInfo
from pgwarden.audit.sinks import StdoutSink, build_sinks

__all__ = [
    "AuditConfig",
    "AuditLog",
    "AuditStats",
    "RecordingConfig",
    "SessionInfo",
    "SessionRecorder",
    "StdoutSink",
    "build_sinks",
    "parse_audit_config",
    "parse_recording_config",
    "records",
]
