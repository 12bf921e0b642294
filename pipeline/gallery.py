"""Gallery building: dataset records in; image files, embeddings, thumbnails and manifest out.

One loop serves the standard run (one item per row) and the segmentation run (one item per person
crop). Records are cut into units; workers turn a unit into items (decode, write, preprocess,
thumbnail) and, on the CPU ONNX backend, embed them too, one worker per core (see build_gallery);
the main thread takes the units back in order. Work is cut into shards of source rows; each
finished shard is saved with a completion marker, so a killed run resumes from the last complete
shard and produces exactly what an uninterrupted run would (batches never cross a shard).
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from .dataset import Record
from .embedders import Embedder
from .errors import PipelineError
from .images import DecodedImage, ImageDecodeError, decode_image, encode_png, sniff_format
from .plots import THUMB_SIZE, make_thumbnail
from .preprocess import resize_for_model, to_model_input
from .report import RunSummary
from .store import (
    ManifestRow,
    Shard,
    ShardStore,
    atomic_write_bytes,
    finalize_store,
    invalidate_store,
    sha256_bytes,
)

log = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 512


@dataclass
class GalleryItem:
    """One thing to embed (or a recorded failure): its manifest line, its pixels, its file bytes.

    image: RGB pixels to embed; None when the item failed or has nothing to embed (row.status says).
    data: bytes to write to images_dir / row.file; None to write nothing.
    """

    row: ManifestRow
    image: Image.Image | None = None
    data: bytes | None = None


# Records in, for each record its items (several crops, one image, or one recorded failure).
ItemMaker = Callable[[list[Record]], list[list[GalleryItem]]]


@dataclass
class GalleryTarget:
    """Where a gallery goes: its image folder, its store folder, and the file names it owns."""

    images_dir: Path
    store_dir: Path
    owned_files: re.Pattern = field(default_factory=lambda: re.compile(r"img_\d+\.(jpg|png)$"))
    group_size: int = 1  # records handed to the item maker at once (batched segmentation)
    parallel_items: bool = False  # make_items may run in several threads at once (lanes)


def image_file_name(source_row: int, ext: str) -> str:
    return f"img_{source_row:05d}.{ext}"


def decode_record(record: Record, min_side: int | None = None) -> tuple[ManifestRow, DecodedImage | None]:
    """A record's manifest line and its decoded image; when the row has no image or it does not
    decode, the image is None and the line records the failure (both item makers start here)."""
    row = ManifestRow(index=-1, file="", source_row=record.source_row, source=record.source)
    if record.data is None:
        row.status, row.error = "failed", record.error
        return row, None
    try:
        return row, decode_image(record.data, min_side=min_side)
    except ImageDecodeError as e:
        row.status, row.error, row.sha256 = "failed", str(e), sha256_bytes(record.data)
        return row, None


def make_standard_items(decode_min_side: int) -> ItemMaker:
    """Item maker for the standard run: one image per row, written unchanged when JPEG/PNG."""

    def items(records: list[Record]) -> list[list[GalleryItem]]:
        return [one(r) for r in records]

    def one(record: Record) -> list[GalleryItem]:
        row, decoded = decode_record(record, decode_min_side)
        if decoded is None:
            return [GalleryItem(row)]
        ext = sniff_format(record.data)
        # JPEG and PNG are kept byte for byte; anything else is encoded once, losslessly.
        data = record.data if ext else encode_png(decoded.image)
        row.file = image_file_name(record.source_row, ext or "png")
        row.sha256 = sha256_bytes(data)
        row.width, row.height, row.note = decoded.width, decoded.height, decoded.note
        return [GalleryItem(row, decoded.image, data)]

    return items


@dataclass
class _Unit:
    """Consecutive records of one shard, made into items (and maybe embedded) by one worker."""

    shard: int
    records: list[Record]


@dataclass
class _ShardMark:
    """The end of shard `shard`, which covers source rows start .. stop-1."""

    shard: int
    start: int
    stop: int


@dataclass
class _UnitResult:
    rows: list[ManifestRow]
    embedded: list[int]  # positions in `rows` of the items that have pixels to embed
    thumbs: list[np.ndarray]  # one per embedded item
    pixels: list[np.ndarray]  # model inputs, one per embedded item (empty once embedded)
    vectors: np.ndarray | None  # (len(embedded), D) when the worker embedded them itself
    times: dict[str, float]
    records: int  # source rows this unit finished


def _plan(records: Iterator[Record], first_shard: int, next_row: int, shard_rows: int, unit_rows: int) -> Iterator[_Unit | _ShardMark]:
    """Cut the record stream into units of at most unit_rows records that never cross a shard,
    with a mark after each shard's last unit (a shard may have no records, e.g. all skipped)."""
    number, shard_start, last_row = first_shard, next_row, next_row - 1
    group: list[Record] = []
    for rec in records:
        while rec.source_row >= (number + 1) * shard_rows:
            if group:
                yield _Unit(number, group)
                group = []
            yield _ShardMark(number, shard_start, (number + 1) * shard_rows)
            number, shard_start = number + 1, (number + 1) * shard_rows
        group.append(rec)
        last_row = rec.source_row
        if len(group) >= unit_rows:
            yield _Unit(number, group)
            group = []
    if group:
        yield _Unit(number, group)
    if last_row + 1 > shard_start:
        yield _ShardMark(number, shard_start, last_row + 1)


