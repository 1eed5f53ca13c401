"""`apps.heap.freeze_startup_heap`: a server's start-up heap (the model, NeMo, torch, Pipecat: ~750 000 objects)
is out of every later full collection, which otherwise held the event loop 0.4-0.8 s (the SIP fuzz test's stall)."""

import gc
import weakref

from pipecat_nemotron.apps.heap import freeze_startup_heap


class Node:
    pass


def test_the_startup_heap_leaves_full_collections_and_later_garbage_is_still_collected():
    startup = [[i] for i in range(200_000)]  # long-lived containers, as a loaded model leaves them
    try:
        walked_before = len(gc.get_objects())  # what a full collection walks
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(startup)
        assert len(gc.get_objects()) < walked_before - len(startup)
        later = Node()  # a call's objects, made after start-up, in a cycle only the collector frees
        later.itself = later
        alive = weakref.ref(later)
        del later
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()
    assert startup[-1] == [199_999]
