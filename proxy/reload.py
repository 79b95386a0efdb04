"""Hot reload of the policy bundle: the operator rewrites a mounted ConfigMap, the sidecar follows.

The watcher polls the configuration files (a ConfigMap mount changes by an atomic symlink swap,
so a stat of each file is enough) and re-validates everything with the same code that runs at
start-up. A valid bundle replaces policies and masking rules for new statements of every
session; an invalid one is refused and the last good one stays in force (never fall open).
Sessions that were running without any gate (no policy at all) are closed when policy appears,
so nobody keeps an unpoliced session across the change. Listener, upstream, users, audit and
approval settings are read at start-up only: changing them needs a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgwarden.resources import ResourceError, load_documents

log = logging.getLogger("pgwarden.proxy.reload")


def signature(paths: Sequence[str | Path]) -> tuple[tuple[str, int, int], ...]:
    """What changes when any configuration file changes (content swapped, added or removed)."""
    out: list[tuple[str, int, int]] = []
    for p in paths:
        path = Path(p)
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for f in files:
            try:
                st = os.stat(f)  # follows the ConfigMap's ..data symlinks
                out.append((str(os.path.realpath(f)), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(f), -1, -1))
    return tuple(out)


@dataclass
class ReloadStatus:
    generation: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, **({"error": self.error} if self.error else {})}


async def apply_documents(server: Any, docs: list[Any]) -> None:
    """Validate `docs` and swap in their policies and masking rules; raises ResourceError."""
    from pgwarden.proxy.config import parse_proxy_config
    from pgwarden.proxy.hooks import open_catalog, prepare_runtime, session_hooks

    config = parse_proxy_config(docs)
    fresh = prepare_runtime(config, docs)  # the same checks as at start-up
    rt = server.runtime
    rt.policies, rt.masking = fresh.policies, fresh.masking
    if rt.masking is not None and rt.catalog is None:
        await open_catalog(rt, server.config)
    rt.generation += 1
    server.hooks = session_hooks(rt, server.config)
    # sessions with a SessionGate pick the new rules up at their next statement; the others
    # (no policy, or deny-all) are closed so that none runs on under the old configuration
    server.close_ungated("the access policy changed; reconnect to continue under it")


async def watch(server: Any, paths: Sequence[str | Path], status: ReloadStatus, interval: float = 2.0) -> None:
    """Poll `paths` until cancelled; reload on change."""
    last = signature(paths)
    while True:
        await asyncio.sleep(interval)
        current = signature(paths)
        if current == last:
            continue
        last = current
        try:
            docs = load_documents(paths)
            await apply_documents(server, docs)
        except Exception as e:  # whatever went wrong, the last good configuration stays
            if not isinstance(e, ResourceError):
                log.exception("configuration reload failed")
            status.error = f"the new configuration was refused, the previous one stays in force: {e}"
            log.error("%s", status.error)
            _audit(server, {"event": "config.reload", "ok": False, "error": str(e)})
            continue
        status.generation = server.runtime.generation
        status.error = ""
        log.info("configuration reloaded (generation %s)", status.generation)
        _audit(server, {"event": "config.reload", "ok": True, "generation": status.generation})


def _audit(server: Any, record: dict[str, Any]) -> None:
    audit = getattr(server.runtime, "audit", None)
    if audit is not None:
        from pgwarden.audit.records import now_iso

        audit.emit({"time": now_iso(), **record})
