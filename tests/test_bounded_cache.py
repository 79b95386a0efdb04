"""The one bounded cache type: a flood of distinct keys (tokens, addresses) cannot grow it."""

from __future__ import annotations

from pgwarden.cache import BoundedCache
from pgwarden.identity.tokenreview import ReviewCache
from pgwarden.subjects import Identity


def test_a_flood_of_keys_keeps_the_newest_within_the_bound() -> None:
    c: BoundedCache[str, int] = BoundedCache(3)
    for i in range(1000):
        c.put(f"k{i}", i)
    assert len(c) == 3
    assert [c.get(f"k{i}") for i in (996, 997, 998, 999)] == [None, 997, 998, 999]


def test_a_read_with_touch_keeps_a_hot_entry() -> None:
    c: BoundedCache[str, int] = BoundedCache(2)
    c.put("hot", 1)
    c.put("a", 2)
    assert c.get("hot", touch=True) == 1  # now the newest
    c.put("b", 3)
    assert "hot" in c and "a" not in c
    assert c.get("a", 0) == 0 and c.pop("hot") == 1 and len(c) == 1


def test_review_cache_forgets_old_and_expired_tokens() -> None:
    now = [0.0]
    rc = ReviewCache(ttl=30, size=2, clock=lambda: now[0])
    who = Identity(subject="system:serviceaccount:agents:a")
    for t in ("t1", "t2", "t3"):
        rc.put(t, who)
    assert rc.get("t1") is None and rc.get("t3") == who  # the bound dropped the oldest
    now[0] = 31
    assert rc.get("t3") is None  # past the TTL: asked again
