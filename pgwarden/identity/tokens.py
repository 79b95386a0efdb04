"""JWT checks that need no network: header screening and claim verification with PyJWT.

The order matters. The header is screened before any key is looked up (so `alg: none` or
`HS256` never reaches key selection), the verifying algorithm is pinned to the one the key was
selected for (so a token cannot pick its own verification method), and the issuer's allowlist
is applied on top. Reasons in `TokenRejected` are for the person holding the token: they say
what to fix and never include key material or the token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from jwt import PyJWK

from pgwarden.identity.config import ALLOWED_ALGORITHMS, OIDCIssuerConfig

MAX_TOKEN_BYTES = 16 * 1024


class TokenRejected(Exception):
    """Why a token was refused, worded for its holder."""


@dataclass(frozen=True)
class Unverified:
    """What a token claims about itself before any signature check; used only to route it."""

    alg: str
    kid: str | None
    issuer: str


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token[:2] == "ey"


def peek(token: str) -> Unverified:
    """Read the header and `iss` without trusting them (routing only)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("the token is too large")
    if not looks_like_jwt(token):
        raise TokenRejected("the password is not a JWT (expected header.payload.signature)")
    try:
        header = jwt.get_unverified_header(token)
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise TokenRejected("the token is malformed") from e
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenRejected("the token header names no algorithm")
    if alg.lower() == "none":
        raise TokenRejected("unsigned tokens (alg none) are never accepted")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenRejected(f"algorithm {alg} is not accepted; tokens must be signed with an asymmetric key "
                            f"({', '.join(ALLOWED_ALGORITHMS)})")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRejected("the token's kid is not a string")
    iss = payload.get("iss")
    return Unverified(alg=alg, kid=kid, issuer=iss if isinstance(iss, str) else "")


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError):
        return "an invalid time"


def verify(token: str, head: Unverified, keys: Sequence[PyJWK], config: OIDCIssuerConfig) -> Mapping[str, Any]:
    """Verify signature and claims against `keys` (already selected for head.kid/head.alg)."""
    if head.alg not in config.algorithms:
        raise TokenRejected(f"issuer {config.issuer} is configured for {', '.join(config.algorithms)}, "
                            f"not {head.alg}")
    if not keys:
        raise TokenRejected(f"no signing key of issuer {config.issuer} matches the token (kid "
                            f"{head.kid!r}, {head.alg}); the key may have been retired — get a fresh token")
    options: Any = {"require": ["exp", "iss", "aud"], "verify_exp": True, "verify_nbf": True,
                               "verify_iat": False}
    last: Exception | None = None
    for key in keys:
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[head.alg],
                audience=list(config.audiences),
                issuer=config.issuer,
                leeway=config.leeway,
                options=options,
            )
        except jwt.InvalidSignatureError as e:
            last = e
            continue
        except jwt.ExpiredSignatureError as e:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            raise TokenRejected(f"the token expired at {_when(exp)}; get a fresh token") from e
        except jwt.ImmatureSignatureError as e:
            nbf = jwt.decode(token, options={"verify_signature": False}).get("nbf")
            raise TokenRejected(f"the token is not valid before {_when(nbf)}; check the clocks") from e
        except jwt.InvalidAudienceError as e:
            raise TokenRejected(f"the token is not meant for this proxy: its audience must include one of "
                                f"{', '.join(config.audiences)}") from e
        except jwt.InvalidIssuerError as e:
            raise TokenRejected(f"the token's issuer is not {config.issuer}") from e
        except jwt.MissingRequiredClaimError as e:
            raise TokenRejected(f"the token lacks the required {e.claim!r} claim") from e
        except jwt.PyJWTError as e:
            raise TokenRejected(f"the token is invalid ({type(e).__name__})") from e
        return claims
    raise TokenRejected(f"the token's signature does not verify with the keys of {config.issuer}") from last
