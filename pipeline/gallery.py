"""Gallery building: dataset records in; image files, embeddings, thumbnails and manifest out.

One loop serves the standard run (one item per row) and the segmentation run (one item per person
crop). Records are cut into units; a `UnitWorker` turns a unit into items (decode, write,
preprocess, thumbnail) and, in lanes, embeds them too; the main thread takes the units back in
order and a `ShardAssembler` collects them into shards. Each finished shard is saved with a
completion marker, so a killed run resumes from the last complete shard and produces exactly what
an uninterrupted run would (batches never cross a shard).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from .dataset import Record
from .embedders import Embedder, available_cores
from .errors import PipelineError
from .gpu import DevicePreprocessor, EncodedJpeg, to_host
from .identity import GallerySource, VectorIdentity
from .images import ImageDecodeError, decode_image
from .items import ItemMaker, ItemPipeline, image_reader, sign_resumed, write_image
from .plots import THUMB_SIZE, make_thumbnail
from .preprocess import CPU_PIXELS, PIL_PIXELS, resize_for_model, to_model_input
from .report import RunSummary
from .store import ManifestRow, Shard, ShardStore, StoreBuild

log = logging.getLogger(__name__)


# The file names a standard gallery owns: named by content (items.image_file_name), or by dataset
# row as stores made before 2026-12 were (an update renames those once).
STANDARD_FILES = re.compile(r"img_([0-9a-f]{16}|\d+)\.(jpg|png)$")


@dataclass
class GalleryTarget:
    """Where a gallery goes: its image folder, its store folder, and the file names it owns."""

    images_dir: Path
    store_dir: Path
    owned_files: re.Pattern = STANDARD_FILES
    group_size: int = 1  # records handed to the item maker at once (batched segmentation)
    parallel_items: bool = False  # make_items may run in several threads at once (lanes)
    device_decode: bool = False  # JPEGs go to the device encoded; workers only read headers and write files
    # a URL --output-dir's images folder (or its staging): where the files of shards another working copy
    # made are, when a resumed run reads them back (items.sign_resumed)
    images_url: str | None = None


@dataclass
class Unit:
    """Consecutive records of one shard, made into items (and maybe embedded) by one worker."""

    shard: int
    records: list[Record]


@dataclass
class ShardMark:
    """The end of shard `shard`, which covers source rows start .. stop-1."""

    shard: int
    start: int
    stop: int


# One item's input to the model: float32 (3, H, W) pixels made on the CPU, or a JPEG the device decodes.
ModelInput = np.ndarray | EncodedJpeg


@dataclass
class Embedded:
    """What a batch embedding returns, one entry per input: vectors float32 (B, D); thumbnails made
    on the device (None where the worker made one); an error for an input that could not be
    decoded after all (None where it could; its vector is then meaningless)."""

    vectors: np.ndarray
    thumbs: list[Any]
    errors: list[str | None]


# Embeds a batch of model inputs (the main thread's embedder).
BatchEmbed = Callable[[list[ModelInput]], Embedded]


def embed_pixels(embedder: Embedder) -> BatchEmbed:
    """The CPU path's batch embedding: every input is pixels already."""

    def embed(inputs: list[ModelInput]) -> Embedded:
        pixels = np.stack(cast(list[np.ndarray], inputs))  # the CPU path makes every input as pixels
        return Embedded(embedder.embed(pixels), [None] * len(inputs), [None] * len(inputs))

    return embed


