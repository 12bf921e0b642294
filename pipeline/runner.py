"""Modes: each is one function from a RunConfig to a RunSummary. The gallery modes (standard and
segmentation, built or from cache) share one path: gallery -> neighbours -> pictures -> matrix -> plots.
"""
from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from .config import RunConfig
from .dataset import count_rows, iter_records
from .embedders import make_embedder, requested_identity
from .errors import PipelineError
from .gallery import GalleryTarget, build_gallery, make_standard_items, record_failures
from .plots import compose_matches, save_heatmap, save_histogram, save_jpeg
from .report import RunSummary
from .retrieval import iter_neighbour_rows, topk_neighbours, write_neighbours_csv
from .store import (
    GalleryCache,
    ManifestRow,
    OutputLock,
    ThumbnailReader,
    embedded_rows,
    load_cache,
    remove_temp_leftovers,
)

log = logging.getLogger(__name__)

_SEGMENT_FILES = re.compile(r"seg_\d+_(p\d+|full)\.png$")


@contextmanager
def output_session(cfg: RunConfig) -> Iterator[None]:
    """Hold --output-dir's lock for a run, and first clear the temp files a killed run left in the
    folders of the output layout."""
    with OutputLock(cfg.output_dir):
        removed = sum(remove_temp_leftovers(p) for p in cfg.owned_folders())
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run in %s", removed, cfg.output_dir)
        yield


def segmenter_factory(cfg: RunConfig):
    """The segmenter for a run (a function, so tests can substitute one with known masks)."""
    from .segment import make_segmenter

    return make_segmenter(cfg.segment, device=cfg.embedder.device)


def gallery_source(cfg: RunConfig) -> dict[str, Any]:
    """What the gallery is made from; stored in the sidecar and part of the resume check."""
    src = {"kind": "segment" if cfg.segmented else "standard", **cfg.dataset.as_dict()}
    if cfg.segmented:
        seg = cfg.segment
        src.update(seg_model=seg.model, seg_backend=seg.backend, seg_conf=seg.conf, seg_imgsz=seg.imgsz, keep_unsegmented=seg.keep_unsegmented)
    return src


def requested_source(cfg: RunConfig) -> dict[str, Any]:
    """The source keys the user typed, compared against a cache (defaults are not a request)."""
    full = gallery_source(cfg)
    keys = {"kind"} | {k for k in full if k in cfg.explicit}
    return {k: full[k] for k in keys}


def load_gallery_cache(cfg: RunConfig, identity: dict[str, Any] | None = None) -> GalleryCache:
    """Load embeddings/ (or embeddings_segment/) and check it against files and the request."""
    return load_cache(
        cfg.store_dir,
        cfg.images_dir,
        identity=identity if identity is not None else requested_identity(cfg.embedder),
        source=requested_source(cfg),
    )


def build_or_load_gallery(cfg: RunConfig, summary: RunSummary, embedder=None) -> tuple[np.ndarray, list[ManifestRow], Any]:
    """The gallery for this run: from cache when asked, else built (or resumed).

    Returns:
        (embeddings float32 (N, D), manifest rows, the embedder or None when loaded from cache)
    """
    if cfg.from_cache:
        with summary.stage("load cache"):
            ident = embedder.identity if embedder is not None else None
            cache = load_gallery_cache(cfg, identity=ident)
        log.info("loaded %d embeddings from %s", len(cache.embeddings), cfg.store_dir)
        return cache.embeddings, cache.rows, embedder
    total_rows = count_rows(cfg.dataset)  # opens the dataset: a bad one fails before the model loads
    with summary.stage("load model"):
        embedder = embedder or make_embedder(cfg.embedder)
    if cfg.segmented:
        from .segment import make_segment_items

        with summary.stage("load segmenter"):
            segmenter = segmenter_factory(cfg)
        make_items = make_segment_items(segmenter, cfg.segment)
        target = GalleryTarget(cfg.images_dir, cfg.store_dir, owned_files=_SEGMENT_FILES, group_size=8)
        stage_name = "decode+segment+crop"
    else:
        make_items = make_standard_items(embedder.preprocess_cfg.decode_min_side)
        target = GalleryTarget(cfg.images_dir, cfg.store_dir, parallel_items=True)
        stage_name = "decode"
    source = gallery_source(cfg)
    run_params = {
        "source": source,
        "identity": embedder.identity,
        "batch_size": cfg.batch_size,
        "shard_rows": cfg.shard_rows,
    }
    emb, rows = build_gallery(
        records=lambda start: iter_records(cfg.dataset, start),
        total_rows=total_rows,
        make_items=make_items,
        embedder=embedder,
        target=target,
        run_params=run_params,
        source=source,
        summary=summary,
        batch_size=cfg.batch_size,
        shard_rows=cfg.shard_rows,
        fresh=cfg.fresh,
        progress=cfg.progress,
        item_stage_name=stage_name,
    )
    if cfg.segmented and hasattr(segmenter, "predict_seconds"):
        summary.stages["    of which segmentation predict"] = segmenter.predict_seconds
    return emb, rows, embedder


