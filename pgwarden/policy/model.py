"""AccessPolicy documents as typed, validated models.

A policy that does not parse is an error naming the document and the field, never a policy
that allows more than it says: unknown fields, unknown operations, table names that are not
schema-qualified and bad durations are all refused at load time, so a typo cannot fall open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pgwarden.resources import Document, get_field, parse_duration
from pgwarden.subjects import SubjectRef, parse_subjects

Action = Literal["allow", "review", "deny"]
ACTIONS: tuple[Action, ...] = get_args(Action)
# Strictness order used everywhere actions combine: deny wins over review wins over allow.
SEVERITY: dict[Action, int] = {"allow": 0, "review": 1, "deny": 2}
MODES = ("enforce", "audit")
APPROVAL_MODES = ("wait", "defer")
PREVIEW_KINDS = ("none", "rows")  # approval.preview
PREVIEW_TIMEOUT_DEFAULT = 2.0  # seconds: the agent waits at most this long for a preview
PREVIEW_TIMEOUT_MAX = 30.0
SYSTEM_CATALOG_MODES = ("read", "deny")

# The operation vocabulary (docs/policy.md explains each).
OPERATIONS: dict[str, str] = {
    "select": "read rows (SELECT, COPY … TO STDOUT, RETURNING, currval, plain EXPLAIN)",
    "insert": "add rows (INSERT, COPY … FROM STDIN, MERGE … INSERT)",
    "update": "change rows (UPDATE, INSERT … ON CONFLICT DO UPDATE, MERGE … UPDATE, nextval/setval)",
    "delete": "remove rows (DELETE, MERGE … DELETE)",
    "merge": "MERGE itself (its INSERT/UPDATE/DELETE actions are needed as well)",
    "truncate": "TRUNCATE",
    "lock": "LOCK TABLE and SELECT … FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE",
    "ddl": "CREATE / ALTER / DROP / COMMENT of tables, views, indexes, sequences, types, schemas…; "
           "SELECT INTO and CREATE TABLE AS",
    "grant": "GRANT / REVOKE of privileges, ALTER DEFAULT PRIVILEGES",
    "role": "CREATE / ALTER / DROP ROLE, GRANT role TO role, REASSIGN / DROP OWNED",
    "extension": "CREATE / ALTER / DROP EXTENSION",
    "maintenance": "VACUUM, ANALYZE, REINDEX, CLUSTER, REFRESH MATERIALIZED VIEW, CHECKPOINT",
    "listen": "LISTEN",
    "notify": "NOTIFY and pg_notify()",
}

_SPEC_KEYS = {"connectionRef", "subjects", "rules", "defaultAction", "mode", "limits", "approval",
              "allowedFunctions", "systemCatalogs", "description"}
_RULE_KEYS = {"name", "action", "operations", "tables", "functions", "requireWhere", "description"}
_LIMIT_KEYS = {"maxRows", "statementTimeout", "maxDenials", "maxStatementsPerMinute", "maxAffectedRows"}
_DENIAL_KEYS = {"count", "window", "lockout"}
_APPROVAL_KEYS = {"reviewers", "minApprovals", "timeout", "mode", "notifyUrl", "preview", "previewTimeout"}

ANY = ("*", "*")  # an access whose objects the engine cannot list (e.g. TRUNCATE … CASCADE)


@dataclass(frozen=True)
class Pattern:
    """`schema.name`, `schema.*` or `*.*` — the parts are exact catalog names (case-sensitive)."""

    schema: str
    name: str

    def matches(self, obj: tuple[str, str]) -> bool:
        if obj == ANY:
            return self.schema == "*" and self.name == "*"
        return self.schema in ("*", obj[0]) and self.name in ("*", obj[1])

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class DenialLimit:
    """`limits.maxDenials`: past `count` refused statements within `window` seconds the session
    is ended (PW006) and the identity is refused new sessions for `lockout` seconds."""

    count: int
    window: float
    lockout: float

    def combine(self, other: DenialLimit | None) -> DenialLimit:
        if other is None:
            return self
        return DenialLimit(min(self.count, other.count), max(self.window, other.window),
                           max(self.lockout, other.lockout))

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "window": self.window, "lockout": self.lockout}


@dataclass(frozen=True)
class Limits:
    """Per-statement and per-identity limits; None means no limit. Several policies combine to
    the strictest."""

    max_rows: int | None = None
    statement_timeout: float | None = None  # seconds
    max_denials: DenialLimit | None = None
    max_statements_per_minute: int | None = None
    # an INSERT / UPDATE / DELETE / MERGE changing more rows than this is undone (PW005)
    max_affected_rows: int | None = None

    def combine(self, other: Limits) -> Limits:
        denials = other.max_denials if self.max_denials is None else self.max_denials.combine(other.max_denials)
        return Limits(_min(self.max_rows, other.max_rows), _min(self.statement_timeout, other.statement_timeout),
                      denials, _min(self.max_statements_per_minute, other.max_statements_per_minute),
                      _min(self.max_affected_rows, other.max_affected_rows))

    def to_json(self) -> dict[str, Any]:
        return {"maxRows": self.max_rows, "statementTimeout": self.statement_timeout,
                "maxDenials": self.max_denials.to_json() if self.max_denials else None,
                "maxStatementsPerMinute": self.max_statements_per_minute,
                "maxAffectedRows": self.max_affected_rows}


@dataclass(frozen=True)
class ApprovalSettings:
    """Who may approve a `review` statement and how the proxy waits (the approvals package acts on it)."""

    reviewers: tuple[SubjectRef, ...] = ()
    min_approvals: int = 1
    timeout: float = 900.0  # seconds
    mode: str = "wait"
    notify_url: str = ""
    # "rows": a held INSERT/UPDATE/DELETE/MERGE is run once in a rolled-back transaction first, and
    # the request shows how many rows it changed (docs/approvals.md); "none": no preview
    preview: str = "none"
    preview_timeout: float = PREVIEW_TIMEOUT_DEFAULT  # seconds, the whole preview's bound

    def to_json(self) -> dict[str, Any]:
        return {
            "reviewers": [str(r) for r in self.reviewers],
            "minApprovals": self.min_approvals,
            "timeout": self.timeout,
            "mode": self.mode,
            "notifyUrl": self.notify_url or None,
            "preview": self.preview,
            "previewTimeout": self.preview_timeout,
        }


@dataclass(frozen=True)
class Rule:
    """One ordered rule. It matches table accesses (operations + tables) or function calls (functions)."""

    index: int  # 1-based, as people count
    action: Action
    operations: frozenset[str] = frozenset()
    tables: tuple[Pattern, ...] | None = None  # None: any object, and statements with none
    functions: tuple[Pattern, ...] | None = None
    require_where: bool = False
    name: str = ""

    def matches_access(self, operation: str, obj: tuple[str, str] | None) -> bool:
        if self.functions is not None or operation not in self.operations:
            return False
        if self.tables is None:
            return True
        return obj is not None and any(p.matches(obj) for p in self.tables)

    def matches_function(self, qualified: tuple[str, str]) -> bool:
        return self.functions is not None and any(p.matches(qualified) for p in self.functions)


@dataclass(frozen=True)
class AccessPolicy:
    name: str
    namespace: str
    connection: str
    subjects: tuple[SubjectRef, ...]
    rules: tuple[Rule, ...] = ()
    default_action: Action = "deny"
    mode: str = "enforce"
    limits: Limits = Limits()
    approval: ApprovalSettings | None = None
    allowed_functions: tuple[Pattern, ...] = ()
    system_catalogs: str = "read"

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rule_label(self, rule: Rule) -> str:
        label = f"{self.id} rule {rule.index}"
        return f"{label} ({rule.name})" if rule.name else label


def _min(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _check_keys(doc: Document, raw: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in raw:
        if key not in allowed:
            raise doc.error(f"{path}.{key}" if path else str(key),
                            f"unknown field; expected one of {', '.join(sorted(allowed))}")


def parse_pattern(doc: Document, raw: Any, path: str, what: str = "table") -> Pattern:
    """`schema.name` / `schema.*` / `*.*`; bare names are refused because search paths differ."""
    if not isinstance(raw, str) or not raw.strip():
        raise doc.error(path, f"must be a schema-qualified {what} name such as public.orders, got {raw!r}")
    parts = raw.strip().split(".")
    example = "public.orders" if what == "table" else "public.order_total"
    if len(parts) != 2:
        raise doc.error(path, f"{raw!r} is not schema.{what} (e.g. {example}, public.*, *.*); "
                              "names must be schema-qualified")
    schema, name = parts
    for part in parts:
        if not part or '"' in part or any(c.isspace() for c in part):
            raise doc.error(path, f"{raw!r} is not schema.{what}: write exact catalog names without quotes or spaces")
        if "*" in part and part != "*":
            raise doc.error(path, f"{raw!r}: '*' must stand alone for a whole part (public.*), not inside a name")
    if schema == "*" and name != "*":
        raise doc.error(path, f"{raw!r}: a wildcard schema needs a wildcard name (*.*)")
    return Pattern(schema, name)


def _action(doc: Document, value: str, path: str) -> Action:
    for action in ACTIONS:
        if value == action:
            return action
    raise doc.error(path, f"{value!r} is not one of {', '.join(ACTIONS)}")


def _parse_rule(doc: Document, raw: Any, index: int) -> Rule:
    path = f"spec.rules[{index}]"
    if not isinstance(raw, Mapping):
        raise doc.error(path, "must be a mapping with action and operations (or functions)")
    _check_keys(doc, raw, _RULE_KEYS, path)
    action = _action(doc, get_field(doc, raw, "action", str, f"{path}.action"), f"{path}.action")
    name = get_field(doc, raw, "name", str, f"{path}.name", "")
    functions_raw = get_field(doc, raw, "functions", list, f"{path}.functions", None)
    ops_raw = get_field(doc, raw, "operations", list, f"{path}.operations", None)
    tables_raw = get_field(doc, raw, "tables", list, f"{path}.tables", None)
    require_where = get_field(doc, raw, "requireWhere", bool, f"{path}.requireWhere", False)
    if functions_raw is not None:
        if ops_raw is not None or tables_raw is not None or require_where:
            raise doc.error(path, "a rule names either functions, or operations (with tables); "
                                  "split it into two rules")
        if not functions_raw:
            raise doc.error(f"{path}.functions", "must not be empty")
        functions = tuple(parse_pattern(doc, f, f"{path}.functions[{i}]", "function")
                          for i, f in enumerate(functions_raw))
        return Rule(index=index + 1, action=action, functions=functions, name=name)
    if not ops_raw:
        raise doc.error(f"{path}.operations", f"is required (one or more of {', '.join(OPERATIONS)})")
    ops = set()
    for i, op in enumerate(ops_raw):
        if not isinstance(op, str) or op not in OPERATIONS:
            raise doc.error(f"{path}.operations[{i}]",
                            f"unknown operation {op!r}; use one of {', '.join(OPERATIONS)}")
        ops.add(op)
    tables = None
    if tables_raw is not None:
        if not tables_raw:
            raise doc.error(f"{path}.tables", "must not be empty (leave it out to mean every table)")
        tables = tuple(parse_pattern(doc, t, f"{path}.tables[{i}]") for i, t in enumerate(tables_raw))
    if require_where and not ops & {"update", "delete"}:
        raise doc.error(f"{path}.requireWhere", "only applies to update and delete; add one of them or drop it")
    return Rule(index=index + 1, action=action, operations=frozenset(ops), tables=tables,
                require_where=require_where, name=name)


def _parse_limits(doc: Document, raw: Mapping[str, Any]) -> Limits:
    _check_keys(doc, raw, _LIMIT_KEYS, "spec.limits")
    max_rows = get_field(doc, raw, "maxRows", int, "spec.limits.maxRows", None)
    if max_rows is not None and max_rows < 1:
        raise doc.error("spec.limits.maxRows", "must be at least 1 (leave it out for no limit)")
    timeout = None
    if raw.get("statementTimeout") is not None:
        timeout = parse_duration(raw["statementTimeout"], doc, "spec.limits.statementTimeout")
        if timeout <= 0:
            raise doc.error("spec.limits.statementTimeout", "must be positive (leave it out for no limit)")
    denials = None
    raw_denials = get_field(doc, raw, "maxDenials", Mapping, "spec.limits.maxDenials", None)
    if raw_denials is not None:
        path = "spec.limits.maxDenials"
        _check_keys(doc, raw_denials, _DENIAL_KEYS, path)
        count = get_field(doc, raw_denials, "count", int, f"{path}.count", None)
        if count is None or count < 1:
            raise doc.error(f"{path}.count", "must be at least 1: the number of refused statements a session may have")
        window = parse_duration(raw_denials.get("window", "10m"), doc, f"{path}.window")
        lockout = parse_duration(raw_denials.get("lockout", "15m"), doc, f"{path}.lockout")
        if window <= 0 or lockout <= 0:
            raise doc.error(path, "window and lockout must be positive durations such as 10m")
        denials = DenialLimit(count, window, lockout)
    per_minute = get_field(doc, raw, "maxStatementsPerMinute", int, "spec.limits.maxStatementsPerMinute", None)
    if per_minute is not None and per_minute < 1:
        raise doc.error("spec.limits.maxStatementsPerMinute", "must be at least 1 (leave it out for no limit)")
    affected = get_field(doc, raw, "maxAffectedRows", int, "spec.limits.maxAffectedRows", None)
    if affected is not None and affected < 1:
        raise doc.error("spec.limits.maxAffectedRows", "must be at least 1 (leave it out for no limit)")
    return Limits(max_rows=max_rows, statement_timeout=timeout, max_denials=denials,
                  max_statements_per_minute=per_minute, max_affected_rows=affected)


def _parse_approval(doc: Document, raw: Mapping[str, Any]) -> ApprovalSettings:
    _check_keys(doc, raw, _APPROVAL_KEYS, "spec.approval")
    reviewers = parse_subjects(doc, raw.get("reviewers"), "spec.approval.reviewers")
    min_approvals = get_field(doc, raw, "minApprovals", int, "spec.approval.minApprovals", 1)
    if min_approvals < 1:
        raise doc.error("spec.approval.minApprovals", "must be at least 1")
    timeout = parse_duration(raw.get("timeout", "15m"), doc, "spec.approval.timeout")
    mode = get_field(doc, raw, "mode", str, "spec.approval.mode", "wait")
    if mode not in APPROVAL_MODES:
        raise doc.error("spec.approval.mode", f"{mode!r} is not one of {', '.join(APPROVAL_MODES)}")
    notify_url = get_field(doc, raw, "notifyUrl", str, "spec.approval.notifyUrl", "")
    if notify_url and not notify_url.startswith(("http://", "https://")):
        raise doc.error("spec.approval.notifyUrl", "must be an http:// or https:// URL")
    preview = get_field(doc, raw, "preview", str, "spec.approval.preview", "none")
    if preview not in PREVIEW_KINDS:
        raise doc.error("spec.approval.preview", f"{preview!r} is not one of {', '.join(PREVIEW_KINDS)}")
    preview_timeout = parse_duration(raw.get("previewTimeout", PREVIEW_TIMEOUT_DEFAULT), doc,
                                     "spec.approval.previewTimeout")
    if not 0 < preview_timeout <= PREVIEW_TIMEOUT_MAX:
        raise doc.error("spec.approval.previewTimeout",
                        f"must be more than 0 and at most {PREVIEW_TIMEOUT_MAX:g}s: the agent waits that long "
                        "before its request is filed")
    return ApprovalSettings(reviewers=reviewers, min_approvals=min_approvals, timeout=timeout, mode=mode,
                            notify_url=notify_url, preview=preview, preview_timeout=preview_timeout)


def parse_access_policy(doc: Document) -> AccessPolicy:
    """Turn one AccessPolicy document into a model, or raise ResourceError naming the field."""
    s = doc.spec
    _check_keys(doc, s, _SPEC_KEYS, "spec")
    conn = get_field(doc, s, "connectionRef", Mapping, "spec.connectionRef")
    _check_keys(doc, conn, {"name", "namespace"}, "spec.connectionRef")
    connection = get_field(doc, conn, "name", str, "spec.connectionRef.name")
    if "subjects" not in s:
        raise doc.error("spec.subjects", "is required: name the groups, users or service accounts it applies to")
    subjects = parse_subjects(doc, s.get("subjects"), "spec.subjects")
    if not subjects:
        raise doc.error("spec.subjects", "must name at least one group, user or service account")
    rules_raw = get_field(doc, s, "rules", list, "spec.rules", [])
    rules = tuple(_parse_rule(doc, r, i) for i, r in enumerate(rules_raw))
    default_action = _action(doc, get_field(doc, s, "defaultAction", str, "spec.defaultAction", "deny"),
                             "spec.defaultAction")
    mode = get_field(doc, s, "mode", str, "spec.mode", "enforce")
    if mode not in MODES:
        raise doc.error("spec.mode", f"{mode!r} is not one of {', '.join(MODES)}")
    limits = _parse_limits(doc, get_field(doc, s, "limits", Mapping, "spec.limits", {}))
    approval_raw = get_field(doc, s, "approval", Mapping, "spec.approval", None)
    approval = _parse_approval(doc, approval_raw) if approval_raw is not None else None
    uses_review = default_action == "review" or any(r.action == "review" for r in rules)
    if uses_review and (approval is None or not approval.reviewers):
        raise doc.error("spec.approval.reviewers",
                        "the policy sends statements to review, so name who may approve them "
                        "(e.g. reviewers: [{group: dba}])")
    funcs_raw = get_field(doc, s, "allowedFunctions", list, "spec.allowedFunctions", [])
    allowed_functions = tuple(parse_pattern(doc, f, f"spec.allowedFunctions[{i}]", "function")
                              for i, f in enumerate(funcs_raw))
    catalogs = get_field(doc, s, "systemCatalogs", str, "spec.systemCatalogs", "read")
    if catalogs not in SYSTEM_CATALOG_MODES:
        raise doc.error("spec.systemCatalogs", f"{catalogs!r} is not one of {', '.join(SYSTEM_CATALOG_MODES)}")
    return AccessPolicy(
        name=doc.name,
        namespace=doc.namespace,
        connection=connection,
        subjects=subjects,
        rules=rules,
        default_action=default_action,
        mode=mode,
        limits=limits,
        approval=approval,
        allowed_functions=allowed_functions,
        system_catalogs=catalogs,
    )
