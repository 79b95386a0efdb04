"""The one Kubernetes REST client of the proxy and the operator: JSON over aiohttp, a bearer token,
a CA.

The operator uses it for the objects kopf does not manage for it (Secrets, ConfigMaps, statuses,
workloads, TokenReviews), the proxy's Kubernetes approval backend for ApprovalRequests and their
Events, and the proxy's TokenReview for the tokens it cannot check itself. Tests point it at
kmock's Kubernetes emulator; a pod uses its service account.

404 and 409 are normal in a retry-safe reconcile: `get` returns None on 404, `delete` returns
False, `apply` turns 409 into a patch. Every other answer of 400 and above is an `ApiError`.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """The API server answered with an error status; `status` is its HTTP code."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status
        self.body = body


class Conflict(ApiError):
    """409: the object exists already, or changed since it was read."""


class TokenUnreadable(OSError):
    """The bearer token file cannot be read (an OSError, as reading it always raised)."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(error.errno, f"cannot read the API token {path}: {error.strerror}")
        self.path = path
        self.strerror = error.strerror


@dataclass(frozen=True)
class ApiConfig:
    """Where the API server is and how this process proves who it is."""

    server: str
    token: str | None = None
    token_file: str | None = None  # re-read on every request (projected tokens rotate)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    default_namespace: str = "default"

    def bearer_token(self) -> str | None:
        """The token to send now: the file wins (a small tmpfs file kubelet rotates; reading it is instant)."""
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as e:
                raise TokenUnreadable(self.token_file, e) from e
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        """TLS for https servers (the CA file, else the system's), none for plain http."""
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str | None  # the HTTP reason phrase
    data: Any  # the decoded JSON body; None when it is empty or not JSON


def in_cluster_namespace() -> str:
    """The pod's namespace from its service account mount; "" outside a pod."""
    ns_file = IN_CLUSTER_DIR / "namespace"
    return ns_file.read_text().strip() if ns_file.exists() else ""


def in_cluster_server(host: str, port: str = "443") -> str:
    """The API server's URL from a pod's KUBERNETES_SERVICE_HOST / _PORT (an IPv6 address in brackets)."""
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def load_api_config() -> ApiConfig:
    """In-cluster service account when running in a pod, else the current kubeconfig context."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if host and port and (IN_CLUSTER_DIR / "token").exists():
        return ApiConfig(
            server=in_cluster_server(host, port),
            token_file=str(IN_CLUSTER_DIR / "token"),
            ca_file=str(IN_CLUSTER_DIR / "ca.crt"),
            default_namespace=in_cluster_namespace() or "default",
        )
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # not annotated upstream
    auth = (cfg.api_key or {}).get("authorization", "")
    return ApiConfig(
        server=cfg.host,
        token=auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else None,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        insecure=not cfg.verify_ssl,
    )


def path(
    api: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
) -> str:
    """/api/v1/... for core (`api="v1"`), /apis/GROUP/VERSION/... otherwise. The namespace and the
    name are one path segment each, whatever they hold (a "/" or ".." never reaches another path)."""
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    out = base + (f"/namespaces/{quote(namespace, safe='')}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{quote(name, safe='')}"
    if sub:
        out += f"/{sub}"
    return out


class Kube:
    """JSON requests to one API server. `timeout` bounds each request (None: aiohttp's default);
    `session_factory` replaces the HTTP session (its own TLS and timeouts), for tests."""

    def __init__(
        self,
        config: ApiConfig,
        *,
        timeout: float | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self.config = config
        self.timeout = timeout
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._session_factory is not None:
                self._session = self._session_factory()
            else:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=self.config.ssl_context())
                )
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": JSON}
        token = self.config.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def url(self, url_path: str, params: Mapping[str, str] | None = None) -> str:
        return self.config.server.rstrip("/") + url_path + (("?" + urlencode(params)) if params else "")

    async def send(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        content_type: str = JSON,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request, whatever its status; callers that want errors as exceptions use `request`."""
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type
        url = self.url(url_path, params)
        session = self._sess()
        # without a timeout of our own, the session's (aiohttp: 5 minutes) applies
        call = (
            session.request(method, url, json=body, headers=headers)
            if self.timeout is None
            else session.request(
                method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        )
        async with call as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            return Answer(resp.status, resp.reason, data)

    async def request(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        content_type: str = JSON,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One request; the decoded answer, or ApiError (Conflict on 409) for a status of 400 and above."""
        answer = await self.send(method, url_path, body, content_type, params)
        if answer.status >= 400:
            data = answer.data
            msg = data.get("message") if isinstance(data, dict) else answer.reason
            if answer.status == 409:
                raise Conflict(409, str(msg), data)
            raise ApiError(answer.status, str(msg), data)
        return answer.data

    async def get(self, url_path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", url_path)  # type: ignore[no-any-return]
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, url_path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        try:
            data = await self.request(
                "GET", url_path, params={"labelSelector": label_selector} if label_selector else None
            )
        except ApiError as e:
            if e.status == 404:
                return []
            raise
        return list((data or {}).get("items") or [])

    async def create(self, url_path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", url_path, dict(body))  # type: ignore[no-any-return]

    async def patch(self, url_path: str, body: Any, content_type: str = MERGE_PATCH) -> dict[str, Any] | None:
        """Merge-patch an object; None when it does not exist (any more)."""
        try:
            return await self.request("PATCH", url_path, body, content_type)  # type: ignore[no-any-return]
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def delete(self, url_path: str) -> bool:
        try:
            await self.request("DELETE", url_path)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def apply(self, collection_path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch when it exists (409). Every managed object always carries all
        its keys, so a merge patch leaves nothing stale behind."""
        try:
            return await self.create(collection_path, obj)
        except Conflict:
            name = obj["metadata"]["name"]
            patched = await self.patch(f"{collection_path}/{quote(name, safe='')}", obj)
            if patched is None:  # deleted between the two calls: try once more
                return await self.create(collection_path, obj)
            return patched

    async def watch(self, url_path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Watch events of a collection as dicts, until the server ends the stream."""
        async with self._sess().get(
            self.url(url_path, {**params, "watch": "true"}),
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, (await resp.text())[:500])
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
