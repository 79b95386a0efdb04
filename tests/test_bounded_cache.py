"""The one bounded cache type: a flood of distinct keys (tokens, addresses) cannot grow it."""

from __future__ import annotations

import threading

import pytest

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


def test_keeps_at_most_maxsize_and_drops_the_least_recently_used() -> None:
    c: BoundedCache[str, int] = BoundedCache(3)
    for i, k in enumerate("abc"):
        c.put(k, i)
    assert c.get("a", touch=True) == 0  # a is now the most recently used
    c.put("d", 3)
    assert len(c) == 3 and "b" not in c and list(c) == ["c", "a", "d"]
    assert c.get("b") is None and c.get("b", -1) == -1


def test_endless_distinct_keys_stay_bounded() -> None:
    c: BoundedCache[str, str] = BoundedCache(100)
    for i in range(10_000):
        c.put(f"SELECT {i}", "plan")
    assert len(c) == 100 and "SELECT 9999" in c and "SELECT 0" not in c


def test_pop_and_clear() -> None:
    c: BoundedCache[int, str] = BoundedCache(2)
    c.put(1, "x")
    assert c.pop(1) == "x" and c.pop(1) is None and len(c) == 0
    c.put(2, "y")
    c.clear()
    assert 2 not in c


def test_a_negative_size_is_refused_and_zero_keeps_nothing() -> None:
    with pytest.raises(ValueError):
        BoundedCache(-1)
    c: BoundedCache[str, int] = BoundedCache(0)
    c.put("a", 1)
    assert len(c) == 0 and c.get("a") is None


def test_two_threads_reading_and_writing_never_raise() -> None:
    c: BoundedCache[int, int] = BoundedCache(8)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(20_000):
                c.put((i + offset) % 64, i)
                c.get((i * 7 + offset) % 64, touch=True)
        except BaseException as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(c) <= 8
