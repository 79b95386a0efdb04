"""The one deep merge: nested mappings merged key by key, anything else replaced.

Used to lay a patch over an object (sidecar injection), to apply a JSON merge patch (RFC 7386:
`none_deletes`, an approval's `kubectl patch --type merge`) and to add changes to the merge patch
kopf sends (where None stays: it is the patch's "remove").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any


def merge_into(dst: MutableMapping[str, Any], src: Mapping[str, Any], *, none_deletes: bool = False) -> None:
    """Merge `src` into `dst` in place. Values are copied, so `dst` never shares a list with `src`."""
    for k, v in src.items():
        if isinstance(v, Mapping):
            node = dst.get(k)
            if not isinstance(node, MutableMapping):
                node = dst[k] = {}
            merge_into(node, v, none_deletes=none_deletes)
        elif v is None and none_deletes:
            dst.pop(k, None)
        else:
            dst[k] = copy.deepcopy(v)
