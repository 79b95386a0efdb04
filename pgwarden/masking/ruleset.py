"""Every MaskingRule of the configuration, and the masking that applies to one caller."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pgwarden.cache import BoundedCache
from pgwarden.masking.model import MaskingRule, parse_masking_rule
from pgwarden.masking.subject import SubjectMasking
from pgwarden.resources import Document, of_kind
from pgwarden.subjects import Identity, any_matches


@dataclass
class MaskingSet:
    """Every MaskingRule of the configuration."""

    rules: tuple[MaskingRule, ...] = ()
    # by the set of rules that apply: one SubjectMasking per distinct set, whichever identity asks
    _cache: BoundedCache[tuple[int, ...], SubjectMasking] = field(
        default_factory=lambda: BoundedCache(256), repr=False, compare=False)

    def for_identity(self, identity: Identity, connection: str) -> SubjectMasking | None:
        """The caller's masking on `connection` (a DatabaseConnection name); None = see clear values."""
        applying = [r for r in self.rules if r.connection == connection and not any_matches(r.exempt, identity)]
        if not applying:
            return None
        key = tuple(id(r) for r in applying)
        hit = self._cache.get(key, touch=True)
        if hit is None:
            hit = SubjectMasking.merge(applying)
            self._cache.put(key, hit)
        return hit


def load_masking(docs: Iterable[Document], env: Mapping[str, str] | None = None) -> MaskingSet:
    """Parse every MaskingRule among `docs`; `env` defaults to os.environ (for hashKeyEnv)."""
    return MaskingSet(tuple(parse_masking_rule(d, env) for d in of_kind(docs, "MaskingRule")))
