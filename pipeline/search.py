"""Search and evaluation.

Query: image files or texts in; their top-k items of a cached gallery out (one composite picture per
query and a results table). Evaluate: a dataset with ground truth in; Recall@1/5/10 and MRR per
backend out (table, outputs/evaluation.json, outputs/evaluation.png).
"""

from __future__ import annotations

import json
import logging
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .backends import EVAL_BACKENDS, ONNXRUNTIME, model_by_name
from .catalog import Catalog
from .config import RunConfig
from .dataset import (
    IMAGE_SUFFIXES,
    DatasetSpec,
    arrow_numpy,
    check_columns,
    count_rows,
    folder_column,
    is_image_folder,
    iter_records,
    list_pictures,
    parquet_column_names,
)
from .derived import QUERY_TABLE, made_on, query_pictures
from .embedders import Embedder, EmbedderSpec, available_cores, make_embedder, on_cuda
from .errors import PipelineError, UsageError, first_line
from .export import fp32_path_for
from .fileio import atomic_write_text, printable_name, sha256_bytes
from .galleries import open_catalog, segmenter_factory
from .identity import VectorIdentity
from .images import ImageDecodeError, decode_image
from .machine import cpu_label
from .metadata import prefixed_name
from .persons import Segmenter, person_crops
from .plots import (
    THUMB_SIZE,
    compose_matches,
    make_thumbnail,
    neighbour_tiles,
    pyplot,
    save_figure,
    save_jpeg,
    text_tile,
)
from .preprocess import PIL_PIXELS, PreprocessConfig, cpu_pixels, preprocess_batch
from .report import RunSummary
from .retrieval import Neighbours, group_layout, iter_neighbour_rows, write_neighbours_csv
from .webreport import Section, relative_link, write_section

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
# Tiles of the query pictures: the query picture itself and the matches' image files hold more than
# the store's THUMB_SIZE thumbnails, and a query run draws a handful of pictures, not one per item.
QUERY_TILE = 224
# a picture's suffix at the end of a label, before a person's #p0, or before a picture-plus-text query's text
_IMAGE_SUFFIX = re.compile("(?:" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")(?=#| “| −|$)", re.IGNORECASE)


# ----------------------------------------------------------------------------- query
@dataclass
class Query:
    label: str  # file name (and person) or the text itself
    kind: str  # "image" | "text"
    tile: np.ndarray  # uint8 (T, T, 3) for the composite


def expand_image_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given, folders expanded to their pictures as a gallery lists an image folder (natural
    order, hidden files aside, linked folders walked; a file that cannot be read is listed, to be
    recorded as failed); a missing path, or none found, is a usage error (exit 2), raised before
    any model is loaded."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [p / rel for rel in list_pictures(p)]
        elif p.exists():
            out.append(p)
        else:
            raise UsageError(f"query image {p} does not exist")
    if not out:
        raise UsageError("no query images found in " + ", ".join(map(str, paths)))
    return out


SAID_QUERIES = 5  # the queries whose best matches the summary says
RRF_COLUMN = "rrf_score"  # query_results.csv: a reciprocal-rank fusion's score, which ranks its matches


def query_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Each query picture's label: its file name, or where pictures share it (SKU1/front.jpg and
    SKU2/front.jpg of a folder) as many of its last folders as tell it apart (the whole path as given
    where none do), so that no two queries' rows read alike and none reads /home/me/... in full."""
    def tail(p: Path, depth: int) -> str:
        return Path(*p.parts[-depth:]).as_posix()  # /f.jpg whole, not //f.jpg

    depth = dict.fromkeys(paths, 1)  # a picture given twice is one picture
    while True:
        labels = {p: tail(p, depth[p]) for p in depth}
        seen = Counter(labels.values())
        alike = [p for p in depth if seen[labels[p]] > 1 and depth[p] < len(p.parts)]
        if not alike:
            return {p: printable_name(labels[p] if seen[labels[p]] == 1 else str(p)) for p in paths}
        for p in alike:
            depth[p] += 1