class DeviceEmbedding:
    """The device path's batch embedding: JPEGs decoded and preprocessed on the embedder's device
    (gpu.DevicePreprocessor), CPU-made pixels copied in beside them, one model call per batch in row
    order. A JPEG the device decoder refuses after all is decoded on the CPU here (same result as
    the CPU path, or its error). Thumbnails go back to the host on a background thread."""

    def __init__(self, embedder: Embedder, device: str, decode_min_side: int) -> None:
        import torch

        self.torch, self.embedder, self.decode_min_side = torch, embedder, decode_min_side
        self.pre = DevicePreprocessor(embedder.preprocess_cfg, device, dtype=getattr(embedder, "input_dtype", None))
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thumbs-to-host")

    def __call__(self, inputs: list[ModelInput]) -> Embedded:
        torch, prep = self.torch, self.embedder.preprocess_cfg
        jpegs = [(k, x) for k, x in enumerate(inputs) if isinstance(x, EncodedJpeg)]
        jpeg_at = [k for k, _ in jpegs]
        device_x, device_thumbs, kept = self.pre.process([x for _, x in jpegs])
        thumbs: list[Any] = [None] * len(inputs)
        errors: list[str | None] = [None] * len(inputs)
        rows: dict[int, Any] = {jpeg_at[j]: device_x[i] for i, j in enumerate(kept)}
        if kept:
            host = self.copier.submit(to_host, device_thumbs)
            for i, j in enumerate(kept):
                thumbs[jpeg_at[j]] = partial(_row_of, host, i)
        for k, x in enumerate(inputs):
            if k in rows:
                continue
            if isinstance(x, EncodedJpeg):  # refused by the device decoder: the CPU decoder decides
                try:
                    image = decode_image(x.data, min_side=self.decode_min_side).image
                except ImageDecodeError as e:
                    errors[k] = str(e)
                    continue
                resized = resize_for_model(image, prep)
                thumbs[k], x = make_thumbnail(image if prep.squash else resized), to_model_input(resized, prep)
            rows[k] = torch.from_numpy(x).to(self.pre.device, self.pre.dtype)
        order = [k for k in range(len(inputs)) if k in rows]
        vectors = np.zeros((len(inputs), self.embedder.dim), np.float32)
        if order:
            vectors[order] = self.embedder.embed_tensor(torch.stack([rows[k] for k in order]))
        return Embedded(vectors, thumbs, errors)


def _row_of(future: Future, i: int) -> np.ndarray:
    return future.result()[i]


@dataclass
class UnitResult:
    rows: list[ManifestRow]
    embedded: list[int] = field(default_factory=list)  # positions in `rows` of the items that have pixels to embed
    thumbs: list[np.ndarray | None] = field(default_factory=list)  # one per embedded item (None: the device makes it)
    inputs: list[ModelInput] = field(default_factory=list)  # one per embedded item (empty once embedded)
    vectors: np.ndarray | None = None  # (len(embedded), D) when the worker embedded them itself
    times: dict[str, float] = field(default_factory=dict)
    records: int = 0  # source rows this unit finished


