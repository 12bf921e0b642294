"""The gallery loop's pieces on their own: the shard assembler (no threads) and the parallelism choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import Record
from pipeline.embedders import Embedder
from pipeline.gallery import (
    Embedded,
    GalleryTarget,
    Parallelism,
    ShardAssembler,
    ShardMark,
    Unit,
    UnitResult,
    _in_order,
    _plan,
)
from pipeline.plots import THUMB_SIZE
from pipeline.store import ManifestRow


def _unit(first_row: int, n: int, skip: set[int] = frozenset(), value: float | None = None) -> UnitResult:
    """n rows; rows in `skip` have nothing to embed; each other row's pixels carry its row number."""
    res = UnitResult(
        rows=[ManifestRow(index=-1, file=f"img_{first_row + k:05d}.png", source_row=first_row + k) for k in range(n)],
        records=n,
    )
    for k in range(n):
        if first_row + k in skip:
            res.rows[k].status = "failed"
            continue
        res.embedded.append(k)
        res.thumbs.append(np.full((THUMB_SIZE, THUMB_SIZE, 3), first_row + k, np.uint8))
        res.inputs.append(np.full((3, 2, 2), first_row + k if value is None else value, np.float32))
    return res


class Recorder:
    """embed(): records batch sizes; the vector is (row number, 1); NaN for row 7."""

    def __init__(self):
        self.batches = []

    def __call__(self, inputs):
        pixels = np.stack(inputs)
        self.batches.append(len(pixels))
        v = np.stack([pixels[:, 0, 0, 0], np.ones(len(pixels), np.float32)], axis=1)
        v[v[:, 0] == 7] = np.nan
        return Embedded(v, [None] * len(v), [None] * len(v))


def test_assembler_batches_numbers_and_fails_bad_vectors():
    embed = Recorder()
    a = ShardAssembler(embed, batch_size=4, dim=2)
    a.add(_unit(0, 3, skip={1}))  # 2 waiting: below a batch
    assert embed.batches == []
    a.add(_unit(3, 3))  # 5 waiting: one batch of 4 now
    assert embed.batches == [4]
    a.add(_unit(6, 3))
    shard = a.close(ShardMark(0, 0, 9))
    assert embed.batches == [4, 4]  # the last 4 at the close: batches never cross a shard
    assert (shard.number, shard.start, shard.stop) == (0, 0, 9)
    assert [r.source_row for r in shard.rows] == list(range(9))
    assert [r.status for r in shard.rows] == ["ok", "failed", "ok", "ok", "ok", "ok", "ok", "failed", "ok"]
    assert shard.rows[7].error == "the model produced a non-finite or zero embedding"
    kept = [0, 2, 3, 4, 5, 6, 8]
    assert [r.embedding_row for r in shard.rows] == [0, -1, 1, 2, 3, 4, 5, -1, 6]
    assert shard.embeddings.dtype == np.float32 and list(shard.embeddings[:, 0]) == kept
    assert [int(t[0, 0, 0]) for t in shard.thumbnails] == kept
    # the next shard starts empty
    empty = a.close(ShardMark(1, 9, 12))
    assert (
        empty.rows == []
        and empty.embeddings.shape == (0, 2)
        and empty.thumbnails.shape == (0, THUMB_SIZE, THUMB_SIZE, 3)
    )


def test_assembler_takes_vectors_a_lane_already_computed():
    embed = Recorder()
    a = ShardAssembler(embed, batch_size=2, dim=2)
    res = _unit(0, 3)
    res.vectors, res.inputs = np.array([[1, 0], [0, 1], [0, 0]], np.float32), []
    a.add(res)
    shard = a.close(ShardMark(0, 0, 3))
    assert embed.batches == []
    assert [r.status for r in shard.rows] == ["ok", "ok", "failed"]  # an all-zero vector fails too
    assert np.array_equal(shard.embeddings, [[1, 0], [0, 1]])


class Fake(Embedder):
    def __init__(self, lanes):
        self.lanes = lanes


@pytest.mark.parametrize(
    "lanes, parallel, group, batch, want",
    [
        (2, True, 1, 32, Parallelism(workers=2, lanes=2, unit_rows=16, ahead=4)),
        (3, True, 1, 5, Parallelism(workers=3, lanes=3, unit_rows=2, ahead=6)),
        (2, False, 8, 32, Parallelism(workers=1, lanes=1, unit_rows=8, ahead=8)),  # segmentation: one worker
        (1, True, 1, 32, Parallelism(workers=1, lanes=1, unit_rows=1, ahead=64)),  # torch: main-thread embedder
    ],
)
def test_parallelism_choice(lanes, parallel, group, batch, want):
    target = GalleryTarget(Path("i"), Path("s"), group_size=group, parallel_items=parallel)
    assert Parallelism.choose(Fake(lanes), target, batch) == want


def _rec(row: int) -> Record:
    return Record(row, f"r{row}", b"x")


def test_plan_cuts_units_at_shard_ends_and_marks_each_shard():
    # resumed at row 205 of shard 2 (100 rows a shard); rows 300-399 all skipped; units of at most 40
    rows = [*range(205, 300), *range(400, 410)]
    plan = list(_plan(iter(map(_rec, rows)), first_shard=2, next_row=205, shard_rows=100, unit_rows=40))
    shape = [(type(p).__name__, p.shard, len(p.records)) if isinstance(p, Unit) else p for p in plan]
    assert shape == [
        ("Unit", 2, 40),
        ("Unit", 2, 40),
        ("Unit", 2, 15),
        ShardMark(2, 205, 300),
        ShardMark(3, 300, 400),
        ("Unit", 4, 10),
        ShardMark(4, 400, 410),
    ]
    assert [r.source_row for p in plan if isinstance(p, Unit) for r in p.records] == rows


def test_plan_of_nothing_left_marks_nothing():
    # a resumed run whose dataset has no rows past the last shard written
    assert list(_plan(iter([]), first_shard=3, next_row=300, shard_rows=100, unit_rows=40)) == []


def test_in_order_keeps_at_most_ahead_units_in_flight():
    from concurrent.futures import Future

    class Held:
        """Workers whose units never finish by themselves: only the bound lets results out."""

        def __init__(self):
            self.submitted: list[Future] = []

        def submit(self, unit):
            self.submitted.append(Future())
            return self.submitted[-1]

    workers = Held()
    steps = [Unit(0, [_rec(i)]) for i in range(10)]
    out = _in_order(iter(steps), workers, ahead=2)
    first = next(out)
    assert first is workers.submitted[0] and len(workers.submitted) == 3  # the oldest is waited for at 3 in flight
    first.set_result(None)
    next(out)
    assert len(workers.submitted) == 4
