"""`pgwarden policy test`: replay audit logs or run policy unit cases against candidate policies.

The I/O shell around pgwarden.policy.testing: it reads the configuration (the same loader the
proxy uses), the audit files (rotated siblings included) or the cases file, and prints the
report. Statements, identities and reasons come from agents or from files: everything printed
to a terminal goes through pgwarden.textsafe.

Exit status: 0 nothing to report, 1 a decision changed in the `--fail-on` direction (replay)
or a case failed (cases), 2 a usage, configuration or file error (printed by the CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pgwarden.audit.chain import chain_files, read_lines, verify_lines
from pgwarden.errors import UserError
from pgwarden.policy.policyset import load_policies
from pgwarden.policy.testing import (
    CATEGORY_ORDER,
    CATEGORY_TITLES,
    Candidate,
    CaseFileError,
    CaseResult,
    Group,
    Outcome,
    Replayed,
    counts,
    fails,
    group_changes,
    parse_cases,
    replay,
    run_cases,
)
from pgwarden.resources import Document, ResourceError, load_documents, of_kind
from pgwarden.textsafe import Escaper, json_dumps


def main(args: argparse.Namespace) -> int:
    docs, candidate = load_candidate(args.config)
    if args.cases:
        return _cases_main(args, docs, candidate)
    return _replay_main(args, candidate)


def load_candidate(paths: Sequence[str]) -> tuple[list[Document], Candidate]:
    try:
        docs = load_documents(list(paths))
        policies = load_policies(docs)
    except ResourceError as e:
        raise UserError(str(e)) from e
    search_path: tuple[str, ...] = ("public",)
    default_action = "deny"
    for pc in of_kind(docs, "ProxyConfig")[:1]:  # the proxy pins its searchPath; defaultAction without policy
        sp = pc.spec.get("searchPath")
        if isinstance(sp, list) and sp and all(isinstance(x, str) and x for x in sp):
            search_path = tuple(sp)
        if pc.spec.get("defaultAction") == "allow":
            default_action = "allow"
    return docs, Candidate(policies, search_path=search_path, default_action=default_action)


# -- replay -----------------------------------------------------------------------------------


def read_audit(path: str) -> tuple[list[tuple[str, Mapping[str, Any]]], list[str]]:
    """The records of one audit chain (PATH.N … PATH.1, PATH), oldest first, and notes on it."""
    files = chain_files(path)
    if not files:
        raise UserError(f"no audit log at {path}; pass the path the ProxyConfig's audit.path names")
    notes: list[str] = []
    records: list[tuple[str, Mapping[str, Any]]] = []
    bad = 0
    try:
        lines = list(read_lines(files))
    except OSError as e:
        raise UserError(f"cannot read the audit log {path}: {e.strerror}") from None
    for loc, raw in lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append((str(loc), rec))
    report = verify_lines(iter(lines))
    if not report.ok:
        notes.append(
            f"the audit chain of {path} does not verify ({len(report.problems)} problem(s), first: "
            f"{report.problems[0]}); its records were replayed as they are — run "
            f"`pgwarden audit verify {path}` for the details"
        )
    if bad:
        notes.append(f"{bad} line(s) of {path} are not JSON and were skipped")
    if len(files) > 1:
        notes.append(f"{path}: {len(files)} files read ({', '.join(f.name for f in files)})")
    return records, notes


def _replay_main(args: argparse.Namespace, candidate: Candidate) -> int:
    if not args.audit:
        raise UserError("pass --audit PATH (an audit log) or -f CASES.yaml (policy unit cases)")
    records: list[tuple[str, Mapping[str, Any]]] = []
    notes: list[str] = []
    for path in args.audit:
        recs, n = read_audit(path)
        records.extend(recs)
        notes.extend(n)
    results = replay(records, candidate, server_version=args.server_version or 0)
    if not any(r.get("serverVersion") for _, r in records if r.get("event") == "session.start"):
        notes.append(
            "the audit log does not record the server's version: statements were decided for "
            + (
                f"PostgreSQL {args.server_version}"
                if args.server_version
                else "the newest release pgwarden knows (set it with --server-version)"
            )
        )
    groups = group_changes(results)
    failed = fails(results, args.fail_on)
    if args.json:
        out = {
            "counts": counts(results),
            "failOn": args.fail_on,
            "failed": failed,
            "notes": notes,
            "changes": [g.to_json() for g in groups],
            "notComparable": [
                {
                    "where": r.where,
                    "session": r.session,
                    "stmt": r.stmt,
                    "sql": r.sql,
                    "reason": r.not_comparable,
                }
                for r in results
                if r.category == "not-comparable"
            ],
        }
        sys.stdout.write(json_dumps(out, indent=2) + "\n")
    else:
        safe = Escaper()
        for line in render_replay(results, groups, notes, safe):
            print(line)
        if safe.note():
            print(safe.note())
    return 1 if failed else 0


def _indent(text: str, prefix: str) -> str:
    return ("\n" + prefix).join(text.splitlines() or [""])


def render_replay(
    results: Sequence[Replayed], groups: Sequence[Group], notes: Sequence[str], safe: Escaper
) -> Iterator[str]:
    c = counts(results)
    sessions = len({r.session for r in results})
    yield f"replayed {c['replayed']} statement(s) of {sessions} session(s) against the candidate policies"
    for n in notes:
        yield f"note: {safe(n)}"
    for cat in CATEGORY_ORDER:
        mine = [g for g in groups if g.category == cat]
        if not mine:
            continue
        yield ""
        yield f"{CATEGORY_TITLES[cat]}: {c[cat]} statement(s) in {len(mine)} group(s)"
        for g in mine:
            ex = g.example
            more = f", {g.texts} distinct texts" if g.texts > 1 else ""
            yield f"  [{g.count}x{more}] {_indent(safe(ex.sql, multiline=True), '         ')}"
            yield f"      {_label(g.old, safe)}  ->  {_label(g.new, safe)}"
            if g.new.reason and g.new.action != "allow":
                yield f"      why: {safe(g.new.reason)}"
            yield (
                f"      who: {', '.join(safe(s) for s in g.subjects)} on {safe(ex.connection)}; first at "
                f"{safe(ex.where)} (session {safe(ex.session)}, stmt {safe(ex.stmt)})"
            )
            for p in g.params:
                yield "      params: " + ", ".join("NULL" if v is None else repr(safe(v)) for v in p)
    nc = [r for r in results if r.category == "not-comparable"]
    if nc:
        yield ""
        yield f"Not comparable: {len(nc)} statement(s) (refused apart from the policy, or not rebuildable)"
        for r in nc[:20]:
            yield f"  {safe(r.where)}: {safe(r.not_comparable)}"
            yield f"      {_indent(safe(r.sql, multiline=True), '      ')}"
        if len(nc) > 20:
            yield f"  … and {len(nc) - 20} more (--json lists them all)"
    yield ""
    yield ("summary: " + ", ".join(f"{c[k]} {k}" for k in (*CATEGORY_ORDER, "unchanged", "not-comparable")))


def _label(o: Outcome, safe: Escaper) -> str:
    return safe(o.label())


# -- cases ------------------------------------------------------------------------------------


def _case_lines(text: str) -> list[int]:
    """1-based line of each item of the top-level `cases:` list (for reports)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, v in node.value:
        if getattr(k, "value", None) == "cases" and isinstance(v, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in v.value]
    return []


