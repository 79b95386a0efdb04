"""Signing keys of one issuer: fetched from a file, a URL or OIDC discovery, cached, refreshed.

Tokens name their key by `kid`. A `kid` we have not seen usually means the issuer rotated its
keys, so we refetch — but at most once per `refresh_min_interval`, because anyone can send a
token with a random `kid` and must not be able to turn the proxy into a load generator against
the identity provider. Concurrent lookups share one fetch. A failed refresh keeps the old keys:
an IdP outage should not log everybody out whose key is still cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from pgwarden.identity.config import OIDCIssuerConfig

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 10.0
MAX_DOCUMENT_BYTES = 1 << 20


def _read_text(path: str) -> str:
    """Small local files (a JWKS, a projected token): read inline, they live on a local volume."""
    return Path(path).read_text()


class KeySetUnavailable(Exception):
    """The issuer's keys could not be loaded; the message says from where and why."""


@dataclass
class _Loaded:
    keys: list[Mapping[str, Any]] = field(default_factory=list)
    fetched_at: float = float("-inf")
    attempted_at: float = float("-inf")


def parse_jwks(doc: Any, source: str) -> list[Mapping[str, Any]]:
    """The `keys` of a JWKS document, signing keys only (`use` absent or `sig`)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise KeySetUnavailable(f"{source} is not a JWKS document (no 'keys' list)")
    keys = [k for k in doc["keys"] if isinstance(k, Mapping) and k.get("use", "sig") == "sig"]
    # symmetric keys never verify anything here; dropping them keeps HMAC out for good
    return [k for k in keys if k.get("kty") != "oct"]


def key_matches(jwk: Mapping[str, Any], kid: str | None, alg: str) -> bool:
    """Whether this JWK may verify a token with header (kid, alg)."""
    if kid is not None and jwk.get("kid") != kid:
        return False
    if jwk.get("alg") and jwk["alg"] != alg:
        return False
    kty = jwk.get("kty")
    family = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}.get(alg[:2])
    return kty == family


def to_pyjwk(jwk: Mapping[str, Any], alg: str) -> PyJWK | None:
    try:
        return PyJWK(dict(jwk), algorithm=alg)
    except PyJWKError:
        return None


class JWKSCache:
    """The key set of one issuer. `fetch` is injectable so the cache logic is testable alone."""

    def __init__(
        self,
        config: OIDCIssuerConfig,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._state = _Loaded()
        self._lock = asyncio.Lock()
        self._last_error = ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def candidates(self, kid: str | None, alg: str) -> list[PyJWK]:
        """Keys that may verify (kid, alg); refetches on a miss or when stale, rate-limited.

        Raises KeySetUnavailable only when no key set was ever loaded."""
        stale = self._clock() - self._state.fetched_at > self.config.jwks_max_age
        found = self._select(kid, alg)
        if not found or stale:
            await self._refresh()
            if self._state.fetched_at == float("-inf"):
                raise KeySetUnavailable(self._last_error or "keys not loaded")
            found = self._select(kid, alg)
        return found

    def _select(self, kid: str | None, alg: str) -> list[PyJWK]:
        out = []
        for jwk in self._state.keys:
            if key_matches(jwk, kid, alg):
                k = to_pyjwk(jwk, alg)
                if k is not None:
                    out.append(k)
        return out

    async def _refresh(self) -> None:
        attempted = self._state.attempted_at
        async with self._lock:
            if self._state.attempted_at != attempted:
                return  # another task fetched while we waited; use its result
            now = self._clock()
            if now - self._state.attempted_at < self.config.refresh_min_interval:
                return
            self._state.attempted_at = now
            try:
                keys = await self._fetch()
            except KeySetUnavailable as e:
                self._last_error = str(e)
                log.warning("keys of issuer %s: %s (keeping %d cached keys)", self.config.issuer, e,
                            len(self._state.keys))
                return
            self._state.keys = keys
            self._state.fetched_at = now
            self._last_error = ""

    # --- I/O ---------------------------------------------------------------------------------

    async def _fetch(self) -> list[Mapping[str, Any]]:
        cfg = self.config
        if cfg.jwks_file:
            try:
                doc = json.loads(_read_text(cfg.jwks_file))
            except (OSError, ValueError) as e:
                raise KeySetUnavailable(f"cannot read JWKS file {cfg.jwks_file}: {e}") from e
            return parse_jwks(doc, cfg.jwks_file)
        url = cfg.jwks_url
        if cfg.discovery:
            disco_url = cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            disco = await self._get_json(disco_url)
            if not isinstance(disco, Mapping) or not isinstance(disco.get("jwks_uri"), str):
                raise KeySetUnavailable(f"{disco_url} has no jwks_uri")
            if disco.get("issuer") != cfg.issuer:
                # OpenID Connect Discovery 1.0 §4.3: a mismatch means we are talking to someone else
                raise KeySetUnavailable(f"{disco_url} names issuer {disco.get('issuer')!r}, not {cfg.issuer!r}")
            url = disco["jwks_uri"]
        return parse_jwks(await self._get_json(url), url)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._session_factory is not None:
                self._session = self._session_factory()
            else:
                ctx = ssl.create_default_context(cafile=self.config.ca_file or None)
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx),
                    timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                )
        return self._session

    async def _get_json(self, url: str) -> Any:
        headers = {"Accept": "application/json"}
        if self.config.token_file:
            try:
                headers["Authorization"] = "Bearer " + _read_text(self.config.token_file).strip()
            except OSError as e:
                raise KeySetUnavailable(f"cannot read token file {self.config.token_file}: {e.strerror}") from e
        try:
            async with self._client().get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise KeySetUnavailable(f"GET {url} answered HTTP {resp.status}")
                body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KeySetUnavailable(f"GET {url} failed: {e or type(e).__name__}") from e
        if len(body) > MAX_DOCUMENT_BYTES:
            raise KeySetUnavailable(f"GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError as e:
            raise KeySetUnavailable(f"GET {url}: not JSON") from e
