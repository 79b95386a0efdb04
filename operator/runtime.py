"""What every handler gets from main.py: the settings, the API client and per-connection locks."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from pgwarden.cache import BoundedCache
from pgwarden.k8s import client as kube
from pgwarden.k8s import names
from pgwarden.k8s.client import Kube
from pgwarden.k8s.merge import merge_into
from pgwarden.operator.settings import OperatorSettings


@dataclass
class Runtime:
    settings: OperatorSettings
    kube: Kube
    clock: Callable[[], float] = time.time
    # one reconcile per connection at a time inside this replica (kopf peering keeps other
    # replicas passive; the PostgreSQL advisory lock is the last line of defence)
    locks: collections.defaultdict[tuple[str, str], asyncio.Lock] = field(
        default_factory=lambda: collections.defaultdict(asyncio.Lock))

    # Fed by the watch streams so that admission answers without an API call. A standby replica
    # (kopf peering paused it) has no watch streams, yet the webhook Service still sends it about
    # half of the admission requests: what is missing here is read from the API (`read`).
    # (namespace, DatabaseConnection name) -> credentials Secret name
    connections: dict[tuple[str, str], str] = field(default_factory=dict)
    # the CA (PEM) the sidecars trust for the approvals gateway, set when it starts
    operator_ca: str = ""
    # (plural, namespace, name) -> (monotonic deadline, object or None)
    _reads: BoundedCache[tuple[str, str, str], tuple[float, dict[str, Any] | None]] = field(
        default_factory=lambda: BoundedCache(1024))

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks[(namespace, name)]

    async def read(self, plural: names.Plural, namespace: str, name: str, fresh: bool = False) -> dict[str, Any] | None:
        """A pgwarden object read from the API (None: it does not exist), reused for
        `settings.lookup_cache_seconds`, so a burst of pod creations costs one GET; `fresh`
        skips the reuse. API errors propagate: the caller refuses rather than guesses."""
        key = (plural, namespace, name)
        now = time.monotonic()
        hit = self._reads.get(key)
        if hit is not None and hit[0] > now and not fresh:
            return hit[1]
        obj = await self.kube.get(kube.path(names.API_VERSION, plural, namespace, name))
        self._reads.put(key, (now + self.settings.lookup_cache_seconds, obj))
        return obj


def for_events(obj: Mapping[str, Any]) -> kopf.Body:
    """`obj` as the object of kopf's events (kopf.info, kopf.warn, kopf.event): they read only its
    apiVersion, kind and metadata, so any mapping serves, but they are typed for a kopf.Body."""
    return cast(kopf.Body, dict(obj))


def add_to_patch(patch: MutableMapping[str, Any], changes: Mapping[str, Any]) -> None:
    """Merge `changes` into the merge patch kopf sends for a handler (or an admission response):
    nested mappings merge key by key, anything else (None too: a merge patch's "remove") is set."""
    merge_into(patch, changes)
