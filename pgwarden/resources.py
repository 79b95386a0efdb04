"""YAML documents of `apiVersion: pgwarden.dev/v1alpha1`, shared by the proxy and the operator.

The same documents configure the standalone proxy (`pgwarden proxy --config FILE`) and the
operator (as custom resources). This module only splits and checks the envelope; each kind's
spec is turned into a typed model by the package that owns it (policy, masking, proxy config).
Every error names the document and the field, so a user can find the line to fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgwarden.k8s.names import API_VERSION, DOCUMENT_KINDS


class ResourceError(ValueError):
    """A configuration document is wrong; the message says which document and field."""

    def __init__(self, where: str, field_path: str, problem: str) -> None:
        self.where = where
        self.field_path = field_path
        self.problem = problem
        loc = f"{where}: {field_path}" if field_path else where
        super().__init__(f"{loc}: {problem}")


@dataclass(frozen=True)
class Document:
    """One resource: its kind, identity and raw spec, plus where it came from."""

    kind: str
    name: str
    namespace: str
    spec: Mapping[str, Any]
    source: str = "<inline>"
    index: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source} document {self.index + 1} ({self.kind} {self.namespace}/{self.name})"

    def error(self, field_path: str, problem: str) -> ResourceError:
        return ResourceError(self.where, field_path, problem)


def parse_documents(text: str, source: str = "<inline>") -> list[Document]:
    """Split a multi-document YAML text into checked Documents."""
    try:
        raw_docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ResourceError(source, "", f"not valid YAML: {e}") from e
    docs: list[Document] = []
    for i, raw in enumerate(raw_docs):
        if raw is None:
            continue
        docs.append(document_from_object(raw, source=source, index=i))
    return docs


def document_from_object(raw: Any, source: str = "<object>", index: int = 0) -> Document:
    """Check the envelope of one resource object (from YAML or from the Kubernetes API)."""
    where = f"{source} document {index + 1}"
    if not isinstance(raw, Mapping):
        raise ResourceError(where, "", "a document must be a mapping with apiVersion, kind, metadata and spec")
    api_version = raw.get("apiVersion")
    if api_version != API_VERSION:
        raise ResourceError(where, "apiVersion", f"expected {API_VERSION!r}, got {api_version!r}")
    kind = raw.get("kind")
    if kind not in DOCUMENT_KINDS:
        raise ResourceError(where, "kind", f"unknown kind {kind!r}; expected one of {', '.join(DOCUMENT_KINDS)}")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise ResourceError(where, "metadata", "must be a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
        raise ResourceError(where, "metadata.name", f"must be a DNS-1123 name (lower case, digits, '-', '.'), got {name!r}")
    namespace = meta.get("namespace") or "default"
    spec = raw.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ResourceError(where, "spec", "must be a mapping")
    return Document(
        kind=kind,
        name=name,
        namespace=str(namespace),
        spec=spec,
        source=source,
        index=index,
        metadata=meta,
        status=raw.get("status") or {},
    )


def load_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Read every YAML file given (a folder means its *.yaml / *.yml files, sorted)."""
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError as e:
                raise ResourceError(str(f), "", f"cannot read the file: {e.strerror}") from e
            docs.extend(parse_documents(text, source=str(f)))
    return docs


def of_kind(docs: Iterable[Document], kind: str) -> list[Document]:
    return [d for d in docs if d.kind == kind]


_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?")


def parse_duration(value: Any, doc: Document | None = None, field_path: str = "") -> float:
    """'1h30m', '15m', '30s', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | float) and value >= 0:
        return float(value)
    elif isinstance(value, str) and value:
        m = _DURATION.fullmatch(value.strip())
        if m and any(m.groups()):
            h, mi, s, ms = (int(g) if g else 0 for g in m.groups())
            return h * 3600 + mi * 60 + s + ms / 1000
    problem = f"{value!r} is not a duration; write e.g. 30s, 15m, 1h30m"
    if doc is not None:
        raise doc.error(field_path, problem)
    raise ResourceError("<value>", field_path, problem)


def get_field(doc: Document, spec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str,
              default: Any = ..., ) -> Any:
    """Read spec[key], checking its type; `path` is the dotted field path for the error."""
    if key not in spec or spec[key] is None:
        if default is ...:
            raise doc.error(path, "is required")
        return default
    value = spec[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise doc.error(path, f"must be a {names}, got {type(value).__name__}")
    return value
