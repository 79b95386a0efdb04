"""Approvals: a `review` statement waits for a human (docs/approvals.md).

The proxy's gate uses `ApprovalSpec`, `ApprovalBackend` (create / wait / withdraw / consume /
executed) and `backend_from_config`; the two backends are `LocalApprovals` (a SQLite file,
decided with `pgwarden approvals approve ID --as NAME`) and `KubernetesApprovals`
(ApprovalRequest objects, decided with `kubectl patch`).
"""

from pgwarden.approvals.config import backend_from_config
from pgwarden.approvals.kubernetes import KubeApi, KubeClient, KubernetesApprovals
from pgwarden.approvals.local import LocalApprovals
from pgwarden.approvals.model import (
    ApprovalBackend,
    ApprovalError,
    ApprovalSpec,
    Outcome,
    Ticket,
    statement_hash,
)
from pgwarden.approvals.notify import Notifier

__all__ = [
    "ApprovalBackend",
    "ApprovalError",
    "ApprovalSpec",
    "KubeApi",
    "KubeClient",
    "KubernetesApprovals",
    "LocalApprovals",
    "Notifier",
    "Outcome",
    "Ticket",
    "backend_from_config",
    "statement_hash",
]
