"""Masking strategies: how one clear text value becomes what the agent may see.

Every strategy maps text to text, or to None for SQL NULL. They never raise: a value that does
not fit a strategy's shape (an "email" without '@', a "last4" with too few digits) is redacted
whole rather than partly shown, because a half-applied mask is a leak.

The replacement never depends on the value's length, so the mask does not tell how long the
secret was (`partial` shows a fixed number of characters at each end and a fixed run of '*').
`hash` is a keyed HMAC-SHA256 (the key comes from hashKeyEnv / hashKeyFile): the same clear
value gives the same token, so an agent can still join, count distinct or GROUP BY on its side
without ever seeing the value, and without the key cannot build a dictionary of tokens.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

STRATEGIES = ("redact", "partial", "email", "last4", "hash", "null")

REDACTED = "[redacted]"
"""The fixed text that replaces a whole value (also used for derived expressions)."""

HASH_CHARS = 16
"""Hex characters kept from the HMAC: 64 bits, enough that joins on tokens do not collide."""


def redact(value: str) -> str:
    return REDACTED


def partial(value: str) -> str:
    """First and last two characters around a fixed '****'; short values are redacted whole."""
    if len(value) < 8:
        return REDACTED
    return f"{value[:2]}****{value[-2:]}"


def email(value: str) -> str:
    """`ada@example.com` -> `a***@example.com`: the domain stays, useful for debugging routing."""
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or "." not in domain:
        return REDACTED
    return f"{local[0]}***@{domain}"


def last4(value: str) -> str:
    """`4111 1111 1111 1111` -> `****1111`; fewer than 8 digits is redacted (4 would be half)."""
    digits = [c for c in value if c.isdigit()]
    if len(digits) < 8:
        return REDACTED
    return "****" + "".join(digits[-4:])


def null(value: str) -> None:
    return None


def make_hash(key: bytes) -> Callable[[str], str]:
    """A deterministic keyed token for one MaskingRule's key."""

    def hash_value(value: str) -> str:
        digest = hmac.new(key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return digest[:HASH_CHARS]

    return hash_value


def strategy_function(name: str, hash_key: bytes | None) -> Callable[[str], str | None]:
    """The function for a strategy name; 'derived' (an expression over a masked column) redacts."""
    if name in ("redact", "derived"):
        return redact
    if name == "partial":
        return partial
    if name == "email":
        return email
    if name == "last4":
        return last4
    if name == "null":
        return null
    if name == "hash":
        if not hash_key:
            # load_masking refuses a hash column without a key; stay closed if that is bypassed
            return redact
        return make_hash(hash_key)
    raise ValueError(f"unknown masking strategy {name!r}")
