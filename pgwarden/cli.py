"""`pgwarden` — one entry point for every verb (the README's command table).

Each verb's implementation lives with the package that owns it and is imported lazily (by the
small functions below, when that verb runs), so `pgwarden policy explain` does not pay for kopf
and the proxy does not import the operator. Every implementation is
`main(args: argparse.Namespace) -> int`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pgwarden.errors import UserError

Main = Callable[[argparse.Namespace], int | None]


def _proxy_main(args: argparse.Namespace) -> int | None:
    from pgwarden.proxy.main import main

    return main(args)


def _operator_main(args: argparse.Namespace) -> int | None:
    from pgwarden.operator.main import main

    return main(args)


def _policy_explain(args: argparse.Namespace) -> int | None:
    from pgwarden.policy.explain import main

    return main(args)


def _policy_testing_cli(args: argparse.Namespace) -> int | None:
    from pgwarden.policy.testing_cli import main

    return main(args)


def _operator_inject_cli(args: argparse.Namespace) -> int | None:
    from pgwarden.operator.inject_cli import main

    return main(args)


def _approvals_cli(args: argparse.Namespace) -> int | None:
    from pgwarden.approvals.cli import main

    return main(args)


def _audit_cli_verify(args: argparse.Namespace) -> int | None:
    from pgwarden.audit.cli import verify_main

    return verify_main(args)


def _audit_cli_replay(args: argparse.Namespace) -> int | None:
    from pgwarden.audit.cli import replay_main

    return replay_main(args)


def _proxy_lockouts_cli(args: argparse.Namespace) -> int | None:
    from pgwarden.proxy.lockouts_cli import main

    return main(args)


def _mcp_cli(args: argparse.Namespace) -> int | None:
    from pgwarden.mcp.cli import main

    return main(args)


def _demo_run(args: argparse.Namespace) -> int | None:
    from pgwarden.demo.run import main

    return main(args)


def _verb(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, target: Main, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(_target=target)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgwarden", description="Access control between AI agents and PostgreSQL.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = _verb(sub, "proxy", _proxy_main, "run the PostgreSQL proxy standalone")
    p.add_argument("--config", "-c", action="append", required=True, help="YAML file or folder (repeatable)")

    p = _verb(sub, "operator", _operator_main, "run the Kubernetes operator (kopf)")
    p.add_argument("--namespace", action="append", help="watch only these namespaces (default: cluster-wide)")
    p.add_argument("--standalone", action="store_true", help="no peering (single replica, tests)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")

    pol = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_verb", required=True)
    p = _verb(pol, "explain", _policy_explain, "print the decision for one statement as JSON")
    p.add_argument("--config", "-c", action="append", required=True, help="YAML file or folder (repeatable)")
    p.add_argument("--group", "-g", action="append", default=[], help="a group of the caller (repeatable)")
    p.add_argument("--user", "-u", default="explain", help="the caller's subject")
    p.add_argument("--service-account", default="", help="NAMESPACE/NAME of the caller's service account")
    p.add_argument("--connection", help="DatabaseConnection name (default: the only one)")
    p.add_argument("--server-version", type=int, default=0, metavar="MAJOR",
                   help="the server's PostgreSQL major version, e.g. 15 (default: the newest pgwarden knows)")
    p.add_argument("sql", help="the statement(s)")

    p = _verb(pol, "test", _policy_testing_cli,
              "replay audit logs (--audit) or run policy unit cases (-f) against candidate policies, "
              "without a database")
    p.add_argument("--config", "-c", action="extend", nargs="+", required=True,
                   help="YAML files or folders with the candidate policies (repeatable)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--audit", action="extend", nargs="+", metavar="PATH",
                      help="audit log(s) to replay; rotated siblings (PATH.1 …) are read too")
    what.add_argument("-f", "--file", dest="cases", metavar="CASES.yaml",
                      help="policy unit cases (see docs/policy.md), - for stdin")
    p.add_argument("--fail-on", choices=["any", "new-denials", "new-allows"], default="any",
                   help="replay: exit 1 when a decision changes in this direction (default: any)")
    p.add_argument("--server-version", type=int, default=0, metavar="MAJOR",
                   help="the server's major version when the audit log or a case does not give it "
                        "(default: the newest pgwarden knows)")
    p.add_argument("--json", action="store_true", help="the report as JSON")

    p = _verb(sub, "inject", _operator_inject_cli, "print a manifest with the proxy sidecar injected")
    p.add_argument("--connection", required=True, help="DatabaseConnection name")
    p.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    p.add_argument("--image", help="proxy image (default: the release's)")

    ap = sub.add_parser("approvals", help="the local approval queue (for development: names are self-declared)")
    ap_verbs = ap.add_subparsers(dest="approvals_verb", required=True)
    for name, help_ in (("list", "list approval requests (statements cut to one line)"),
                        ("show", "print one request with its full statement"),
                        ("approve", "print a request, then approve it"), ("deny", "print a request, then deny it")):
        p = _verb(ap_verbs, name, _approvals_cli, help_)
        p.add_argument("--db", help="the local approvals database (default: $PGWARDEN_APPROVALS_DB or ./pgwarden-data/approvals.db)")
        if name == "list":
            p.add_argument("--all", action="store_true", help="include decided requests")
            p.add_argument("--json", action="store_true")
        elif name == "show":
            p.add_argument("id", nargs="?", help="request id (local queue)")
            p.add_argument("--json", action="store_true")
            p.add_argument("-f", "--file", help="an ApprovalRequest as JSON or YAML (kubectl get … -o yaml), - for stdin")
        else:
            p.add_argument("id", help="request id")
            p.add_argument("--as", dest="as_user", required=True, help="your name (self-declared in local mode)")
            p.add_argument("--reason", default="")
            if name == "approve":
                p.add_argument("--without-preview", action="store_true",
                               help="approve although the request's preview failed or timed out")

    au = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_verb", required=True)
    p = _verb(au, "verify", _audit_cli_verify, "check the audit log's hash chain")
    p.add_argument("path", help="audit log file (rotated siblings are checked too)")
    p.add_argument("--expect-head", metavar="HASH",
                   help="a record hash kept off the node (an earlier 'head'): fail unless it is still in the chain")

    p = _verb(sub, "replay", _audit_cli_replay, "play back a recorded session")
    p.add_argument("session", help="session id or recording file")
    p.add_argument("--dir", help="recordings folder (default: $PGWARDEN_RECORDINGS or ./pgwarden-data/recordings)")
    p.add_argument("--json", action="store_true")

    lo = sub.add_parser("lockouts", help="identities locked out by limits.maxDenials on a proxy")
    lo_verbs = lo.add_subparsers(dest="lockouts_verb", required=True)
    for name, help_ in (("list", "list the lockouts in force"), ("lift", "lift one identity's lockout")):
        p = _verb(lo_verbs, name, _proxy_lockouts_cli, help_)
        p.add_argument("--state", help="the proxy's lockout file (ProxyConfig spec.lockouts.path; "
                                       "default ./pgwarden-data/lockouts.json)")
        if name == "list":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("subject", help="the locked-out identity's subject, as `list` shows it")
            p.add_argument("--as", dest="as_user", required=True, help="your name, for the audit record")

    p = _verb(sub, "mcp", _mcp_cli,
              "the gate as a Model Context Protocol server for agents (stdio, or streamable HTTP with --http)")
    p.add_argument("--config", "-c", action="append", help="the proxy's YAML file or folder: its listen address and database")
    p.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP on this loopback address (default: stdio)")
    p.add_argument("--host", help="the pgwarden proxy's host (default: from --config, $PGHOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="the pgwarden proxy's port (default: from --config, $PGPORT, 5432)")
    p.add_argument("--database", help="database name (default: from --config, $PGDATABASE)")
    p.add_argument("--user", help="user name sent at startup (default: $PGUSER or agent; a token names the identity)")
    p.add_argument("--token-env", default="PGWARDEN_TOKEN",
                   help="environment variable holding the agent's token (default: PGWARDEN_TOKEN)")
    p.add_argument("--token-file", help="file holding the agent's token, re-read for every connection "
                   "(e.g. a projected service-account token); neither set: no password (pod identity)")
    p.add_argument("--max-rows", type=int, default=500, help="rows returned per statement at most (default: 500)")

    p = _verb(sub, "demo", _demo_run, "run everything on an embedded PostgreSQL, no cluster")
    p.add_argument("--keep", action="store_true", help="leave the proxy running after the scripted session")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._target(args) or 0)
    except UserError as e:
        from pgwarden.textsafe import escape

        # messages can quote agent-supplied text (a request id, a name, a recording's content)
        print(f"pgwarden: {escape(str(e), multiline=True)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
