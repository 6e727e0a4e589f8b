"""train/garbage.py: the setup's objects frozen out of garbage collection for the loop, and its time measured."""
import gc
import weakref

import pytest

from blip2_ds.train.garbage import CollectionClock, FrozenSetup, full_collection_seconds


class Node:
    def __init__(self):
        self.other = self


class Leaf:
    """No reference cycle: reference counting frees it."""


def _dropped_cycle() -> weakref.ref:
    """A reference cycle no one holds: only the collector can free it."""
    return weakref.ref(Node())


def test_setup_objects_are_frozen_for_the_block_and_cycles_still_collected():
    kept = [Leaf() for _ in range(1000)]  # alive "setup" objects
    garbage_before = _dropped_cycle()
    tracked_before = len(gc.get_objects())
    with FrozenSetup() as frozen:
        assert garbage_before() is None  # collected before freezing: it is not frozen in
        assert frozen.objects >= 0.9 * tracked_before > 1000
        # What a full collection walks now: the few objects made since, not the setup's.
        assert len(gc.get_objects()) < 100
        assert gc.isenabled()  # automatic collection stays on
        made_in_the_loop = _dropped_cycle()
        gc.collect()
        assert made_in_the_loop() is None
        released = weakref.ref(kept.pop())  # a frozen object released by reference counting is freed
        assert released() is None
    assert gc.get_freeze_count() == 0 and len(gc.get_objects()) >= 0.9 * tracked_before


def test_freeze_more_adds_what_the_first_step_set_up():
    with FrozenSetup() as frozen:
        before = frozen.objects
        lazily_built = [[Leaf()] for _ in range(2000)]  # e.g. compiled graphs, first-use buffers
        assert len(gc.get_objects()) > 2000
        frozen.freeze_more()
        assert frozen.objects >= before + 2000 and len(gc.get_objects()) < 100
        del lazily_built
    assert gc.get_freeze_count() == 0


def test_setup_objects_unfrozen_after_an_exception():
    with pytest.raises(KeyError), FrozenSetup():
        raise KeyError("boom")
    assert gc.get_freeze_count() == 0


def test_collection_clock_counts_collections_while_entered():
    callbacks = list(gc.callbacks)
    with CollectionClock() as clock:
        assert clock.take() == 0.0
        for _ in range(3):
            gc.collect()
        first = clock.take()
        assert first > 0.0 and clock.take() == 0.0  # take() empties it
    gc.collect()
    assert clock.take() == 0.0 and gc.callbacks == callbacks  # the callback is gone


def test_full_collection_cost_reports_both_and_leaves_nothing_frozen():
    cost = full_collection_seconds()
    assert cost["objects"] > 1000 and cost["seconds"] > 0 and cost["frozen_seconds"] >= 0
    assert gc.get_freeze_count() == 0
