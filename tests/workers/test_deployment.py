"""The Serve shells' own logic that needs no Ray (their Serve behaviour: tests/cluster)."""

from __future__ import annotations

import asyncio

import pytest

from workers.deployment import TargetWorker


# Serve's shutdown hook is an async __del__, so the garbage collector's own call makes a coroutine
# nobody awaits: expected, and not what this test is about.
@pytest.mark.filterwarnings("ignore:coroutine 'TargetWorker.__del__' was never awaited")
def test_shutdown_after_a_constructor_that_raised_closes_what_exists_and_raises_nothing():
    # Serve calls __del__ on a replica whose constructor failed (say, out of GPU memory while
    # loading): the replica's log must end with that error, not with a missing attribute.
    worker = TargetWorker.__new__(TargetWorker)
    worker.replica_id = "r1"
    asyncio.run(worker.__del__())
