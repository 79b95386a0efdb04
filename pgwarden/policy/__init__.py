"""The policy engine: AccessPolicy documents in, allow / review / deny decisions out.

Pure code (no I/O, no database): the proxy and `pgwarden policy explain` use the same path.

    policies = load_policies(docs)                       # ResourceError on any mistake
    subject = policies.for_identity(identity, "shop")     # once per authenticated session
    session = SessionState(search_path=("public",))      # once per client connection
    decision = subject.decide(sql, session)              # per Query / Parse text
    if decision.forwarded: forward(); session.apply(decision)   # the proxy: once the server confirms
    else: send(decision.as_error())
"""

from pgwarden.policy.analysis import Analysis, analyze
from pgwarden.policy.engine import Decision, SessionState, SubjectPolicy
from pgwarden.policy.model import OPERATIONS, AccessPolicy, ApprovalSettings, Limits
from pgwarden.policy.policyset import PolicySet, load_policies

__all__ = [
    "OPERATIONS",
    "AccessPolicy",
    "Analysis",
    "ApprovalSettings",
    "Decision",
    "Limits",
    "PolicySet",
    "SessionState",
    "SubjectPolicy",
    "analyze",
    "load_policies",
]
