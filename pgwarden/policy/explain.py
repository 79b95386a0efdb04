"""`pgwarden policy explain`: the proxy's decision for one text, as JSON, without a database.

It runs exactly what the proxy runs — load_policies, for_identity, SubjectPolicy.decide on a
fresh SessionState with the default search_path (public) and the server version given with
`--server-version` (default: the newest pgwarden knows; the proxy learns it at login) — so a
policy author can check a rule before rolling it out. Exit status: 0 allow, 1 deny, 3 review
(2 is a usage or configuration error, printed by the CLI).
"""

from __future__ import annotations

import argparse
import sys

from pgwarden.errors import UserError
from pgwarden.policy.catalog_names import known_version
from pgwarden.policy.engine import SessionState
from pgwarden.policy.policyset import load_policies
from pgwarden.resources import Document, ResourceError, load_documents, of_kind
from pgwarden.subjects import Identity
from pgwarden.textsafe import json_dumps

EXIT_CODES = {"allow": 0, "deny": 1, "review": 3}


def main(args: argparse.Namespace) -> int:
    try:
        docs = load_documents(args.config)
        policies = load_policies(docs)
    except ResourceError as e:
        raise UserError(str(e)) from e
    connection = args.connection or _only_connection(docs, policies.connections)
    sa = args.service_account or ""
    if sa and sa.count("/") != 1:
        raise UserError(f"--service-account must be NAMESPACE/NAME, got {sa!r}")
    identity = Identity(subject=args.user, groups=tuple(args.group), service_account=sa, method="explain")
    decision = policies.for_identity(identity, connection).decide(
        args.sql, SessionState(server_version=getattr(args, "server_version", 0) or 0)
    )
    out = {
        "identity": identity.as_dict(),
        "connection": connection,
        "serverVersion": known_version(getattr(args, "server_version", 0) or 0),
        **decision.to_json(),
    }
    # the statement is often one an agent sent: C1 and bidi controls as \uXXXX, like the C0 ones
    sys.stdout.write(json_dumps(out, indent=2) + "\n")
    return EXIT_CODES[decision.action]


def _only_connection(docs: list[Document], from_policies: tuple[str, ...]) -> str:
    names = sorted({d.name for d in of_kind(docs, "DatabaseConnection")} | set(from_policies))
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError(
            "the configuration has no DatabaseConnection or AccessPolicy; pass --config with your policies"
        )
    raise UserError(
        f"the configuration names several connections ({', '.join(names)}); choose one with --connection"
    )