@dataclass(frozen=True)
class Parallelism:
    """How the loop uses the CPU.

    - lanes (the standard run on the CPU ONNX backend): one worker per core takes a unit of
      batch_size / lanes rows and does everything for it, inference included, on its own
      single-threaded session. No core ever has two busy threads and no worker waits for another's
      half of a batch, which keeps end-to-end speed closest to the model-only rate.
    - one worker (torch, CUDA, segmentation whose model is not thread-safe): it makes items a
      batch or two ahead while the main thread runs the embedder on full batches.
    - device decoding: a worker per core reads headers, hashes and writes files, and decodes on the
      CPU what the device cannot take; the main thread decodes JPEGs on the GPU and embeds.
    """

    workers: int
    lanes: int  # > 1: each worker embeds its own units
    unit_rows: int
    ahead: int  # units queued ahead of the one being taken

    @classmethod
    def choose(
        cls, embedder: Embedder, target: GalleryTarget, batch_size: int, cores: int | None = None
    ) -> Parallelism:
        if target.device_decode:
            workers = max(1, min(8, cores or available_cores()))
            unit_rows = max(1, -(-batch_size // workers))
            return cls(workers=workers, lanes=1, unit_rows=unit_rows, ahead=2 * workers)
        lanes = embedder.lanes if target.parallel_items else 1
        if lanes > 1:
            return cls(workers=lanes, lanes=lanes, unit_rows=max(1, -(-batch_size // lanes)), ahead=2 * lanes)
        unit_rows = max(target.group_size, 1)
        return cls(workers=1, lanes=1, unit_rows=unit_rows, ahead=max(2, -(-2 * batch_size // unit_rows)))


class UnitWorker:
    """Runs the item pipeline (items.ItemPipeline) on a unit; in a lane, embeds its items too
    (`embedder.embed_serial`, on the calling thread's core)."""

    def __init__(self, pipeline: ItemPipeline, embedder: Embedder, in_lane: bool) -> None:
        self.pipeline, self.embedder, self.in_lane = pipeline, embedder, in_lane

    def __call__(self, unit: Unit) -> UnitResult:
        prepared = self.pipeline(unit.records)
        res = UnitResult(rows=[], records=len(unit.records), times=dict(prepared.times))
        for item in (i for items in prepared.items for i in items):
            res.rows.append(item.row)
            if item.pixels is None:
                continue
            res.inputs.append(item.pixels)
            res.thumbs.append(item.thumb)
            res.embedded.append(len(res.rows) - 1)
        t = time.perf_counter()
        if self.in_lane and res.inputs:
            res.vectors = self.embedder.embed_serial(np.stack(cast(list[np.ndarray], res.inputs)))  # lanes: pixels
            res.inputs = []
        res.times["infer"] = time.perf_counter() - t
        return res


class ShardAssembler:
    """Owns the open shard: its rows in order, and the thumbnail and vector of each embedded row.

    Units arrive in order (`add`); inputs that still need the model wait until a full batch is
    there and are embedded with `embed` (the main thread's embedder). `close` embeds what waits,
    numbers the shard's embeddings in row order (a non-finite or zero vector, or an input that
    could not be decoded, fails its item) and starts the next shard. No threads here: it can be
    tested on its own.
    """

    def __init__(self, embed: BatchEmbed, batch_size: int, dim: int) -> None:
        self.embed, self.batch_size, self.dim = embed, batch_size, dim
        self.infer_seconds = 0.0
        self._start_shard()

    def _start_shard(self) -> None:
        self.rows: list[ManifestRow] = []
        self.thumbs: dict[int, Any] = {}  # position in rows -> thumbnail (or a device thumbnail on its way)
        self.vectors: dict[int, np.ndarray] = {}  # position in rows -> embedding
        self.waiting: list[tuple[int, ModelInput]] = []  # (position, input) not yet embedded

    def add(self, res: UnitResult) -> None:
        base = len(self.rows)
        self.rows.extend(res.rows)
        for k, pos in enumerate(res.embedded):
            self.thumbs[base + pos] = res.thumbs[k]
            if res.vectors is not None:
                self.vectors[base + pos] = res.vectors[k]
            else:
                self.waiting.append((base + pos, res.inputs[k]))
        self._embed_waiting(self.batch_size)

    def _embed_waiting(self, at_least: int) -> None:
        while self.waiting and len(self.waiting) >= at_least:
            batch, self.waiting = self.waiting[: self.batch_size], self.waiting[self.batch_size :]
            t = time.perf_counter()
            out = self.embed([x for _, x in batch])
            self.infer_seconds += time.perf_counter() - t
            for k, (pos, _) in enumerate(batch):
                if (error := out.errors[k]) is not None:
                    row = self.rows[pos]  # as the CPU path records a row that does not decode
                    row.status, row.error, row.file, row.width, row.height = "failed", error, "", 0, 0
                    continue
                self.vectors[pos] = out.vectors[k]
                if out.thumbs[k] is not None:
                    self.thumbs[pos] = out.thumbs[k]

    def close(self, mark: ShardMark) -> Shard:
        self._embed_waiting(1)
        embs: list[np.ndarray] = []
        kept: list[np.ndarray] = []
        for local, row in enumerate(self.rows):
            if local not in self.thumbs or row.status == "failed":
                continue
            vec = self.vectors.get(local)
            if vec is None or not np.all(np.isfinite(vec)) or not np.any(vec):
                row.status, row.error = "failed", "the model produced a non-finite or zero embedding"
                continue
            row.embedding_row = len(embs)
            embs.append(vec)
            thumb = self.thumbs[local]
            kept.append(thumb() if callable(thumb) else thumb)
        emb = np.stack(embs).astype(np.float32) if embs else np.zeros((0, self.dim), np.float32)
        th = np.stack(kept) if kept else np.zeros((0, THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
        shard = Shard(mark.shard, mark.start, mark.stop, emb, self.rows, th)
        self._start_shard()
        return shard


def _plan(
    records: Iterator[Record], first_shard: int, next_row: int, shard_rows: int, unit_rows: int
) -> Iterator[Unit | ShardMark]:
    """Cut the record stream into units of at most unit_rows records that never cross a shard,
    with a mark after each shard's last unit (a shard may have no records, e.g. all skipped)."""
    number, shard_start, last_row = first_shard, next_row, next_row - 1
    group: list[Record] = []
    for rec in records:
        while rec.source_row >= (number + 1) * shard_rows:
            if group:
                yield Unit(number, group)
                group = []
            yield ShardMark(number, shard_start, (number + 1) * shard_rows)
            number, shard_start = number + 1, (number + 1) * shard_rows
        group.append(rec)
        last_row = rec.source_row
        if len(group) >= unit_rows:
            yield Unit(number, group)
            group = []
    if group:
        yield Unit(number, group)
    if last_row + 1 > shard_start:
        yield ShardMark(number, shard_start, last_row + 1)


class _Workers:
    """n daemon threads running one function on submitted arguments; each submission returns a
    Future, which the caller takes in submission order. Daemon threads, so an interrupted run
    exits without waiting for a long job (a segmentation batch) to finish."""

    def __init__(self, n: int, fn: Callable[[Any], Any]) -> None:
        self._fn, self._stop = fn, threading.Event()
        self._q: queue.SimpleQueue[tuple[Future, Any] | None] = queue.SimpleQueue()
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


def _in_order(steps: Iterator[Unit | ShardMark], workers: _Workers, ahead: int) -> Iterator[Future | ShardMark]:
    """Submit units to the workers as the plan yields them, and yield their futures (and the shard
    marks between them) in plan order, never more than `ahead` units in flight."""
    pending: deque = deque()
    queued = 0
    for step in steps:
        if isinstance(step, Unit):
            pending.append(workers.submit(step))
            queued += 1
        else:
            pending.append(step)
        # Take what is finished, and wait for the oldest unit when too much is queued.
        while pending and (queued > ahead or not isinstance(pending[0], Future) or pending[0].done()):
            first = pending.popleft()
            queued -= isinstance(first, Future)
            yield first
    yield from pending


class _Prefetch:
    """Reads an iterator on a background thread into a bounded queue (the dataset's parquet reads
    stay off the main thread); iterating it re-raises the reader's error where it happened."""

    _END = object()

    def __init__(self, source: Iterator[Any], size: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), name="gallery-reader", daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if self._stop.is_set():
                    return
                self._put((item, None))
        except BaseException as e:  # handed to the consumer
            self._put((self._END, e))
            return
        self._put((self._END, None))

    def _put(self, entry: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Any]:
        while True:
            item, error = self._q.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()


class _ShardWriter:
    """Writes finished shards on one background thread, in order; a failed write stops the ones
    after it and is raised in the caller at its next submit or at close."""

    def __init__(self, shards: ShardStore) -> None:
        self.shards = shards
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: deque[Future] = deque()
        self.failed = threading.Event()

    def _write(self, shard: Shard) -> None:
        if self.failed.is_set():
            return
        try:
            self.shards.write(shard)
        except BaseException:
            self.failed.set()
            raise
        shard.thumbnails = None  # on disk now; only embeddings and rows stay for the final join

    def submit(self, shard: Shard) -> None:
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # raises a write's error here
        if len(self.pending) >= 2:  # bounded: at most two shards' thumbnails in memory
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, shard))

    def close(self, wait: bool = True) -> None:
        if wait:
            while self.pending:
                self.pending.popleft().result()
        self.pool.shutdown(wait=wait, cancel_futures=not wait)


def _unit_result(future: Future, images_dir: Path) -> UnitResult:
    try:
        return future.result()
    except OSError as err:  # the worker's image file writes: a full or read-only disk
        raise PipelineError(f"writing to {images_dir} failed: {err.strerror or err}") from err


def build_gallery(
    records: Callable[[int], Iterator[Record]],
    total_rows: int | None,
    make_items: ItemMaker,
    embedder: Embedder,
    target: GalleryTarget,
    run_params: dict[str, Any],
    source: GallerySource,
    summary: RunSummary,
    *,
    batch_size: int,
    shard_rows: int,
    fresh: bool = False,
    progress: bool = True,
    item_stage_name: str = "decode",
    identity: VectorIdentity | None = None,
    embed_batch: BatchEmbed | None = None,
    rows_before: Callable[[int], int] | None = None,
) -> tuple[np.ndarray, list[ManifestRow]]:
    """Build (or resume building) a gallery store.

    Args:
        records: function start_row -> iterator of Records from that row on.
        total_rows: rows expected, for the progress bar (None if unknown).
        make_items: turns Records into their GalleryItems (this is where decoding happens).
        run_params: everything that determines the output; a resume with other params is refused.
        identity: what made the vectors, for the sidecar (default: embedder.identity).
        embed_batch: the main thread's batch embedding (default: pixels made by the workers;
            DeviceEmbedding decodes JPEGs on the GPU).
        rows_before: how many of the rows the bar counts come before dataset row n (default n; a
            partial build's rows are some of the dataset's), where a resume starts it.
    Returns:
        (embeddings float32 (N, D), manifest rows) as finally written.

    Records are read, and finished shards written, on background threads with bounded queues, so
    the main thread only feeds the model.
    """
    target.images_dir.mkdir(parents=True, exist_ok=True)
    build = StoreBuild(target.store_dir, run_params, fresh=fresh)
    done, next_row = _resume(build, summary)
    resumed = list(done)  # shards of an earlier run: signed by an earlier signature version, maybe
    plan = Parallelism.choose(embedder, target, batch_size)
    assembler = ShardAssembler(embed_batch or embed_pixels(embedder), batch_size, embedder.dim)
    # pixels made on the CPU: with the resizer the identity names (the device path's other formats: Pillow's)
    pixels = identity.pixels if identity is not None and identity.pixels in CPU_PIXELS else PIL_PIXELS
    pipeline = ItemPipeline(make_items, partial(write_image, target.images_dir), embedder.preprocess_cfg, pixels)
    workers = _Workers(plan.workers, UnitWorker(pipeline, embedder, in_lane=plan.lanes > 1))
    bar = tqdm(total=total_rows, initial=rows_before(next_row) if rows_before else next_row, unit="row",
               desc=f"embed -> {target.store_dir.name}", disable=not progress)
    t_start = time.perf_counter()
    reader = _Prefetch(records(next_row), size=4 * plan.unit_rows * plan.workers + batch_size)
    try:
        steps = _plan(iter(reader), len(done), next_row, shard_rows, plan.unit_rows)
        times = _assemble(_in_order(steps, workers, plan.ahead), assembler, build.shards, done, target, bar)
    finally:
        bar.close()
        reader.close()
        workers.close(timeout=30)
    summary.timed("embed", time.perf_counter() - t_start, "embed stage (wall)")
    _record_times(summary, plan, times, assembler.infer_seconds, item_stage_name)
    places: list[str | Path] = [target.images_dir, *([target.images_url] if target.images_url else [])]
    sign_resumed([r for shard in resumed for r in shard.rows], image_reader(*places),
                 embedder.preprocess_cfg.decode_min_side, summary, threads=plan.workers, progress=progress)
    with summary.stage("finalize store"):
        # `done` holds every shard of this run, verified at resume or just written: no second read.
        emb, all_rows = build.finalize(done, identity or embedder.identity, source, embedder.dim, THUMB_SIZE,
                                        onnx_file=embedder.source_file)
        remove_stale_files(target, all_rows)
    return emb, all_rows


def _assemble(
    steps: Iterator[Future | ShardMark],
    assembler: ShardAssembler,
    shards: ShardStore,
    done: list[Shard],
    target: GalleryTarget,
    bar: tqdm,
) -> dict[str, float]:
    """The main thread's part: take the units back in order into the open shard, close and write
    each shard at its mark (appended to `done`), and sum the workers' stage times."""
    times = dict.fromkeys(("items", "write", "preprocess", "infer"), 0.0)
    writer = _ShardWriter(shards)
    try:
        for step in steps:
            if isinstance(step, ShardMark):
                shard = assembler.close(step)
                writer.submit(shard)
                done.append(shard)
                continue
            res = _unit_result(step, target.images_dir)
            assembler.add(res)
            for key, value in res.times.items():
                times[key] += value
            bar.update(res.records)
        writer.close()
    finally:
        writer.close(wait=False)
    return times


def _resume(build: StoreBuild, summary: RunSummary) -> tuple[list[Shard], int]:
    """The shards an interrupted run completed, and the row to go on from."""
    done = list(build.shards.completed())
    next_row = done[-1].stop if done else 0
    if done:
        log.info("resuming: %d complete shard(s) found, continuing at row %d", len(done), next_row)
        kept = sum(len(shard.embeddings) for shard in done)
        summary.notes.append(f"resumed at row {next_row} from {len(done)} complete shard(s) ({kept:,} item(s) "
                             "embedded before the stop)")
        summary.count(RESUMED_COUNT, kept)
    return done, next_row


RESUMED_COUNT = "embedded before the stop"  # a resumed build's: its "embedded" count is this run's


def _record_times(
    summary: RunSummary, plan: Parallelism, times: dict[str, float], main_infer_s: float, item_stage_name: str
) -> None:
    where = f"{plan.lanes} lanes" if plan.lanes > 1 else "worker"
    summary.timed("embed/items", times["items"], f"{item_stage_name} ({where})")
    summary.timed("embed/write", times["write"], f"write files ({where})")
    summary.timed("embed/preprocess", times["preprocess"], f"preprocess+thumbnail ({where})")
    infer_where = where if plan.lanes > 1 else "main thread"
    summary.timed("embed/infer", times["infer"] + main_infer_s, f"inference ({infer_where})")


def remove_stale_files(target: GalleryTarget, rows: list[ManifestRow]) -> None:
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