def run_gallery(cfg: RunConfig) -> RunSummary:
    """Standard or segmentation run: build or load the gallery, then neighbours, pictures, plots."""
    mode = ("segmentation" if cfg.segmented else "standard") + (" (from cache)" if cfg.from_cache else "")
    summary = RunSummary(mode=mode)
    emb, rows, _ = build_or_load_gallery(cfg, summary)
    record_failures(rows, summary)
    summary.count("rows", len({r.source_row for r in rows}))
    if cfg.segmented:
        summary.count("crops", sum(1 for r in rows if r.person >= 0 and r.status == "ok"))
        summary.count("rows without person", sum(1 for r in rows if r.status == "no_person"))
    summary.count("embedded", len(emb))
    summary.count("failed", len(summary.failures))
    summary.outputs["images"] = str(cfg.images_dir)
    summary.outputs["embeddings"] = str(cfg.store_dir)
    write_retrieval_outputs(cfg, emb, rows, summary)
    return summary


def write_retrieval_outputs(cfg: RunConfig, emb: np.ndarray, rows: list[ManifestRow], summary: RunSummary) -> None:
    """Neighbour table, one composite picture per query, the distance matrix, heatmap, histogram."""
    embedded = embedded_rows(rows)
    n = len(embedded)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    cfg.plots_dir.mkdir(parents=True, exist_ok=True)
    if n < 2:
        summary.notes.append(f"only {n} embedded item(s): no neighbours, matrix or plots")
        return
    ids = [r.index for r in embedded]
    files = [r.file for r in embedded]
    matrix = cfg.plots_dir / f"distance_matrix{cfg.suffix}.npy" if n <= cfg.max_matrix else None
    with summary.stage("neighbours" + (" + distance matrix" if matrix else "")):
        nb = topk_neighbours(emb, emb, cfg.top_k, exclude_self=True, matrix_path=matrix)
        table = cfg.results_dir / "neighbours.csv"
        write_neighbours_csv(table, iter_neighbour_rows(nb, ids, files, ids, files))
    summary.outputs["neighbour table"] = str(table)
    if matrix:
        summary.outputs["distance matrix"] = f"{matrix} (rows = manifest embedding_row)"
    else:
        summary.notes.append(f"{n} items > --max-matrix {cfg.max_matrix}: distance matrix not saved (neighbours were computed blockwise)")
    with summary.stage("result pictures"):
        written = write_result_pictures(cfg, nb, files)
    summary.count("result pictures", written)
    summary.outputs["result pictures"] = f"{cfg.results_dir}/*_matches.jpg"
    with summary.stage("plots"):
        heat = cfg.plots_dir / f"distance_heatmap{cfg.suffix}.png"
        save_heatmap(emb, heat)
        hist = cfg.plots_dir / f"nearest_neighbour_hist{cfg.suffix}.png"
        save_histogram(nb.distances[:, 0], hist, title=f"Distance to the nearest other item ({n} items)")
    summary.outputs["heatmap"] = str(heat)
    summary.outputs["histogram"] = str(hist)