def run_query(cfg: RunConfig) -> RunSummary:
    """--query-image / --query-text against the cached gallery (embeddings/ or embeddings_segment/)."""
    summary = RunSummary(mode="query")
    paths = expand_image_paths(cfg.query.images) if cfg.query.images else []  # a typo fails before the model loads
    catalog = open_catalog(cfg, summary)
    allowed = catalog.searcher.allowed(cfg.filter)  # a bad filter fails before any query is embedded
    if cfg.query.images and (cfg.query.texts or cfg.query.negative):
        queries, nb = combined_queries(cfg, catalog, summary, paths)
    else:
        if cfg.query.negative:
            raise UsageError("--negative-text subtracts from a picture: give --query-image too")
        queries, vectors = embed_queries(cfg, catalog, summary, paths)
        with summary.stage("search"):
            nb = catalog.searcher.neighbours(np.concatenate(vectors), cfg.top_k, allowed)
    summary.notes.append("search: " + catalog.searcher.describe())
    if cfg.dedup:
        groups, photos = catalog.searcher.dedup_groups()
        summary.notes.append(f"--dedup: each duplicate group stands once in the results ({photos:,} photos in "
                             f"{groups:,} groups)" if groups else "--dedup: no duplicate groups found in the gallery")
    if allowed is not None:
        matching = int(allowed.sum())
        summary.count("items matching the filter", matching)
        summary.notes.append(
            f"--filter {cfg.filter!r}: {matching:,} of {len(allowed):,} items match; "
            f"{catalog.searcher.filtered_how(matching)}"
            + ("" if matching else ": nothing to return")
        )
    out_dir = cfg.queries_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    names, ids = [r.file for r in catalog.searcher.rows], [r.index for r in catalog.searcher.rows]
    # the captions, what the user knows the photos by: of the hits alone (a gallery may hold millions)
    shown = {int(j): catalog.searcher.rows[int(j)].shown_name for j in np.unique(nb.indices) if j >= 0}
    for i, query in enumerate(queries[:SAID_QUERIES]):  # the answer on the console too, its best few
        best = [f"{shown[int(j)]} {d:.3f}" for j, d in zip(nb.indices[i][:3], nb.distances[i][:3]) if j >= 0]
        summary.notes.append(f"{query.label}: {', '.join(best) or 'no match'}")
    if len(queries) > SAID_QUERIES:
        summary.notes.append(f"... {len(queries) - SAID_QUERIES} more queries: every match is in query_results.csv")
    with summary.stage("pictures"):
        pictures = []
        for i, query in enumerate(queries):
            tiles, labels = neighbour_tiles(nb.indices[i], nb.distances[i], lambda j: match_tile(catalog, j), shown)
            pic = compose_matches(query.tile, query.kind, tiles, labels, title=f"{query.kind} query: {query.label}")
            pictures.append(out_dir / picture_name(i, query))
            save_jpeg(pic, pictures[-1])
        remove_other_pictures(out_dir, pictures)
    table = out_dir / QUERY_TABLE
    # the queries go in by number (iter_neighbour_rows takes int query ids) and come out as their labels
    sources = [r.source for r in catalog.searcher.rows]  # what the user knows each photo by
    flat = iter_neighbour_rows(nb, range(len(queries)), [q.label for q in queries], ids, names,
                               [""] * len(queries), sources)
    rows = [(label, queries[qi].kind, rank, name, row, d, source)
            for qi, label, rank, row, name, d, _, source in flat]
    hits = [int(j) for row in nb.indices for j in row if j >= 0]  # each row's gallery item (same order as `flat`)
    meta = catalog.searcher.metadata
    extra = meta.columns if meta is not None else []
    if meta is not None:  # each hit's metadata values after its columns
        rows = [(*r, *meta.values(j).values()) for r, j in zip(rows, hits)]
    own: tuple[str, ...] = ("query", "kind", "rank", "gallery_file", "row", "distance", "gallery_source")
    written: list[tuple[Any, ...]] = list(rows)
    fused: tuple[str, ...] = ()
    if nb.scores is not None:  # a rank fusion: the score that ranks each match, last (every other column in its place)
        scores = [float(s) for line, found in zip(nb.scores, nb.indices) for s, j in zip(line, found) if j >= 0]
        written = [(*r, round(s, 6)) for r, s in zip(rows, scores)]
        fused = (RRF_COLUMN,)
    # `kind`, `rank` of the catalogue: meta_kind, ...
    columns = (*own, *(prefixed_name(c, (*own, *fused)) for c in extra), *fused)
    write_neighbours_csv(table, iter(written), columns=columns)
    summary.count("queries", len(queries))
    summary.outputs["results"] = str(table)
    summary.outputs["pictures"] = f"{out_dir}/q*.jpg"
    with summary.stage("report"):
        pics = [relative_link(p, cfg.plots_dir) for p in pictures]
        data = {"pictures": pics, "rows": [[r[0], r[1], r[2], r[3], r[5], r[6], shown[j]] for r, j in zip(rows, hits)],
                # retired when the store, or the catalogue's values in its table, change
                "made_on": made_on(cfg.store_dir, cfg.output_dir, out_dir, values=True)}
        title = f"Queries ({len(queries)})" + (" on the segmented gallery" if cfg.segmented else "")
        section = Section("query" + cfg.suffix, "query", title, summary, data)
        summary.outputs["report"] = str(write_section(cfg.plots_dir, section))
    return summary


def combined_queries(cfg: RunConfig, catalog: Catalog, summary: RunSummary,
                     paths: Sequence[Path] | None = None) -> tuple[list[Query], Neighbours]:
    """--query-image with --query-text (and --negative-text): one query per picture (per person in
    it with --use-segmentation), the picture and the texts fused (Catalog.search_combined). paths:
    the query pictures, cfg.query.images expanded (expand_image_paths) when not given."""
    q = cfg.query
    paths = expand_image_paths(q.images) if paths is None else paths
    words = " + ".join(f"“{t}”" for t in q.texts) + "".join(f" − “{t}”" for t in q.negative)
    words = words.removeprefix(" ")  # a picture less a text alone: one space before its minus
    queries: list[Query] = []
    rows: list[list[tuple[int, float, float | None]]] = []
    labels = query_labels(paths)
    with summary.stage("picture + text queries"):
        for path in paths:
            try:
                crops, _ = catalog.query_crops(path, segment=cfg.segmented, name=labels[path])
                found = catalog.search_combined(path, q.texts, q.negative, cfg.top_k, q.fusion, q.weight_of_texts,
                                                segment=cfg.segmented, filter=cfg.filter, name=labels[path])
            except (ImageDecodeError, OSError) as e:
                summary.fail(printable_name(str(path)), str(e))
                continue
            for crop, result in zip(crops, found):
                queries.append(Query(f"{result.label} {words}", "image+text", make_thumbnail(crop.image, QUERY_TILE)))
                rows.append([(h.row, h.distance, h.score) for h in result.hits])
    if not queries:
        raise PipelineError(unreadable_queries(summary))
    how = (f"weighted sum, texts x {q.text_weight:g}" if q.fusion == "sum" else
           f"reciprocal-rank fusion: ranked by the fused score, query_results.csv's {RRF_COLUMN}; each match's "
           "distance is its nearest to the picture or a text, so it need not ascend")
    summary.notes.append(f"picture + text: one query per picture ({how})")
    idx = np.full((len(rows), cfg.top_k), -1, np.int64)
    dist = np.full((len(rows), cfg.top_k), np.inf, np.float32)
    fused = np.zeros((len(rows), cfg.top_k), np.float64) if q.fusion == "rrf" else None
    for i, hits in enumerate(rows):
        for r, (j, d, s) in enumerate(hits):
            idx[i, r], dist[i, r] = j, d
            if fused is not None and s is not None:
                fused[i, r] = s
    return queries, Neighbours(idx, dist, fused)


def embed_queries(cfg: RunConfig, catalog: Catalog, summary: RunSummary,
                  paths: Sequence[Path] | None = None) -> tuple[list[Query], list[np.ndarray]]:
    """The run's query pictures (each person in them with --use-segmentation) and texts, with their
    vectors; a picture that cannot be read is recorded in the summary. paths: the query pictures,
    cfg.query.images expanded (expand_image_paths) when not given."""
    if paths is None:
        paths = expand_image_paths(cfg.query.images) if cfg.query.images else []
    queries: list[Query] = []
    vectors: list[np.ndarray] = []
    if paths:
        labels = query_labels(paths)
        with summary.stage("embed image queries"):
            for path in paths:
                try:
                    crops, found = catalog.query_crops(path, segment=cfg.segmented, name=labels[path])
                except (ImageDecodeError, OSError) as e:
                    summary.fail(printable_name(str(path)), str(e))
                    continue
                if cfg.segmented and not found:
                    summary.notes.append(f"{labels[path]}: no person cut from it (none found, or none with a mask): "
                                         "the whole image is the query")
                vectors.append(catalog.embed_crops(crops))
                queries += [Query(c.label, "image", make_thumbnail(c.image, QUERY_TILE)) for c in crops]
    if cfg.query.texts:
        with summary.stage("embed text queries"):
            vectors.append(catalog.embedder.embed_text(list(cfg.query.texts)))
            queries += [Query(t, "text", text_tile(t, QUERY_TILE)) for t in cfg.query.texts]
    if not queries:
        raise PipelineError(unreadable_queries(summary))
    return queries, vectors


