"""What the planner's parts read of a caller's merged MaskingRules (`subject.SubjectMasking`).

Lineage, row and COPY rewriting and error-text redaction take this view rather than importing
`subject`, which builds them: the package's modules then import in one direction only
(model -> lineage / rows / copy / errors_text -> subject -> ruleset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pgwarden.cache import BoundedCache
from pgwarden.masking.catalog import Relation
from pgwarden.masking.detectors import DetectorSet


class MaskingView(Protocol):
    rule_names: tuple[str, ...]
    columns: dict[tuple[str, str], dict[str, str]]  # (schema, table) -> column -> strategy
    masked_names: frozenset[str]
    has_columns: bool
    detectors: DetectorSet
    allow_in_predicates: bool
    # a view's output columns and the masked columns its own clauses read, by (catalog version,
    # schema, name): one entry, so the two are never evicted apart
    view_cache: BoundedCache[Any, Any]

    def strategy(self, name: str) -> Callable[..., Any]: ...

    def column_strategy(self, rel: Relation, column: str) -> str | None: ...


class PlanView(Protocol):
    """What error redaction asks of a statement's plan."""

    touches_masked: bool
    masked_sources: frozenset[str]
