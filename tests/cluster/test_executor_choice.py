"""Steps go to the least busy executor; ties go round in turn (both the fixed list and the pool)."""

from __future__ import annotations

from collections import Counter

from tailrace.cluster.driver import ExecutorChooser
from tailrace.cluster.pool import ExecutorPool, MemberState, _Member


def test_idle_executors_take_turns():
    chooser = ExecutorChooser(["a", "b", "c"])
    picks = []
    for _ in range(9):
        index = chooser.acquire()
        picks.append(index)
        chooser.release(index)
    assert picks == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_the_least_busy_wins_and_an_avoided_executor_only_when_nothing_else_is_left():
    chooser = ExecutorChooser(["a", "b", "c"])
    assert [chooser.acquire() for _ in range(3)] == [0, 1, 2]
    chooser.release(1)
    assert chooser.acquire() == 1
    assert chooser.acquire(avoid="a") in (1, 2)
    lonely = ExecutorChooser(["a"])
    assert lonely.acquire(avoid="a") == 0


def test_the_pool_hands_ties_round_its_ready_members():
    pool = ExecutorPool({}, name="t")
    for key in (4, 7, 9):  # keys need not be 0..n-1 (replaced executors get new ones)
        pool._members[key] = _Member(key, f"h{key}", MemberState.READY, 0.0)
    pool._members[11] = _Member(11, "h11", MemberState.STARTING, 0.0)
    served = Counter()
    for _ in range(300):
        member = pool._pick(None)
        served[member.key] += 1
    assert served == {4: 100, 7: 100, 9: 100}