def unreadable_queries(summary: RunSummary, shown: int = 3) -> str:
    """The error of a run none of whose query pictures could be read: each one's reason (the first
    `shown`), as a run with one good picture beside them lists them."""
    reasons = [f"{Path(item).name}: {reason}" for item, reason in summary.failures[:shown]]
    more = f"; and {len(summary.failures) - shown} more" if len(summary.failures) > shown else ""
    return "none of the query images could be read" + (f" ({'; '.join(reasons)}{more})" if reasons else "")


def query_slug(text: str, limit: int = 40) -> str:
    """A query as a file name's part: its letters, marks and digits, any script's (robe_été, not
    robe_t; a Devanagari vowel sign kept), the rest runs of '_'."""
    kept = "".join(ch if ch in ".-" or unicodedata.category(ch)[0] in "LMN" else "_"
                   for ch in unicodedata.normalize("NFC", text))
    return re.sub(r"_+", "_", kept)[:limit].strip("_") or "query"


def picture_name(i: int, query: Query) -> str:
    """The i-th query's picture: q000_img_3f2a9c1e0b4d5a6f.jpg for img_3f2a9c1e0b4d5a6f.jpg (its own suffix dropped, not
    doubled), q001_look_p0.jpg for a person in look.png, q002_red_floral_dress.jpg for a text."""
    return f"q{i:03d}_{query_slug(_IMAGE_SUFFIX.sub('', query.label))}.jpg"


def remove_other_pictures(folder: Path, written: Sequence[Path]) -> int:
    """Delete the query pictures (QUERY_PICTURE names only) that this run did not write, so the folder
    holds this run's pictures and no stale ones of earlier queries. Returns how many went."""
    keep = {p.name for p in written}
    stale = [p for p in query_pictures(folder) if p.name not in keep]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def match_tile(catalog: Catalog, row: int, size: int = QUERY_TILE) -> np.ndarray:
    """A gallery item's tile for a query picture, uint8 (size, size, 3): made from its image file when
    that is here (the store keeps THUMB_SIZE thumbnails only), else its thumbnail enlarged."""
    path = catalog.cache.images_dir / catalog.searcher.rows[row].file
    try:
        return make_thumbnail(decode_image(path.read_bytes(), min_side=size).image, size)
    except (OSError, ImageDecodeError):  # not here (a URL --output-dir keeps images in the bucket)
        thumb = Image.fromarray(catalog.thumbnail(row))
        return np.asarray(thumb if size == THUMB_SIZE else thumb.resize((size, size), Image.Resampling.LANCZOS))


# ----------------------------------------------------------------------------- evaluation
# Cosine similarities this close are one score to the evaluation: float32 products of unit vectors of
# up to ~1,000 dimensions round by a few units of 1e-7, so equal photos may score apart by that much
TIE = 2e-6


def ranks_of_positives(
    queries: np.ndarray,
    gallery: np.ndarray,
    positives: list[np.ndarray],
    exclude: np.ndarray | Sequence[np.ndarray] | None = None,
    block: int = 512,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """1-based rank of the best-ranked positive for each query (ties, scores within TIE of each other:
    the positive counts as worse).

    Args:
        queries: float32 (Q, D), gallery: float32 (N, D), both L2-normalized.
        positives: per query, int array of gallery indices that are right answers.
        exclude: per query, a gallery index not to rank (the query itself), or -1; or an int array of
            them (the query and its byte-identical copies).
        groups: int (N,), --group-by: each gallery item's product. Ranks then count products,
            each scored by its best item, and a product holding any positive is a right answer.
    """
    ranks = np.empty(len(queries), dtype=np.int64)
    order = starts = None
    if groups is not None:
        order, bounds, dense = group_layout(groups)  # dense: each item's group, 0 .. G-1
        starts = bounds[:-1]
    for s in range(0, len(queries), block):
        sims = queries[s : s + block] @ gallery.T
        for k in range(sims.shape[0]):
            qi = s + k
            row, pos = sims[k], positives[qi]
            if exclude is not None:
                out = np.asarray(exclude[qi])
                row[out[out >= 0]] = -np.inf
            if order is not None and starts is not None:
                row, pos = np.fmax.reduceat(row[order], starts), np.unique(dense[pos])  # a NaN photo spoils no product
            scores = row[pos]
            if np.isnan(scores).all():  # a non-finite query or answer: its answer last, never first
                ahead = np.count_nonzero(row != -np.inf) - np.count_nonzero(scores != -np.inf)
            else:
                # within TIE of the best positive is a tie: the same photo twice in the gallery scores
                # alike only up to the matrix product's rounding (1e-7 apart, either way round)
                best = np.nanmax(scores) - TIE
                # everything not scoring below the best positive, other than positives: a NaN (a
                # model's non-finite vector) is never below it, so it counts as ahead
                ahead = np.count_nonzero(~(row < best)) - np.count_nonzero(~(scores < best))
            ranks[qi] = ahead + 1
    return ranks


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float | None]:
    """Recall@k and MRR of the ranks; None (JSON null, "—" in the table) when there was no query."""
    out: dict[str, float | None] = {
        f"recall@{k}": float(np.mean(ranks <= k)) if len(ranks) else None for k in RECALL_AT}
    out["mrr"] = float(np.mean(1.0 / ranks)) if len(ranks) else None
    out["queries"] = int(len(ranks))
    return out


