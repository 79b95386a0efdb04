"""Typed handler functions; `pgwarden.operator.main` registers them with kopf."""
