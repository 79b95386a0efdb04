"""A small async Kubernetes API client for the operator's own objects (Secrets, ConfigMaps,
statuses of other objects, workloads).

kopf talks to the API for its watches and handler patches; the handlers need a few more calls,
and this module is the one place they go through. 404 and 409 are normal in a retry-safe
reconcile: `get` returns None on 404, `delete` returns False, `apply` turns 409 into a patch.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from pgwarden.k8s.names import API_VERSION

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PGW = API_VERSION  # tests build paths with it


class ApiError(Exception):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status
        self.body = body


class Conflict(ApiError):
    pass


@dataclass(frozen=True)
class ApiConfig:
    server: str
    token: str | None = None
    token_file: str | None = None  # re-read on every request (projected tokens rotate)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    default_namespace: str = "default"


def load_api_config() -> ApiConfig:
    """In-cluster service account when running in a pod, else the current kubeconfig context."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if host and port and (IN_CLUSTER_DIR / "token").exists():
        ns_file = IN_CLUSTER_DIR / "namespace"
        return ApiConfig(
            server=f"https://{host}:{port}",
            token_file=str(IN_CLUSTER_DIR / "token"),
            ca_file=str(IN_CLUSTER_DIR / "ca.crt"),
            default_namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
        )
    from kubernetes import client, config  # type: ignore[import-untyped]

    cfg = client.Configuration()
    config.load_kube_config(client_configuration=cfg)
    auth = (cfg.api_key or {}).get("authorization", "")
    return ApiConfig(
        server=cfg.host,
        token=auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else None,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        insecure=not cfg.verify_ssl,
    )


def path(api: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """/api/v1/... for core (`api="v1"`), /apis/GROUP/VERSION/... otherwise."""
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    out = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{quote(name)}"
    if sub:
        out += f"/{sub}"
    return out


class Kube:
    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.config.ca_file)
        if self.config.cert_file and self.config.key_file:
            ctx.load_cert_chain(self.config.cert_file, self.config.key_file)
        if self.config.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _token(self) -> str | None:
        if self.config.token_file:  # a small tmpfs file kubelet rotates; reading it is instant
            return Path(self.config.token_file).read_text().strip()
        return self.config.token

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl()))
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _request(self, method: str, url_path: str, body: Any = None, content_type: str = "application/json",
                       params: Mapping[str, str] | None = None) -> Any:
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type
        url = self.config.server.rstrip("/") + url_path + (("?" + urlencode(params)) if params else "")
        async with self._sess().request(method, url, json=body, headers=headers) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            if resp.status >= 400:
                msg = data.get("message") if isinstance(data, dict) else resp.reason
                if resp.status == 409:
                    raise Conflict(409, str(msg), data)
                raise ApiError(resp.status, str(msg), data)
            return data

    async def get(self, url_path: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", url_path)  # type: ignore[no-any-return]
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, url_path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        try:
            data = await self._request("GET", url_path, params={"labelSelector": label_selector} if label_selector else None)
        except ApiError as e:
            if e.status == 404:
                return []
            raise
        return list((data or {}).get("items") or [])

    async def create(self, url_path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request("POST", url_path, dict(body))  # type: ignore[no-any-return]

    async def patch(self, url_path: str, body: Any, content_type: str = MERGE_PATCH) -> dict[str, Any] | None:
        """Merge-patch an object; None when it does not exist (any more)."""
        try:
            return await self._request("PATCH", url_path, body, content_type)  # type: ignore[no-any-return]
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def delete(self, url_path: str) -> bool:
        try:
            await self._request("DELETE", url_path)
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
            patched = await self.patch(f"{collection_path}/{quote(name)}", obj)
            if patched is None:  # deleted between the two calls: try once more
                return await self.create(collection_path, obj)
            return patched

    async def watch(self, url_path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Watch events of a collection as dicts, until the server ends the stream."""
        url = self.config.server.rstrip("/") + url_path + "?" + urlencode({**params, "watch": "true"})
        async with self._sess().get(url, headers=self._headers(),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, (await resp.text())[:500])
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