def write_result_pictures(cfg: RunConfig, nb, files: list[str]) -> int:
    """One composite per query (query + top-k with distances) from the stored thumbnails."""
    for old in cfg.results_dir.glob("*_matches.jpg"):
        old.unlink()
    limit = len(files) if cfg.max_result_images is None else min(cfg.max_result_images, len(files))
    if limit == 0:
        return 0
    reader = ThumbnailReader(cfg.store_dir / "thumbnails.npy")

    def one(i: int) -> None:
        labels, tiles = [], []
        for j, d in zip(nb.indices[i], nb.distances[i]):
            if j < 0:
                continue
            tiles.append(reader_get(j))
            labels.append(f"d={d:.3f}\n{files[j]}")
        pic = compose_matches(reader_get(i), f"query\n{files[i]}", tiles, labels)
        save_jpeg(pic, cfg.results_dir / f"{Path(files[i]).stem}_matches.jpg")

    lock = threading.Lock()

    def reader_get(j: int) -> np.ndarray:
        with lock:
            return reader[j].copy()

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(tqdm(pool.map(one, range(limit)), total=limit, desc="result pictures", unit="pic", disable=not cfg.progress))
    finally:
        reader.close()
    return limit


def run_export(cfg: RunConfig, per_tensor: bool = False, quantization: str = "static", sample_rows: int = 96) -> RunSummary:
    """--export-onnx: fp32 + int8 ONNX image encoders from --model, verified before they land.

    The first `sample_rows` readable rows of --dataset (the default dataset unless another is
    given) are split: two thirds calibrate the int8 ranges, one third checks the result. Only
    when the dataset cannot be read (offline, say) do generated pictures serve both (two
    different sets), with a warning: static int8 ranges fitted to synthetic pictures are
    worse than ranges fitted to the catalogue.
    """
    from .export import export_onnx, verification_images

    summary = RunSummary(mode="export-onnx")
    images, calibration = verification_images(), None
    with summary.stage("read calibration rows"):
        sample, why = calibration_sample(cfg, sample_rows)
    if len(sample) >= 6:
        cut = len(sample) * 2 // 3
        calibration, images = sample[:cut], sample[cut:]
        summary.notes.append(f"calibrated on {cut} and verified on {len(images)} rows of {cfg.dataset.name}")
    else:
        why = why or f"only {len(sample)} readable image(s)"
        log.warning("cannot calibrate on %s (%s): calibrating and verifying on generated pictures instead; "
                    "pass a readable --dataset to fit the int8 ranges to real photos", cfg.dataset.name, why)
        summary.notes.append(f"calibrated on generated pictures: {cfg.dataset.name} could not be read ({why})")
    with summary.stage("export+quantize+verify"):
        report = export_onnx(
            cfg.embedder.model, cfg.embedder.onnx, images=images, per_channel=not per_tensor,
            quantization=quantization, calibration_images=calibration,
        )
    summary.notes.extend(report.lines())
    summary.count("verification images", report.images)
    summary.outputs["int8 model"] = str(report.int8_path)
    summary.outputs["fp32 model"] = str(report.fp32_path)
    return summary


def calibration_sample(cfg: RunConfig, rows: int) -> tuple[list, str]:
    """The first `rows` decodable images of the run's dataset, and why none could be read ("" if
    the dataset opened). Only the rows needed are fetched (see dataset.iter_records)."""
    from .images import ImageDecodeError, decode_image

    sample = []
    try:
        for rec in iter_records(cfg.dataset):
            if len(sample) >= rows:
                break
            try:
                if rec.data:
                    sample.append(decode_image(rec.data).image)
            except ImageDecodeError:
                continue
    except PipelineError as e:
        return sample, str(e).splitlines()[0]
    return sample, ""
