"""train/garbage.py: the setup's objects frozen out of garbage collection for the loop, and its time measured."""
import gc
import weakref

import pytest

from blip2_ds.train.garbage import CollectionClock, setup_objects_frozen


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
    with setup_objects_frozen() as frozen:
        assert garbage_before() is None  # collected before freezing: it is not frozen in
        assert frozen >= 0.9 * tracked_before > 1000
        # What a full collection walks now: the few objects made since, not the setup's.
        assert len(gc.get_objects()) < 100
        assert gc.isenabled()  # automatic collection stays on
        made_in_the_loop = _dropped_cycle()
        gc.collect()
        assert made_in_the_loop() is None
        released = weakref.ref(kept.pop())  # a frozen object released by reference counting is freed
        assert released() is None
    assert gc.get_freeze_count() == 0 and len(gc.get_objects()) >= 0.9 * tracked_before


def test_setup_objects_unfrozen_after_an_exception():
    with pytest.raises(KeyError), setup_objects_frozen():
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
