"""The bounded cache every per-text and per-caller table uses: an agent cannot grow it past its size."""

from __future__ import annotations

import threading

import pytest

from pgwarden.cache import BoundedCache


def test_keeps_at_most_maxsize_and_drops_the_least_recently_used() -> None:
    c: BoundedCache[str, int] = BoundedCache(3)
    for i, k in enumerate("abc"):
        c.put(k, i)
    assert c.get("a") == 0  # a is now the most recently used
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


def test_a_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        BoundedCache(0)


def test_two_threads_reading_and_writing_never_raise() -> None:
    c: BoundedCache[int, int] = BoundedCache(8)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(20_000):
                c.put((i + offset) % 64, i)
                c.get((i * 7 + offset) % 64)
        except BaseException as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(c) <= 8