def _only_connection(docs: list[Document], candidate: Candidate) -> str:
    names = {d.name for d in of_kind(docs, "DatabaseConnection")} | set(candidate.policies.connections)
    return next(iter(names)) if len(names) == 1 else ""


def _cases_main(args: argparse.Namespace, docs: list[Document], candidate: Candidate) -> int:
    path = args.cases
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read the cases file {path}: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
        cases = parse_cases(
            doc,
            default_connection=_only_connection(docs, candidate),
            default_server_version=args.server_version or 0,
            lines=_case_lines(text),
        )
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    except CaseFileError as e:
        raise UserError(f"{path}: {e}") from None
    results = run_cases(cases, candidate)
    failed = [r for r in results if not r.passed]
    if args.json:
        sys.stdout.write(
            json_dumps(
                {
                    "passed": len(results) - len(failed),
                    "failed": len(failed),
                    "cases": [r.to_json() for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    else:
        safe = Escaper()
        for line in render_cases(results, path, safe):
            print(line)
        if safe.note():
            print(safe.note())
    return 1 if failed else 0


def render_cases(results: Sequence[CaseResult], path: str, safe: Escaper) -> Iterator[str]:
    for r in results:
        if r.passed:
            continue
        c = r.case
        yield f"FAIL {safe(path)}:{safe(c.where)}: {safe(c.name)}"
        yield f"  statement: {_indent(safe(c.sql, multiline=True), '             ')}"
        who = [f"user {c.identity.subject}"]
        if c.identity.groups:
            who.append("groups " + ", ".join(c.identity.groups))
        if c.identity.service_account:
            who.append(f"serviceAccount {c.identity.service_account}")
        yield f"  identity:  {safe('; '.join(who))} on {safe(c.connection)}"
        for i, s in enumerate(c.setup, 1):
            yield f"  setup {i}:   {_indent(safe(s, multiline=True), '             ')}"
        expected = c.expect + (f" by {c.rule}" if c.rule is not None else "")
        yield f"  - expected: {safe(expected)}"
        yield f"  + got:      {safe(r.got.label())}"
        if r.got.reason and r.got.action != "allow":
            yield f"    why: {safe(r.got.reason)}"
        yield f"    ({safe(r.failure)})"
        yield ""
    passed = sum(1 for r in results if r.passed)
    verdict = "ok" if passed == len(results) else "FAILED"
    yield f"{verdict}: {len(results)} case(s), {passed} passed, {len(results) - passed} failed"
