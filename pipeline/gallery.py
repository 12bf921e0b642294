"""Gallery building: dataset records in; image files, embeddings, thumbnails and manifest out.

One loop serves the standard run (one item per row) and the segmentation run (one item per person
crop): a producer thread turns records into items (decode, write, preprocess, thumbnail) while the
main thread runs the embedder, so decoding overlaps inference. Work is cut into shards of source
rows; each finished shard is saved with a completion marker, so a killed run resumes from the last
complete shard and produces exactly what an uninterrupted run would (batches never cross a shard).
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from .dataset import Record
from .embedders import Embedder
from .errors import PipelineError
from .images import ImageDecodeError, decode_image, encode_png, sniff_format
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


def image_file_name(source_row: int, ext: str) -> str:
    return f"img_{source_row:05d}.{ext}"


def make_standard_items(decode_min_side: int) -> ItemMaker:
    """Item maker for the standard run: one image per row, written unchanged when JPEG/PNG."""

    def items(records: list[Record]) -> list[list[GalleryItem]]:
        return [one(r) for r in records]

    def one(record: Record) -> list[GalleryItem]:
        row = ManifestRow(index=-1, file="", source_row=record.source_row, source=record.source)
        if record.data is None:
            row.status, row.error = "failed", record.error
            return [GalleryItem(row)]
        try:
            decoded = decode_image(record.data, min_side=decode_min_side)
        except ImageDecodeError as e:
            row.status, row.error, row.sha256 = "failed", str(e), sha256_bytes(record.data)
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
class _Batch:
    shard: int
    pixels: np.ndarray  # float32 (B, 3, H, W)
    local_ids: list[int]  # positions in the shard's row list
    rows_done: int  # source rows finished since the previous message


@dataclass
class _ShardEnd:
    shard: int
    start: int
    stop: int
    rows: list[ManifestRow]
    thumbs: dict[int, np.ndarray]  # local id -> thumbnail
    rows_done: int


class _Stop(Exception):
    pass


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

    Args:
        records: function start_row -> iterator of Records from that row on.
        total_rows: rows expected, for the progress bar (None if unknown).
        make_items: turns one Record into its GalleryItems (this is where decoding happens).
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
    first_shard = len(done)
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    producer_times = {"items": 0.0, "write": 0.0, "preprocess": 0.0}

    def put(msg: Any) -> None:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stop

    def produce() -> None:
        try:
            number = first_shard
            shard_start = next_row
            rows: list[ManifestRow] = []
            thumbs: dict[int, np.ndarray] = {}
            pixels: list[np.ndarray] = []
            ids: list[int] = []
            rows_done = 0
            last_row = next_row - 1

            def flush_batch() -> None:
                nonlocal pixels, ids, rows_done
                if pixels:
                    put(_Batch(number, np.stack(pixels), ids, rows_done))
                    pixels, ids, rows_done = [], [], 0

            def end_shard(stop_row: int) -> None:
                nonlocal rows, thumbs, rows_done, number, shard_start
                flush_batch()
                put(_ShardEnd(number, shard_start, stop_row, rows, thumbs, rows_done))
                rows, thumbs, rows_done = [], {}, 0
                number += 1
                shard_start = stop_row

            group: list[Record] = []

            def run_group() -> None:
                nonlocal rows_done
                t0 = time.perf_counter()
                made = make_items(group)
                t1 = time.perf_counter()
                for items in made:
                    for item in items:
                        if item.data is not None:
                            atomic_write_bytes(target.images_dir / item.row.file, item.data)
                t2 = time.perf_counter()
                for items in made:
                    for item in items:
                        local = len(rows)
                        rows.append(item.row)
                        if item.image is None or item.row.status != "ok":
                            continue
                        resized = resize_for_model(item.image, cfg)
                        pixels.append(to_model_input(resized, cfg))
                        thumbs[local] = make_thumbnail(resized)
                        ids.append(local)
                        if len(pixels) >= batch_size:
                            flush_batch()
                    rows_done += 1
                producer_times["items"] += t1 - t0
                producer_times["write"] += t2 - t1
                producer_times["preprocess"] += time.perf_counter() - t2
                group.clear()

            for rec in records(next_row):
                if rec.source_row >= (number + 1) * shard_rows:
                    if group:
                        run_group()
                    while rec.source_row >= (number + 1) * shard_rows:
                        end_shard((number + 1) * shard_rows)
                group.append(rec)
                last_row = rec.source_row
                if len(group) >= target.group_size:
                    run_group()
                if stop.is_set():
                    raise _Stop
            if group:
                run_group()
            if rows or last_row + 1 > shard_start:
                end_shard(last_row + 1)
            put(None)
        except _Stop:
            return
        except BaseException as e:  # handed to the main thread, which raises it
            try:
                put(("error", e))
            except _Stop:
                pass

    thread = threading.Thread(target=produce, name="gallery-producer", daemon=True)
    bar = tqdm(total=total_rows, initial=next_row, unit="row", desc=f"embed -> {target.store_dir.name}", disable=not progress)
    infer_time = 0.0
    current: dict[int, np.ndarray] = {}
    t_start = time.perf_counter()
    thread.start()
    try:
        while True:
            msg = q.get()
            if msg is None:
                break
            if isinstance(msg, tuple) and msg[0] == "error":
                err = msg[1]
                if isinstance(err, OSError):
                    raise PipelineError(f"writing to {target.images_dir} failed: {err.strerror or err}") from err
                raise err
            if isinstance(msg, _Batch):
                t = time.perf_counter()
                emb = embedder.embed(msg.pixels)
                infer_time += time.perf_counter() - t
                for local, vec in zip(msg.local_ids, emb):
                    current[local] = vec
                bar.update(msg.rows_done)
                continue
            shard = _close_shard(msg, current, embedder.dim)
            shards.write(shard)
            shard.thumbnails = None  # on disk now; only embeddings and rows stay for the final join
            done.append(shard)
            current = {}
            bar.update(msg.rows_done)
    except BaseException:
        stop.set()
        raise
    finally:
        bar.close()
        stop.set()
        thread.join(timeout=30)
    summary.stages["embed stage (wall)"] = time.perf_counter() - t_start
    summary.stages[f"  {item_stage_name} (producer)"] = producer_times["items"]
    summary.stages["  write files (producer)"] = producer_times["write"]
    summary.stages["  preprocess+thumbnail (producer)"] = producer_times["preprocess"]
    summary.stages["  inference"] = infer_time
    with summary.stage("finalize store"):
        # `done` holds every shard of this run, verified at resume or just written: no second read.
        emb, rows = finalize_store(target.store_dir, shards, done, embedder.identity, source, embedder.dim, THUMB_SIZE)
        shards.remove()
        _remove_stale_files(target, rows)
    return emb, rows


def _close_shard(msg: _ShardEnd, vectors: dict[int, np.ndarray], dim: int) -> Shard:
    """Number the shard's embeddings in item order; a non-finite or zero vector fails its item."""
    embs, thumbs = [], []
    for local, row in enumerate(msg.rows):
        if local not in msg.thumbs:
            continue
        vec = vectors.get(local)
        if vec is None or not np.all(np.isfinite(vec)) or not np.any(vec):
            row.status, row.error = "failed", "the model produced a non-finite or zero embedding"
            continue
        row.embedding_row = len(embs)
        embs.append(vec)
        thumbs.append(msg.thumbs[local])
    emb = np.stack(embs).astype(np.float32) if embs else np.zeros((0, dim), np.float32)
    th = np.stack(thumbs) if thumbs else np.zeros((0, THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
    return Shard(msg.shard, msg.start, msg.stop, emb, msg.rows, th)


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
