"""`pgwarden audit verify PATH` and `pgwarden replay SESSION` (wired in pgwarden.cli)."""

from __future__ import annotations

import argparse
import sys

from pgwarden.audit.chain import is_head_hash, verify_path
from pgwarden.audit.replay import find_recording, load_events, recordings_dir, render
from pgwarden.errors import UserError
from pgwarden.textsafe import Escaper, json_dumps


def verify_main(args: argparse.Namespace) -> int:
    """Exit 0 if the chain is intact, 1 with one line per problem (file:line: what) if not."""
    expect = getattr(args, "expect_head", None)
    if expect is not None:
        expect = expect.strip().lower()
        if not is_head_hash(expect):
            raise UserError("--expect-head takes a full record hash (64 hex digits), as `pgwarden audit verify` "
                            "prints after 'head' or as the 'hash' of the newest line shipped off the node")
    try:
        report = verify_path(args.path, expect_head=expect)
    except FileNotFoundError:
        raise UserError(f"no audit log at {args.path}") from None
    except OSError as e:
        raise UserError(f"cannot read {args.path}: {e.strerror}") from None
    safe = Escaper()  # file names and quoted record content are printed: escape them like all agent text
    for note in report.notes:
        print(f"note: {safe(note)}")
    for problem in report.problems:
        print(safe(problem), file=sys.stderr)
    if safe.note():
        print(safe.note(), file=sys.stderr)
    if report.ok:
        span = f"seq {report.first_seq}..{report.last_seq}" if report.records else "empty"
        # the full head: keep it off the node and pass it back as --expect-head next time
        print(f"ok: {report.records} records, chain intact ({span}), head {report.last_hash or '-'}")
        return 0
    print(f"FAILED: {len(report.problems)} problem(s) in {report.records} records; the audit log was "
          f"altered — keep a copy and compare with the stdout/OpenTelemetry copies", file=sys.stderr)
    return 1


def replay_main(args: argparse.Namespace) -> int:
    path = find_recording(args.session, recordings_dir(getattr(args, "dir", None)))
    events = load_events(path)
    if getattr(args, "json", False):
        # readable non-ASCII text, but C1 controls and bidi overrides as \uXXXX like the C0 ones
        sys.stdout.write(json_dumps({"recording": str(path), "events": events}, indent=1) + "\n")
        return 0
    safe = Escaper()
    sys.stdout.write(render(events, safe))
    note = safe.note()
    if note:
        sys.stdout.write(note + "\n")
    return 0
