"""What every handler gets from main.py: the settings, the API client and per-connection locks."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgwarden.operator.kube import Kube
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

    # (namespace, DatabaseConnection name) -> credentials Secret name, fed by the watch stream
    connections: dict[tuple[str, str], str] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks[(namespace, name)]
