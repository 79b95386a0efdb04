"""pgwarden: access control, masking, approvals and audit for AI agents that talk to PostgreSQL."""

from pgwarden.compiled import install_switch

install_switch()  # PGWARDEN_PURE_PYTHON=1: the proxy's hot modules from their .py files (compiled.py)
