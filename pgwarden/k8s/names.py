"""The names Kubernetes knows pgwarden by: API group and version, kinds and their plurals,
annotations and labels.

The proxy and the operator both read and write these exact strings, and so do `crds/`, the chart
(`charts/pgwarden/templates/webhook.yaml`, RBAC) and the docs: each is defined here once, so a
rename is one edit and a typo is an import error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, get_args

GROUP: Final = "pgwarden.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

# the custom resources (crds/); ProxyConfig is a configuration document only, never a CRD
Kind = Literal["DatabaseConnection", "AccessPolicy", "MaskingRule", "ApprovalRequest"]
DocumentKind = Literal[Kind, "ProxyConfig"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
DOCUMENT_KINDS: Final[tuple[DocumentKind, ...]] = get_args(DocumentKind)

Plural = Literal["databaseconnections", "accesspolicies", "maskingrules", "approvalrequests"]
DATABASE_CONNECTIONS: Final = "databaseconnections"
ACCESS_POLICIES: Final = "accesspolicies"
MASKING_RULES: Final = "maskingrules"
APPROVAL_REQUESTS: Final = "approvalrequests"
PLURALS: Final[Mapping[Kind, Plural]] = {
    "DatabaseConnection": DATABASE_CONNECTIONS,
    "AccessPolicy": ACCESS_POLICIES,
    "MaskingRule": MASKING_RULES,
    "ApprovalRequest": APPROVAL_REQUESTS,
}

# -- pods and workloads: what users write, and what the admission webhook stamps ------------------
ANNOTATION_INJECT: Final = f"{GROUP}/inject"  # value: the DatabaseConnection's name
ANNOTATION_INJECTED: Final = f"{GROUP}/injected"
ANNOTATION_SIDECAR_MODE: Final = f"{GROUP}/sidecar-mode"  # native (default) | container
ANNOTATION_INJECT_ENV: Final = f"{GROUP}/inject-env"  # "false" to leave the agents' env alone
ANNOTATION_MCP: Final = f"{GROUP}/mcp"  # "true" or a port: the MCP sidecar
ANNOTATION_PROXY_IMAGE: Final = f"{GROUP}/proxy-image"
LABEL_PROXY_VERSION: Final = f"{GROUP}/proxy-version"

# -- objects the operator owns (credentials Secret, bundle ConfigMap) ------------------------------
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_OPERATOR: Final = "pgwarden"
MANAGED_BY_PROXY: Final = "pgwarden-proxy"
LABEL_CONNECTION: Final = f"{GROUP}/connection"
ANNOTATION_CREDENTIALS_VERSION: Final = f"{GROUP}/credentials-version"
ANNOTATION_BUNDLE_DIGEST: Final = f"{GROUP}/bundle-digest"
ANNOTATION_SKIP_ROLE_CLEANUP: Final = f"{GROUP}/skip-role-cleanup"  # on a DatabaseConnection

# -- ApprovalRequest ------------------------------------------------------------------------------
LABEL_STATEMENT_HASH: Final = f"{GROUP}/statement-hash"
# stamped by the operator's admission webhook from the API server's userInfo; nobody else may set them
ANNOTATION_DECIDED_BY: Final = f"{GROUP}/decided-by"
# not "pgwarden.dev/approvals": kopf keeps handler progress in pgwarden.dev/<handler-id> annotations
ANNOTATION_APPROVED_BY: Final = f"{GROUP}/approved-by"
ANNOTATION_CREATED_BY: Final = f"{GROUP}/created-by"
# the Event `<request>.executed` claims an approval once (create is atomic)
EXECUTED_EVENT_SUFFIX: Final = ".executed"

# -- kopf's bookkeeping on our objects, and the webhook configurations it manages -----------------
KOPF_ANNOTATIONS_PREFIX: Final = GROUP
FINALIZER: Final = f"{GROUP}/finalizer"
WEBHOOK_CONFIGURATION: Final = GROUP  # name of the Mutating/ValidatingWebhookConfiguration
