"""RayContext.start_pass: the next epoch's stream starts in a thread while the epoch ends, and the next pass takes it
over from its first batch (a stand-in for Ray's dataset shard; the 2-worker end-to-end runs use the real one)."""
import threading

import numpy as np
import pytest
import torch

from sslab.platform.context import RayContext


class FakeShard:
    """iter_batches like a Ray dataset shard: each call is one pass of `n` blocks of `rows` rows, numbered by pass
    and block (every row of block i of pass p holds 10 p + i)."""

    def __init__(self, n=3, rows=8, fail=False):
        self.n, self.rows, self.fail, self.passes, self.opened_in = n, rows, fail, 0, []

    def iter_batches(self, batch_size, batch_format):
        assert batch_size is None and batch_format == "numpy"      # whole blocks, as the pipeline takes them
        self.opened_in.append(threading.current_thread().name)
        self.passes += 1
        p = self.passes
        if self.fail:
            raise RuntimeError("the stream could not start")
        return ({"index": np.full(self.rows, 10 * p + i)} for i in range(self.n))


def context(shard):
    ctx = object.__new__(RayContext)          # no Ray Train session here: only what batches() uses
    ctx._shard, ctx._ahead, ctx.device, ctx.shuffle_rows = shard, None, torch.device("cpu"), 0
    return ctx


def firsts(batches):
    return [int(b["index"][0]) for b in batches]


def test_a_started_pass_is_the_next_pass():
    shard = FakeShard()
    ctx = context(shard)
    assert firsts(ctx.batches(8)) == [10, 11, 12]
    ctx.start_pass(8)
    ctx._ahead[1].join()
    assert shard.passes == 2 and shard.opened_in[-1] == "sslab-next-pass"   # opened (and first batch read) early
    assert firsts(ctx.batches(8)) == [20, 21, 22] and shard.passes == 2   # taken over, first batch included
    assert firsts(ctx.batches(8)) == [30, 31, 32]                         # and then back to opening on demand


def test_a_pass_cut_short_is_read_to_its_end_and_another_size_opens_afresh():
    shard = FakeShard()
    ctx = context(shard)
    ctx.start_pass(8)
    it = ctx.batches(8)
    assert firsts([next(it)]) == [10]
    it.close()                                  # steps_per_epoch reached: the rest of the pass is drained
    ctx.start_pass(8)
    assert firsts(ctx.batches(4)) == [30, 30, 31, 31, 32, 32]   # a pass of another batch size is not the one started
    assert shard.passes == 3


def test_an_error_starting_the_pass_surfaces_where_the_pass_is_taken():
    ctx = context(FakeShard(fail=True))
    ctx.start_pass(4)                           # no error here: the thread keeps it
    with pytest.raises(RuntimeError, match="could not start"):
        list(ctx.batches(4))
