"""The `audit:` and `recording:` sections of a ProxyConfig.

```yaml
audit:
  path: /var/lib/pgwarden/audit.jsonl   # JSON lines, hash-chained; rotated siblings audit.jsonl.1 ...
  rotateBytes: 100Mi
  keep: 10
  stdout: true                          # also print sealed records (cluster logging)
  otel: true                            # spans + metrics via OTEL_* environment variables
  writeTimeout: 10s                     # a stuck disk fails statements with PW004 instead of hanging them
  durability: write                     # write: in the kernel before forwarding, fsynced every syncInterval
                                        # fsync: fsynced before forwarding (survives a node crash; slower)
  syncInterval: 100ms
recording:
  enabled: true
  dir: /var/lib/pgwarden/recordings
  maxRowsPerResult: 100
  maxBytesPerResult: 64Ki
  maxBytesPerSession: 16Mi              # then the session stops recording (a `stopped` line says so)
  maxTotalBytes: 512Mi                  # the folder; the oldest recordings are removed first
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgwarden.resources import Document, get_field, parse_duration

DEFAULT_DATA_DIR = "pgwarden-data"
_SIZE = re.compile(r"(\d+)\s*(Ki|Mi|Gi|K|M|G|KB|MB|GB|B)?")
_UNITS = {None: 1, "B": 1, "K": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


@dataclass(frozen=True)
class AuditConfig:
    path: str = f"{DEFAULT_DATA_DIR}/audit.jsonl"
    rotate_bytes: int = 100 * 1024**2
    keep: int = 10
    stdout: bool = False
    otel: bool = False
    write_timeout: float = 10.0
    # "write": a record is in the kernel (survives the proxy being killed) before its statement is
    # forwarded, and fsynced in groups every sync_interval; "fsync": fsynced before forwarding
    durability: str = "write"
    sync_interval: float = 0.1


DURABILITY = ("write", "fsync")


@dataclass(frozen=True)
class RecordingConfig:
    enabled: bool = True
    dir: str = f"{DEFAULT_DATA_DIR}/recordings"
    max_rows_per_result: int = 100
    max_bytes_per_result: int = 64 * 1024
    # one session's recording stops past this (its statements still run)
    max_bytes_per_session: int = 16 * 1024**2
    # the whole folder: the oldest recordings are removed to stay under it
    max_total_bytes: int = 512 * 1024**2


def parse_size(value: Any, doc: Document, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise doc.error(path, f"{value!r} is not a size; write e.g. 104857600, 100Mi or 64Ki")


def _section(spec: Mapping[str, Any], key: str, doc: Document | None) -> tuple[Mapping[str, Any], Document]:
    doc = doc or Document(kind="ProxyConfig", name="inline", namespace="default", spec=spec)
    raw = spec.get(key) or {}
    if not isinstance(raw, Mapping):
        raise doc.error(f"spec.{key}", "must be a mapping")
    return raw, doc


def _no_unknown(doc: Document, raw: Mapping[str, Any], known: set[str], path: str) -> None:
    for k in raw:
        if k not in known:
            raise doc.error(f"{path}.{k}", f"unknown field; expected one of {', '.join(sorted(known))}")


def parse_audit_config(spec: Mapping[str, Any], doc: Document | None = None) -> AuditConfig:
    """Read `spec.audit` of a ProxyConfig (missing: the defaults above)."""
    raw, doc = _section(spec, "audit", doc)
    p = "spec.audit"
    _no_unknown(doc, raw, {"path", "rotateBytes", "keep", "stdout", "otel", "writeTimeout", "durability",
                           "syncInterval"}, p)
    d = AuditConfig()
    keep = get_field(doc, raw, "keep", int, f"{p}.keep", d.keep)
    if keep < 0:
        raise doc.error(f"{p}.keep", "must be 0 or more")
    durability = get_field(doc, raw, "durability", str, f"{p}.durability", d.durability)
    if durability not in DURABILITY:
        raise doc.error(f"{p}.durability", f"{durability!r} is not one of {', '.join(DURABILITY)}")
    interval = parse_duration(raw.get("syncInterval", d.sync_interval), doc, f"{p}.syncInterval")
    if not 0 < interval <= 10:
        raise doc.error(f"{p}.syncInterval", "must be more than 0 and at most 10s")
    return AuditConfig(
        path=get_field(doc, raw, "path", str, f"{p}.path", d.path),
        rotate_bytes=parse_size(raw["rotateBytes"], doc, f"{p}.rotateBytes") if "rotateBytes" in raw else d.rotate_bytes,
        keep=keep,
        stdout=get_field(doc, raw, "stdout", bool, f"{p}.stdout", d.stdout),
        otel=get_field(doc, raw, "otel", bool, f"{p}.otel", d.otel),
        write_timeout=parse_duration(raw.get("writeTimeout", d.write_timeout), doc, f"{p}.writeTimeout"),
        durability=durability,
        sync_interval=interval,
    )


def parse_recording_config(spec: Mapping[str, Any], doc: Document | None = None) -> RecordingConfig:
    """Read `spec.recording` of a ProxyConfig (missing: recordings on, defaults above)."""
    raw, doc = _section(spec, "recording", doc)
    p = "spec.recording"
    _no_unknown(doc, raw, {"enabled", "dir", "maxRowsPerResult", "maxBytesPerResult", "maxBytesPerSession",
                           "maxTotalBytes"}, p)
    d = RecordingConfig()
    rows = get_field(doc, raw, "maxRowsPerResult", int, f"{p}.maxRowsPerResult", d.max_rows_per_result)
    if rows < 0:
        raise doc.error(f"{p}.maxRowsPerResult", "must be 0 or more")

    def size(key: str, default: int) -> int:
        return parse_size(raw[key], doc, f"{p}.{key}") if key in raw else default

    per_session = size("maxBytesPerSession", d.max_bytes_per_session)
    total = size("maxTotalBytes", d.max_total_bytes)
    if per_session < 4096:
        raise doc.error(f"{p}.maxBytesPerSession", "must be at least 4Ki (room for the session's header)")
    if total < per_session:
        raise doc.error(f"{p}.maxTotalBytes", f"must be at least maxBytesPerSession ({per_session} bytes)")
    return RecordingConfig(
        enabled=get_field(doc, raw, "enabled", bool, f"{p}.enabled", d.enabled),
        dir=get_field(doc, raw, "dir", str, f"{p}.dir", d.dir),
        max_rows_per_result=rows,
        max_bytes_per_result=size("maxBytesPerResult", d.max_bytes_per_result),
        max_bytes_per_session=per_session,
        max_total_bytes=total,
    )