def product_ids(values: Sequence) -> list[str | None]:
    """The product an id names: the id_XXXXXXXX part when present, starting a word (DeepFashion
    In-shop's item_ID names product and view together), the whole value otherwise; None for a missing one (null,
    empty, NaN), which names no product (rows without an id are not one product together)."""
    out: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v) or str(v).strip() == "":
            out.append(None)
            continue
        # a word of its own: "plaid_7" names itself, and "id_2023A" is not "id_2023B"'s product
        m = re.search(r"(?<![A-Za-z0-9])id_\d+(?![A-Za-z0-9])", str(v))
        out.append(m.group(0) if m else str(v))
    return out


# evaluation.json's "first_batch", as the summary says it: whether batches after each model's first were timed
FIRST_BATCH_SAID = {True: "not timed (warm-up)", False: "timed (the only one)"}


class EvalBatcher:
    """Collects decoded images and embeds them a batch at a time with every backend, remembering
    each vector's row. Pixels are preprocessed once per distinct preprocessing, not per backend."""

    def __init__(self, embedders: dict[str, Embedder], batch_size: int, failed: dict[str, str] | None = None,
                 pixels: str = PIL_PIXELS) -> None:
        self.pixels = pixels
        # failed: backends whose embedding raised, with the error, shared by the pass's batchers: a
        # model that fails (out of memory, a broken file) is dropped, and the others go on
        self.embedders, self.batch_size = embedders, batch_size
        self.failed = failed if failed is not None else {}
        self.pending: list[dict[int, Image.Image]] = []  # per item: decode min_side -> image
        self.rows: list[int] = []
        self.vectors: dict[str, list[np.ndarray]] = {name: [] for name in embedders}
        # inference seconds and pictures timed, each backend's first batch apart: its first call (a session's
        # allocations, torch's first run) is no measure of its speed, and counts only where no other batch ran
        self.seconds: dict[str, float] = dict.fromkeys(embedders, 0.0)
        self.timed: dict[str, int] = dict.fromkeys(embedders, 0)
        self.first: dict[str, tuple[float, int]] = {}

    def speed_parts(self, name: str) -> tuple[float, int, float, int]:
        """(seconds, pictures) after the first batch, and (seconds, pictures) of the first batch."""
        first = self.first.get(name, (0.0, 0))
        return self.seconds[name], self.timed[name], first[0], first[1]

    def add(self, row: int, images: dict[int, Image.Image]) -> None:
        self.pending.append(images)
        self.rows.append(row)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pixels: dict[PreprocessConfig, np.ndarray] = {}
        for name, embedder in self.embedders.items():
            if name in self.failed:
                continue
            prep = embedder.preprocess_cfg
            if prep not in pixels:
                pixels[prep] = preprocess_batch([im[prep.decode_min_side] for im in self.pending], prep, self.pixels)
            t = time.perf_counter()
            try:
                self.vectors[name].append(embedder.embed(pixels[prep]))
            except Exception as e:  # noqa: BLE001 - any model's failure is that model's, said in the summary
                log.warning("--evaluate: %s failed (%s: %s); the others go on", name, type(e).__name__, e)
                self.failed[name] = f"{type(e).__name__}: {first_line(e)}"
            took = time.perf_counter() - t
            if name not in self.first:
                self.first[name] = (took, len(self.pending))
            else:
                self.seconds[name] += took
                self.timed[name] += len(self.pending)
        self.pending = []

    def result(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Backend `name`'s (float32 (M, D) embeddings, int64 (M,) source rows)."""
        self.flush()
        parts = self.vectors[name]
        emb = np.concatenate(parts) if parts else np.zeros((0, self.embedders[name].dim), np.float32)
        return emb, np.array(self.rows, dtype=np.int64)


def first_person(data: bytes, segmenter: Segmenter) -> Image.Image | None:
    """The photo's first detected person, cut out: the evaluation's segmented query (none when the
    first detection has nothing to cut, as before the search modes shared query_crops)."""
    arr = np.asarray(decode_image(data).image)
    crop = person_crops(arr, segmenter.segment([arr])[0]).get(0)
    return Image.fromarray(crop) if crop is not None else None


def embed_pass(
    spec: DatasetSpec,
    embedders: dict[str, Embedder],
    batch_size: int,
    summary: RunSummary,
    cloth_column: str | None,
    id_column: str | None,
    segmenter,
    progress: bool = True,
    pixels: str = PIL_PIXELS,
    known_ids: dict[int, object] | None = None,
) -> dict:
    """One streaming pass over the dataset for all backends at once: each row is read, decoded and
    segmented once (not once per backend), and its pixels (resized as `pixels` says,
    preprocess.CPU_PIXELS) go to every backend.

    known_ids: each row's --eval-id-column value where the records do not carry it (an image
    folder's, from its metadata files or subfolders).

    Returns:
        {"ids": {source_row: product}, "photo_sha": {source_row: sha256}, "made_by": {backend: identity},
         backend: {"photos": (emb, rows), "garments": ..., "crops": ...}}
    """
    failed: dict[str, str] = {}
    photos, garments, crops = (EvalBatcher(embedders, batch_size, failed, pixels) for _ in range(3))
    ids: dict[int, str | None] = {}
    garment_sha: dict[int, str] = {}
    photo_sha: dict[int, str] = {}
    min_sides = sorted({e.preprocess_cfg.decode_min_side for e in embedders.values()})

    def decoded(data: bytes) -> dict[int, Image.Image]:
        # one reduced-size decode per distinct min_side (one in practice: the same model)
        return {m: decode_image(data, min_side=m).image for m in min_sides}

    bar = tqdm(
        iter_records(spec), total=count_rows(spec), desc="evaluate", unit="row", leave=False, disable=not progress
    )
    for rec in bar:
        if not rec.data:
            summary.fail(rec.source, rec.error or "no image")
            continue
        try:
            photos.add(rec.source_row, decoded(rec.data))
        except ImageDecodeError as e:
            summary.fail(rec.source, str(e))
            continue
        photo_sha[rec.source_row] = sha256_bytes(rec.data)
        extra = rec.extra or {}
        if id_column:
            value = known_ids.get(rec.source_row) if known_ids is not None else extra.get(id_column)
            ids[rec.source_row] = product_ids([value])[0]
        if cloth_column:
            try:
                if not extra.get(cloth_column):
                    raise ImageDecodeError("no garment image")
                garments.add(rec.source_row, decoded(extra[cloth_column]))
                garment_sha[rec.source_row] = sha256_bytes(extra[cloth_column])
            except ImageDecodeError as e:
                summary.fail(f"{rec.source} ({cloth_column})", str(e))
        if segmenter is not None and (crop := first_person(rec.data, segmenter)) is not None:
            crops.add(rec.source_row, dict.fromkeys(min_sides, crop))
    out: dict = {"ids": ids, "garment_sha": garment_sha, "photo_sha": photo_sha, "speed": {}, "failed": failed,
                 "made_by": {name: e.identity for name, e in embedders.items()},
                 "on_gpu": any(on_cuda(e) for e in embedders.values())}
    for batcher in (photos, garments, crops):
        batcher.flush()  # the last partial batch counts in the timing
    timed_pictures = 0
    for name in embedders:  # in the order given, as the results table
        if name in failed or name not in photos.seconds:
            continue
        parts = [b.speed_parts(name) for b in (photos, garments, crops)]
        after, counted = sum(p[0] for p in parts), sum(p[1] for p in parts)
        first, first_count = sum(p[2] for p in parts), sum(p[3] for p in parts)
        # a stage name's "/" nests it: a model's path is the label alone, its place in the order the key
        summary.timed(f"embed/infer {list(embedders).index(name)}", after + first, f"inference {name}")
        seconds, pictures = (after, counted) if counted else (first, first_count)  # one batch in all: that one
        timed_pictures = max(timed_pictures, pictures)
        out["speed"][name] = pictures / seconds if seconds > 0 else float("nan")  # pictures a second, inference only
    warmed = any(b.timed.get(n) for b in (photos, garments, crops) for n in embedders)  # a batch after the first
    out["speed_how"] = {"batch": batch_size, "pictures_timed": timed_pictures,
                        "first_batch": FIRST_BATCH_SAID[warmed]}
    for name in [n for n in embedders if n not in failed]:
        out[name] = {"photos": photos.result(name)}
        if cloth_column:
            out[name]["garments"] = garments.result(name)
        if segmenter is not None:
            out[name]["crops"] = crops.result(name)
    return out


def _person_to_garment(
    queries: np.ndarray, q_rows: np.ndarray, garments: np.ndarray, g_rows: np.ndarray,
    scope: EvaluationScope | None = None, garment_sha: dict[int, str] | None = None,
) -> dict[str, float | None]:
    """Rank of each photo's own garment among the garments of all evaluated rows (with --group-by,
    of its product among the products)."""
    where = {int(r): k for k, r in enumerate(g_rows)}
    keep = [k for k, r in enumerate(q_rows) if int(r) in where]
    # a garment picture repeated in other rows (the same bytes) is the same right answer
    same: dict[str, list[int]] = {}
    if garment_sha:
        for k, r in enumerate(g_rows):
            same.setdefault(garment_sha[int(r)], []).append(k)
    positives = [np.array(same[garment_sha[int(q_rows[k])]] if garment_sha else [where[int(q_rows[k])]], np.int64)
                 for k in keep]
    groups = scope.groups(g_rows) if scope is not None else None
    return metrics_from_ranks(ranks_of_positives(queries[keep], garments, positives, groups=groups))


def _spec_for(cfg: RunConfig, name: str) -> EmbedderSpec:
    """The embedder an --eval-backends name stands for (backends.EVAL_BACKENDS)."""
    e, wanted = cfg.embedder, EVAL_BACKENDS[name]
    if wanted.onnx_file is None:
        return replace(e, backend=wanted.backend)
    fp32_file = _fp32_file(e.onnx)  # --onnx names the fp32 file itself (whatever the run's own backend)
    if wanted.onnx_file == "int8" and fp32_file:
        raise UsageError(f"--eval-backends {name}: --onnx {e.onnx} is an fp32 file; name the int8 file with --onnx "
                         "(its fp32 file is found beside it)")
    path = e.onnx if wanted.onnx_file == "int8" or fp32_file else str(fp32_path_for(e.onnx))
    if path != e.onnx:  # the fp32 twin of the int8 file named (or not there yet: the export makes both)
        from .embedders import META_PRECISION, exported_from, known_file_metadata

        made_from = exported_from(e.onnx) if Path(e.onnx).is_file() else e.model
        # the int8 file's name, never the fp32 twin's: an export to that name wrote an int8 file under it
        again = f"python main.py --export-onnx{f' --model {made_from}' if made_from else ''} --onnx {e.onnx}"
        if not Path(path).is_file():
            raise UsageError(f"--eval-backends {name}: {path} not found; it is the fp32 file that {again} writes "
                             "beside the int8 file")
        precision = known_file_metadata(path).get(META_PRECISION)
        if precision not in (None, "fp32"):  # a file that records none is taken as named
            raise UsageError(f"--eval-backends {name}: {path} is an {precision} export, not an fp32 one: it would be "
                             f"scored as fp32; export again with {again}")
    return replace(e, onnx=path, backend=wanted.backend, precision="auto")


def run_evaluate(cfg: RunConfig) -> RunSummary:
    """--evaluate: person->garment (a `cloth` column) or same-product retrieval (--eval-id-column),
    for every backend asked for (default: the one in use). One streamed pass (only embeddings are
    kept) with all backends loaded at once: the dataset is read, decoded and segmented once, not
    once per backend."""
    summary = RunSummary(mode="evaluate")
    id_column = cfg.evaluate.id_column
    specs = evaluation_specs(cfg)
    backends = list(specs)
    scope = evaluation_scope(cfg, summary)  # a bad --filter / --group-by fails before anything is embedded
    if not id_column and is_image_folder(cfg.dataset):  # its metadata files hold text, no garment pictures
        raise PipelineError(
            f"--evaluate on the folder of pictures {cfg.dataset.name}: person -> garment needs a "
            f"{cfg.evaluate.cloth_column!r} column of garment pictures beside each photo, which a folder has not (a "
            "parquet dataset has); score same-product retrieval with --eval-id-column COLUMN (a column of its "
            "metadata.csv) or --eval-id-column folder (a subfolder per product)")
    segmenter = segmenter_factory(cfg) if cfg.use_segmentation and not id_column else None
    if cfg.use_segmentation and id_column:
        summary.notes.append("--use-segmentation is not used with --eval-id-column: same-product retrieval compares "
                             "whole photos")
    got = _embed_for_evaluation(cfg, summary, specs, segmenter)
    for name, error in got["failed"].items():  # a failure of the run (exit 3), in evaluation.json too
        summary.fail(f"model {name}", f"failed while embedding and left out of the comparison: {error}")
    backends = [b for b in backends if b not in got["failed"]]
    if not backends:
        raise PipelineError("--evaluate: every model failed while embedding: " + "; ".join(
            f"{name}: {error}" for name, error in got["failed"].items()))
    for name in backends:
        bad = sum(int((~np.isfinite(vectors).all(axis=1)).sum()) for vectors, _ in got[name].values())
        if bad:
            summary.notes.append(f"{name}: {bad} vector(s) not finite (an overflow?): their right answers rank last")
    if scope is not None:
        got = scope.narrowed(got, backends)
    if id_column:
        results = _same_product_metrics(got, backends, summary, scope)
    else:
        results = _person_to_garment_metrics(got, backends, segmenter is not None, summary, scope)
    for per in results.values():
        for name, m in per.items():
            speed = float(got["speed"].get(name, float("nan")))
            m["img_per_s"] = round(speed, 1) if np.isfinite(speed) else None  # JSON has no NaN
    made_by = {name: got["made_by"][name] for name in backends}
    how = {"cpu": cpu_label(), "threads": cfg.embedder.threads or available_cores(), **got.get("speed_how", {})}
    on_gpu = bool(got.get("on_gpu"))
    where = "the GPU for a model that runs there (else " if on_gpu else ""
    summary.notes.append(
        f"img/s: inference alone, batch {how.get('batch')} on {where}{how['threads']} thread(s) of {how['cpu']}"
        + (")" if on_gpu else "") + ", "
        f"{how.get('pictures_timed', 0):,} pictures a model, its first batch "
        + how.get("first_batch", FIRST_BATCH_SAID[False])
        + "; figures of one run compare, and other jobs on the machine slow them")
    summary.model = "; ".join(f"{name}: {identity.label()}" if len(made_by) > 1 else identity.label()
                              for name, identity in made_by.items())
    _write_evaluation(cfg, summary, results, made_by, got["failed"], len(got[backends[0]]["photos"][1]), how)
    return summary


def evaluation_specs(cfg: RunConfig) -> dict[str, EmbedderSpec]:
    """What --evaluate compares, by the name its table shows: --eval-models' models (a short name
    of backends.MODELS, a hub id or folder on torch, an exported .onnx file on onnxruntime, or on
    OpenVINO with --onnx-runtime openvino, named so), or the model in use under each of
    --eval-backends (default: the backend in use)."""
    if cfg.evaluate.models:
        out = {}
        for entry in cfg.evaluate.models:
            if entry.endswith(".onnx"):
                same_name = sum(Path(e).name == Path(entry).name for e in cfg.evaluate.models) > 1
                on = "onnx" if cfg.embedder.runtime == ONNXRUNTIME else cfg.embedder.runtime  # (openvino)
                name = f"{entry if same_name else Path(entry).name} ({on})"  # two files of one name: their paths
                out[name] = replace(cfg.embedder, onnx=entry, backend="onnx", precision="auto")
            else:
                out[entry] = replace(cfg.embedder, model=model_by_name(entry), backend="torch")
        return out
    backends = list(cfg.evaluate.backends) or [_backend_in_use(cfg)]
    specs = {b: _spec_for(cfg, b) for b in backends}
    _check_one_model(cfg, backends, specs)
    if cfg.embedder.runtime == ONNXRUNTIME:
        return specs
    # its ONNX files on OpenVINO: named so in the table and the JSON ("onnx-int8 (openvino)")
    return {f"{b} ({spec.runtime})" if spec.backend == "onnx" else b: spec for b, spec in specs.items()}


def _check_one_model(cfg: RunConfig, backends: list[str], specs: dict[str, EmbedderSpec]) -> None:
    """--eval-backends' ONNX files are of one model, the --model given (UsageError otherwise)."""
    onnx = [b for b in backends if EVAL_BACKENDS[b].backend == "onnx"]
    if len(onnx) > 1:  # an int8 file and its fp32 twin: exported from one model (a later export may replace one)
        from .embedders import exported_from

        made = {b: exported_from(specs[b].onnx) for b in onnx}
        if len({m for m in made.values() if m}) > 1:
            said = ", ".join(f"{specs[b].onnx} from {m}" for b, m in made.items())
            raise UsageError(f"--eval-backends compares one model on several backends, but the files were exported "
                             f"from different models ({said}): export them together again (python main.py "
                             f"--export-onnx --onnx {cfg.embedder.onnx}), or compare models with --eval-models")
    if onnx and (len(onnx) < len(backends) or "model" in cfg.explicit):
        from .config import onnx_of_another_model

        for b in onnx:
            if (made_from := onnx_of_another_model(specs[b])) is not None:
                raise UsageError(
                    f"--eval-backends compares one model on several backends, but {specs[b].onnx} was exported from "
                    f"{made_from}, not from --model {cfg.embedder.model}: pass --onnx FILE exported from it (python "
                    f"main.py --export-onnx --model {cfg.embedder.model} --onnx FILE), or compare models with "
                    "--eval-models"
                )


def _backend_in_use(cfg: RunConfig) -> str:
    """The --eval-backends name of the run's own embedder: torch, or the ONNX file's precision."""
    if cfg.embedder.resolve_backend() != "onnx":
        return "torch"
    return "onnx-fp32" if _fp32_file(cfg.embedder.onnx) else "onnx-int8"


def _fp32_file(path: str) -> bool:
    """The ONNX file at `path` is an fp32 export (its metadata says so)."""
    from .embedders import META_PRECISION, known_file_metadata

    return known_file_metadata(path).get(META_PRECISION) == "fp32"


@dataclass(frozen=True)
class EvaluationScope:
    """--filter and --group-by in --evaluate, from the dataset's metadata columns (keyed by
    source_row): the rows the filter keeps are both the queries and the gallery searched; with
    --group-by the ranks count products, each scored by its best item, and a hit on any item of
    the right product counts."""

    kept: np.ndarray | None  # bool, by source_row (None: every row)
    product: np.ndarray | None  # int64 label, by source_row (None: no --group-by)

    def narrowed(self, got: dict, backends: list[str]) -> dict:
        """The embedded vectors of the rows the filter keeps."""
        if self.kept is None:
            return got
        out: dict = {k: v for k, v in got.items() if k not in backends}  # ids, speed
        for name in backends:
            out[name] = {}
            for part, (vectors, rows) in got[name].items():
                rows = np.asarray(rows, np.int64)
                keep = (rows < len(self.kept)) & self.kept[np.minimum(rows, len(self.kept) - 1)]
                out[name][part] = (vectors[keep], rows[keep])
        return out

    def groups(self, rows: np.ndarray) -> np.ndarray | None:
        return None if self.product is None else self.product[np.asarray(rows, np.int64)]


def evaluation_scope(cfg: RunConfig, summary: RunSummary) -> EvaluationScope | None:
    """The rows and products an evaluation counts (EvaluationScope), read from the dataset's plain
    columns; None without --filter and --group-by. FilterError / UsageError (exit 2) for a column
    the dataset does not have."""
    if not (cfg.filter or cfg.group_by):
        return None
    from .dataset import metadata_none_why, read_metadata
    from .filters import Filter, FilterError
    from .metadata import product_labels

    table = read_metadata(cfg.dataset, cfg.meta_columns)
    if table is None:
        raise FilterError(f"--evaluate with --filter/--group-by: {metadata_none_why(cfg.dataset.name)}: it has no "
                          "metadata columns")
    source = np.asarray(arrow_numpy(table.column("source_row")), np.int64)
    table = table.drop_columns(["source_row"])
    size = int(source.max()) + 1 if len(source) else 0
    kept = product = None
    if cfg.filter:
        kept = np.zeros(size, bool)
        kept[source] = Filter.parse(cfg.filter, table.schema).mask(table)
        if not kept.any():  # refused before anything is embedded
            raise FilterError(f"--filter {cfg.filter!r} keeps none of the {len(source):,} rows: nothing to evaluate "
                              "(values are compared as written: 'Dress' is not 'dress')")
        summary.notes.append(f"--filter {cfg.filter!r}: {int(kept.sum()):,} of {len(source):,} rows kept "
                             "(they are the queries and the gallery searched, those that decode)")
    if cfg.group_by:
        if cfg.group_by not in table.column_names:
            raise UsageError(f"--group-by: unknown column {cfg.group_by!r}; the dataset's columns are: "
                             + ", ".join(table.column_names))
        column = table.column(cfg.group_by)
        labels, missing = product_labels(column)
        product = np.full(size, -1, np.int64)
        product[source] = labels
        if kept is not None:  # of the rows the filter keeps: the others are not evaluated
            import pyarrow as pa

            missing = product_labels(column.filter(pa.array(kept[source])))[1]
        summary.notes.append(f"--group-by {cfg.group_by}: ranks count products (each scored by its best item)"
                             + (f"; {missing:,} row(s) without a value stand alone" if missing else ""))
    return EvaluationScope(kept, product)


def _embed_for_evaluation(
    cfg: RunConfig, summary: RunSummary, specs: dict[str, EmbedderSpec], segmenter: Segmenter | None
) -> dict:
    """Every model and backend loaded, then embed_pass over the dataset with the columns the task
    needs; a missing `cloth` column is explained."""
    id_column, cloth_column = cfg.evaluate.id_column, cfg.evaluate.cloth_column
    known = folder_column(cfg.dataset, id_column) if id_column else None  # an image folder's ids, before the models
    spec = replace(cfg.dataset, extra_columns=(id_column,) if id_column else (cloth_column,))
    try:
        names = None if known is not None else parquet_column_names(spec)
        if names is not None:  # a mistyped column is said before the models load, not after
            check_columns(spec, names, {id_column: "Choose one with --eval-id-column."} if id_column else {})
        with summary.stage("load models"):
            embedders = {name: make_embedder(spec) for name, spec in specs.items()}
        with summary.stage("embed", "embed pass (all backends)"):
            return embed_pass(
                spec,
                embedders,
                cfg.batch_size,
                summary,
                None if id_column else cloth_column,
                id_column,
                segmenter,
                cfg.progress,
                cpu_pixels(cfg.embedder.decode),
                known,
            )
    except PipelineError as e:
        if id_column is None and f"no column {cloth_column!r}" in str(e):
            raise PipelineError(
                f"{e}\n--evaluate needs a {cloth_column!r} column (person -> garment) or --eval-id-column NAME "
                f"(same product)"
            ) from e
        raise


def _same_product_metrics(got: dict, backends: list[str], summary: RunSummary,
                          scope: EvaluationScope | None = None) -> dict[str, dict]:
    """Per backend, the rank of each photo's best-ranked other photo of the same product among all
    photos but itself; photos whose product has no other are skipped (and counted in a note)."""
    q_rows = got[backends[0]]["photos"][1]  # the same rows for every backend
    groups = scope.groups(q_rows) if scope is not None else None
    ids = [got["ids"].get(int(r)) for r in q_rows]
    if ids and all(product is None for product in ids):
        raise PipelineError("--evaluate: no photo has a product id in the --eval-id-column column: nothing to "
                            "score (each product needs two photos with its id)")
    by_product: dict[str, list[int]] = {}
    for i, product in enumerate(ids):
        if product is not None:
            by_product.setdefault(product, []).append(i)
    # a photo's byte-identical copies (one picture under two rows) are that photo: neither its right
    # answer (found at distance 0) nor ranked against it
    shas = [got.get("photo_sha", {}).get(int(r)) for r in q_rows]
    alike: dict[str, list[int]] = {}
    for i, sha in enumerate(shas):
        if sha is not None:
            alike.setdefault(sha, []).append(i)
    positives, keep, excluded = [], [], []
    for i, product in enumerate(ids):
        itself = set(alike[shas[i]]) if shas[i] is not None else {i}
        pos = [j for j in by_product[product] if j not in itself] if product is not None else []
        if pos:
            positives.append(np.array(pos, np.int64))
            keep.append(i)
            excluded.append(np.array(sorted(itself), np.int64))
    keep_arr = np.array(keep, dtype=np.int64)
    no_id = sum(product is None for product in ids)
    copies = sum(len(rows) - 1 for rows in alike.values())
    if copies:
        summary.notes.append(f"{copies} photo(s) byte-identical to another: one picture, so neither is the other's "
                             "right answer")
    if len(ids) - no_id > len(keep):
        summary.notes.append(f"{len(ids) - no_id - len(keep)} queries skipped: their product has no other image "
                             "among the photos evaluated (a byte-identical copy is the same image)")
    if no_id:
        summary.notes.append(f"{no_id} photo(s) without a product id: not queries, and no query's right answer")
    results: dict[str, dict] = {}
    for backend in backends:
        q = got[backend]["photos"][0]
        results.setdefault("same-product", {})[backend] = metrics_from_ranks(
            ranks_of_positives(q[keep_arr], q, positives, exclude=excluded, groups=groups)
        )
    return results


def _person_to_garment_metrics(got: dict, backends: list[str], segmented: bool, summary: RunSummary,
                               scope: EvaluationScope | None = None) -> dict[str, dict]:
    """Per backend, the rank of each photo's own garment (and, segmented, of its first person's)."""
    task = "person->garment"
    q_rows = got[backends[0]]["photos"][1]  # the same rows for every backend
    results: dict[str, dict] = {}
    for backend in backends:
        q = got[backend]["photos"][0]
        g, g_rows = got[backend]["garments"]
        shas = got.get("garment_sha")
        results.setdefault(task, {})[backend] = _person_to_garment(q, q_rows, g, g_rows, scope, shas)
        if segmented:
            c, c_rows = got[backend]["crops"]
            results.setdefault(task + " (segmented person)", {})[backend] = _person_to_garment(
                c, c_rows, g, g_rows, scope, shas)
    if segmented:
        summary.notes.append(f"segmented: {len(got[backends[0]]['crops'][1])} of {len(q_rows)} photos had a person")
    return results


def _write_evaluation(cfg: RunConfig, summary: RunSummary, results: dict[str, dict],
                      made_by: dict[str, VectorIdentity], failed: dict[str, str], photos: int,
                      speed: dict[str, Any] | None = None) -> None:
    """evaluation.json, evaluation.png, the table in the printed summary and the report's section.
    evaluation.json says what was measured: each entry's model and file (its sha256, runtime and
    precision), the photos embedded, the models that failed, and the run's notes."""
    cfg.plots_dir.mkdir(parents=True, exist_ok=True)
    report = {"dataset": cfg.dataset.name, **({"config": cfg.dataset.config} if cfg.dataset.config else {}),
              "split": cfg.dataset.split, "limit": cfg.dataset.limit,
              "filter": cfg.filter, "group_by": cfg.group_by, "id_column": cfg.evaluate.id_column, "photos": photos,
              "speed": speed or {},
              "made_by": {name: {"label": made.label(), **made.compared_json()} for name, made in made_by.items()},
              "failed": failed, "notes": summary.notes, "results": results}
    path = cfg.plots_dir / "evaluation.json"
    atomic_write_text(path, json.dumps(report, indent=2))
    plot = cfg.plots_dir / "evaluation.png"
    plot_evaluation(results, plot)
    summary.tables.append(format_table(results))
    summary.outputs["evaluation"] = str(path)
    summary.outputs["plot"] = str(plot)
    with summary.stage("report"):
        section = Section(
            "evaluation",
            "evaluation",
            f"Evaluation on {cfg.dataset.name}" + (f" ({cfg.dataset.config})" if cfg.dataset.config else ""),
            summary,
            {"results": results, "chart": plot.name},
        )
        summary.outputs["report"] = str(write_section(cfg.plots_dir, section))


METRIC_KEYS = tuple(f"recall@{k}" for k in RECALL_AT)


def format_table(results: dict[str, dict]) -> str:
    lines = ["| task | model / backend | queries | R@1 | R@5 | R@10 | MRR | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for task, per in results.items():
        for backend, m in per.items():
            scores = " | ".join("—" if m[k] is None else f"{m[k]:.3f}" for k in (*METRIC_KEYS, "mrr"))
            lines.append(f"| {task} | {backend} | {m['queries']} | {scores} | {_speed(m.get('img_per_s'))} |")
    return "\n".join(lines)


def _speed(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def plot_evaluation(results: dict[str, dict], path: Path) -> None:
    """One panel per task, a group of bars (recall@k, MRR) per model or backend, its name wrapped
    under it (a path by its name); a model without a query says so where its bars would be."""
    plt = pyplot()
    tasks = list(results)
    widest = max(len(per) for per in results.values())
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.0, 1.9 * widest * len(tasks) + 1.6), 4.2), dpi=110,
                             sharey=True, squeeze=False)
    keys = [*METRIC_KEYS, "mrr"]
    width = 0.8 / len(keys)
    for ax, task in zip(axes[0], tasks):
        per = results[task]
        for j, key in enumerate(keys):
            values = [np.nan if m[key] is None else m[key] for m in per.values()]
            ax.bar(np.arange(len(per)) + j * width, values, width, label=key)
        for i, m in enumerate(per.values()):
            if m["mrr"] is None:  # said where its bars would be
                ax.text(i + 0.4 - width / 2, 0.05, "no query", ha="center", fontsize=8, color="#555555")
        ax.set_xticks(np.arange(len(per)) + 0.4 - width / 2)
        ax.set_xlim(-0.5 + 0.4 - width / 2, len(per) - 0.5 + 0.4 - width / 2)  # a group without bars keeps its place
        ax.set_xticklabels(_chart_labels(list(per)), fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(task, fontsize=10)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars
    fig.suptitle("Retrieval quality against ground truth")
    fig.tight_layout()
    save_figure(fig, path)


def _chart_labels(names: list[str]) -> list[str]:
    """Each bar group's label: a path by its last part, or where two would read alike (…/a/model and
    …/b/model, two snapshots of one hub cache) by as many of its last parts as tell them apart."""
    for parts in range(1, 6):
        labels = [_chart_label(name, parts=parts) for name in names]
        if len(set(labels)) == len(labels):
            return labels
    return [_chart_label(name, parts=99) for name in names]


def _chart_label(name: str, width: int = 22, parts: int = 1) -> str:
    """A model's or backend's name under its bars: a path by its last part, wrapped."""
    import textwrap

    path = name.split(" (")[0]
    if "/" in path and (path.startswith(("/", "./", "../", "~")) or Path(path).exists()):
        p = Path(path)  # a folder or file: its name (the table and the JSON keep the path); hub ids stay whole
        last = "/".join(p.parts[-parts:]) if parts > 1 else p.name
        name = last + (" (" + name.split(" (", 1)[1] if " (" in name else "")
    return "\n".join(textwrap.wrap(name, width, break_long_words=True)) or name
