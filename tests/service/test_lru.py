"""The service's one bounded cache: least recently used entries go first, by count or by cost."""

from __future__ import annotations

import threading

import pytest

from largebatch.service.lru import Lru


def test_forgets_the_least_recently_used_entry_past_max_entries():
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)
    assert len(lru) == 2


def test_bounded_by_cost_and_replacing_a_value_counts_its_new_cost_only():
    lru: Lru[int, str] = Lru(max_cost=10, cost=len)
    lru.put(1, "x" * 4)
    lru.put(2, "y" * 4)
    lru.put(1, "z" * 2)  # 1 is replaced: 6 in all, nothing goes
    assert (lru.get(1), lru.get(2)) == ("zz", "yyyy")
    lru.put(3, "w" * 5)  # 11 > 10: the least recently used (1) goes
    assert lru.get(1) is None and lru.get(2) == "yyyy" and lru.get(3) == "wwwww"
    assert lru.pop(2) == "yyyy"
    lru.put(4, "v" * 5)  # 10: fits once 2's cost was given back
    assert lru.get(3) == "wwwww" and lru.get(4) == "vvvvv"


def test_zero_entries_keeps_nothing_and_an_unbounded_cache_is_refused():
    lru: Lru[str, int] = Lru(0)
    assert lru.put("a", 1) == 1 and lru.get("a") is None
    with pytest.raises(ValueError, match="max_entries or max_cost"):
        Lru()
    with pytest.raises(ValueError, match="go together"):
        Lru(max_cost=10)


def test_update_is_one_step_under_concurrent_callers():
    lru: Lru[str, int] = Lru(10)

    def add() -> None:
        for _ in range(2000):
            lru.update("n", lambda v: (v or 0) + 1)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lru.get("n") == 8000