class _Workers:
    """n daemon threads running one function on submitted arguments; each submission returns a
    Future, which the caller takes in submission order. Daemon threads, so an interrupted run
    exits without waiting for a long job (a segmentation batch) to finish."""

    def __init__(self, n: int, fn: Callable[[Any], Any]) -> None:
        self._fn, self._q, self._stop = fn, queue.SimpleQueue(), threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"gallery-worker-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, arg: Any) -> Future:
        fut: Future = Future()
        self._q.put((fut, arg))
        return fut

    def _work(self) -> None:
        while (job := self._q.get()) is not None:
            fut, arg = job
            if self._stop.is_set() or not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._fn(arg))
            except BaseException as e:  # handed to whoever takes the future
                fut.set_exception(e)

    def close(self, timeout: float) -> None:
        """Skip the jobs not started; wait up to `timeout` s for running ones (their files must be
        complete or cleaned up before the caller reports)."""
        self._stop.set()
        for _ in self._threads:
            self._q.put(None)
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))


def build_gallery(
    records: Callable[[int], Iterator[Record]],
    total_rows: int | None,
    make_items: ItemMaker,
    embedder: Embedder,
    target: GalleryTarget,
    run_params: dict[str, Any],
    source: dict[str, Any],
    summary: RunSummary,
    batch_size: int = 32,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    fresh: bool = False,
    progress: bool = True,
    item_stage_name: str = "decode",
) -> tuple[np.ndarray, list[ManifestRow]]:
    """Build (or resume building) a gallery store.

    Two ways to use the CPU, chosen here:
    - lanes (the standard run on the CPU ONNX backend): one worker per core takes a unit of
      batch_size / cores rows and does everything for it: decode, write, preprocess, thumbnail,
      and inference on its own single-threaded session. No core ever has two busy threads and no
      worker waits for another's half of a batch. Measured here on 2 cores, 768x1024 JPEGs: 73-80%
      of the model-only rate end to end over several runs, against 72-74% with the
      producer/consumer split below.
    - producer/consumer (torch, CUDA, segmentation whose model is not thread-safe): one worker
      makes items a batch or two ahead while the main thread runs the embedder on full batches.
    Either way units are taken in order, batches never cross a shard, and the output does not
    depend on timing.

    Args:
        records: function start_row -> iterator of Records from that row on.
        total_rows: rows expected, for the progress bar (None if unknown).
        make_items: turns Records into their GalleryItems (this is where decoding happens).
        run_params: everything that determines the output; a resume with other params is refused.
    Returns:
        (embeddings float32 (N, D), manifest rows) as finally written.
    """
    target.images_dir.mkdir(parents=True, exist_ok=True)
    target.store_dir.mkdir(parents=True, exist_ok=True)
    invalidate_store(target.store_dir)
    shards = ShardStore(target.store_dir, run_params, fresh=fresh)
    done = list(shards.completed())
    next_row = done[-1].stop if done else 0
    if done:
        log.info("resuming: %d complete shard(s) found, continuing at row %d", len(done), next_row)
        summary.notes.append(f"resumed at row {next_row} from {len(done)} complete shard(s)")
    cfg = embedder.preprocess_cfg
    lanes = getattr(embedder, "lanes", 1) if target.parallel_items and hasattr(embedder, "embed_serial") else 1
    in_lane = lanes > 1
    unit_rows = max(1, -(-batch_size // lanes)) if in_lane else max(target.group_size, 1)
    # Work queued ahead: a unit per lane waiting, or about two batches for the main-thread embedder.
    ahead = 2 * lanes if in_lane else max(2, -(-2 * batch_size // unit_rows))
    times = {"items": 0.0, "write": 0.0, "preprocess": 0.0, "infer": 0.0}

    def work(unit: _Unit) -> _UnitResult:
        t0 = time.perf_counter()
        made = make_items(unit.records)
        t1 = time.perf_counter()
        for items in made:
            for item in items:
                if item.data is not None:
                    atomic_write_bytes(target.images_dir / item.row.file, item.data)
        t2 = time.perf_counter()
        res = _UnitResult([], [], [], [], None, {}, len(unit.records))
        for items in made:
            for item in items:
                res.rows.append(item.row)
                if item.image is None or item.row.status != "ok":
                    continue
                resized = resize_for_model(item.image, cfg)
                res.pixels.append(to_model_input(resized, cfg))
                res.thumbs.append(make_thumbnail(resized))
                res.embedded.append(len(res.rows) - 1)
        t3 = time.perf_counter()
        if in_lane and res.pixels:
            res.vectors = embedder.embed_serial(np.stack(res.pixels))
            res.pixels = []
        res.times = {"items": t1 - t0, "write": t2 - t1, "preprocess": t3 - t2, "infer": time.perf_counter() - t3}
        return res

    bar = tqdm(total=total_rows, initial=next_row, unit="row", desc=f"embed -> {target.store_dir.name}", disable=not progress)
    rows: list[ManifestRow] = []  # the open shard's rows, in order
    thumbs: dict[int, np.ndarray] = {}  # position in rows -> thumbnail
    vectors: dict[int, np.ndarray] = {}  # position in rows -> embedding
    waiting: list[tuple[int, np.ndarray]] = []  # (position, pixels) not yet embedded

    def embed_waiting(upto: int) -> None:
        nonlocal waiting
        while len(waiting) >= upto and waiting:
            batch, waiting = waiting[:batch_size], waiting[batch_size:]
            t = time.perf_counter()
            emb = embedder.embed(np.stack([px for _, px in batch]))
            times["infer"] += time.perf_counter() - t
            for (pos, _), vec in zip(batch, emb):
                vectors[pos] = vec

    def take(step: Future | _ShardMark) -> None:
        nonlocal rows, thumbs, vectors
        if isinstance(step, _ShardMark):
            embed_waiting(1)
            shard = _close_shard(step, rows, thumbs, vectors, embedder.dim)
            shards.write(shard)
            shard.thumbnails = None  # on disk now; only embeddings and rows stay for the final join
            done.append(shard)
            rows, thumbs, vectors = [], {}, {}
            return
        try:
            res: _UnitResult = step.result()
        except OSError as err:
            raise PipelineError(f"writing to {target.images_dir} failed: {err.strerror or err}") from err
        base = len(rows)
        rows.extend(res.rows)
        for k, pos in enumerate(res.embedded):
            thumbs[base + pos] = res.thumbs[k]
            if res.vectors is not None:
                vectors[base + pos] = res.vectors[k]
            else:
                waiting.append((base + pos, res.pixels[k]))
        for key, value in res.times.items():
            times[key] += value
        embed_waiting(batch_size)
        bar.update(res.records)

    workers = _Workers(lanes if in_lane else 1, work)
    pending: deque = deque()
    queued = 0
    t_start = time.perf_counter()
    try:
        for step in _plan(records(next_row), len(done), next_row, shard_rows, unit_rows):
            if isinstance(step, _Unit):
                pending.append(workers.submit(step))
                queued += 1
            else:
                pending.append(step)
            # Take what is finished, and wait for the oldest unit when too much is queued.
            while pending and (queued > ahead or not isinstance(pending[0], Future) or pending[0].done()):
                step = pending.popleft()
                queued -= isinstance(step, Future)
                take(step)
        while pending:
            take(pending.popleft())
    finally:
        bar.close()
        workers.close(timeout=30)
    summary.stages["embed stage (wall)"] = time.perf_counter() - t_start
    where = f"{lanes} lanes" if in_lane else "worker"
    summary.stages[f"  {item_stage_name} ({where})"] = times["items"]
    summary.stages[f"  write files ({where})"] = times["write"]
    summary.stages[f"  preprocess+thumbnail ({where})"] = times["preprocess"]
    summary.stages[f"  inference ({where if in_lane else 'main thread'})"] = times["infer"]
    with summary.stage("finalize store"):
        # `done` holds every shard of this run, verified at resume or just written: no second read.
        emb, all_rows = finalize_store(target.store_dir, shards, done, embedder.identity, source, embedder.dim, THUMB_SIZE)
        shards.remove()
        _remove_stale_files(target, all_rows)
    return emb, all_rows


def _close_shard(mark: _ShardMark, rows: list[ManifestRow], thumbs: dict[int, np.ndarray], vectors: dict[int, np.ndarray], dim: int) -> Shard:
    """Number the shard's embeddings in item order; a non-finite or zero vector fails its item."""
    embs, kept = [], []
    for local, row in enumerate(rows):
        if local not in thumbs:
            continue
        vec = vectors.get(local)
        if vec is None or not np.all(np.isfinite(vec)) or not np.any(vec):
            row.status, row.error = "failed", "the model produced a non-finite or zero embedding"
            continue
        row.embedding_row = len(embs)
        embs.append(vec)
        kept.append(thumbs[local])
    emb = np.stack(embs).astype(np.float32) if embs else np.zeros((0, dim), np.float32)
    th = np.stack(kept) if kept else np.zeros((0, THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
    return Shard(mark.shard, mark.start, mark.stop, emb, rows, th)


def _remove_stale_files(target: GalleryTarget, rows: list[ManifestRow]) -> None:
    """Delete files this tool named (img_*.jpg, ...) that the new manifest does not list, so the
    folder holds exactly this run's images."""
    keep = {r.file for r in rows if r.file}
    stale = [p for p in target.images_dir.iterdir() if target.owned_files.fullmatch(p.name) and p.name not in keep]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d image file(s) from an earlier, different run in %s", len(stale), target.images_dir)


def record_failures(rows: list[ManifestRow], summary: RunSummary) -> None:
    for r in rows:
        if r.status == "failed":
            summary.fail(r.file or r.source or f"row {r.source_row}", r.error)
