"""Modes: each is one function from a RunConfig to a RunSummary, and `run` picks one. The gallery modes
(standard and segmentation, built or from cache) share one path: gallery -> neighbours -> pictures
-> matrix -> plots.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import images as images_module
from . import pictures as pictures_module
from . import plots as plots_module
from .config import RunConfig, onnx_fallback, onnx_of_another_model_named
from .dataset import OFFLINE_ADVICE, iter_records
from .duplicates import (
    SIGNATURE_VERSION,
    DuplicateGroup,
    gallery_duplicates,
    unsigned_rows,
    write_duplicates_csv,
    write_groups,
)
from .embedders import EmbedderSpec, model_reference, on_cuda, text_onnx_path_for, tokenizer_path_for
from .errors import CacheMismatchError, PipelineError, UsageError
from .export import INT8_FORMATS, export_onnx, int8_profile, verification_images
from .fileio import (
    OutputLock,
    atomic_write_text,
    check_writable,
    read_json_dict,
    remove_temp_leftovers,
    removed_if_left_empty,
    sha256_bytes,
    sha256_file,
    unlink_quietly,
)
from .galleries import group_by, open_gallery, open_searcher, store_embedder_note, with_metadata, with_store_source
from .gallery import RESUMED_COUNT
from .hub import go_offline_unless_reachable
from .images import ImageDecodeError, decode_image
from .index import INDEX_FILE
from .int8graph import DEPTHWISE_GRAPH
from .items import NO_MASK
from .metadata import load_metadata
from .modes import selected_mode
from .pictures import PictureJob, draw_pictures, picture_name
from .plots import neighbour_labels, pyplot, save_heatmap, save_histogram
from .remedy import to_cache
from .remote import mirrored
from .report import RunSummary
from .retrieval import Neighbours, carried_matrix, iter_neighbour_rows, write_neighbours_csv
from .searcher import Searcher
from .store import (
    PARTIAL_DIR,
    SIDECAR_FILE,
    ManifestRow,
    Sidecar,
    ThumbnailReader,
    embedded_rows,
    manifest_sha256,
    shown_name,
    store_sha256,
)
from .webreport import (
    REPORT_DIR,
    Section,
    build_summary,
    count_of,
    drop_section,
    read_section,
    rewrite_summary,
    write_gallery_pages,
    write_section,
)

log = logging.getLogger(__name__)


def run(cfg: RunConfig) -> RunSummary:
    """Run the mode the configuration asks for (modes.MODES); with a URL --output-dir, in its local
    working copy, fetched first and sent back after (remote.py)."""
    mode = selected_mode(cfg)
    run_mode = mode.load()
    resend = "run the same command again to send them"
    if mode.name in ("gallery", "video") and not cfg.from_cache and not cfg.update:  # again: every photo embedded again
        resend = f"{to_cache(cfg.segmented)} to send them without embedding again"
    remote = (mirrored(cfg.output_url, cfg.output_dir, resend, sends=mode.sends_output)
              if cfg.output_url and mode.mirrors_output else nullcontext())
    with output_session(cfg) if mode.holds_output else nullcontext(), remote as copy:
        # what the store says is read here, once a URL's store is in its working copy
        cfg, kept = with_store_source(cfg)  # --update: the store's dataset settings where no flag gives them
        if kept:
            log.info("--update: the store's own %s", kept)
        fallback = store_embedder_note(cfg, onnx_fallback(cfg))
        if fallback and mode.name != "serve":  # serve says it once its port is bound
            log.info(fallback)  # and in the summary's notes
        unused = onnx_of_another_model_named(cfg)
        if unused:
            log.warning(unused)  # and in the summary's notes
        offline = go_offline_unless_reachable(cfg)  # before anything asks the hub
        summary = run_mode(cfg)
        if kept:
            summary.notes.append(f"updated with the store's own {kept} (not given)")
        summary.notes.extend(note for note in (fallback, unused) if note)
        if offline:
            summary.notes.append("worked offline: the Hugging Face hub could not be reached (see the warning above)")
        summary.outputs = at_url(summary.outputs, cfg.output_dir, cfg.output_url)
        rewrite_summary(cfg.plots_dir, summary)  # the report says what the printed summary says (sent with it)
    if copy is not None and not mode.sends_output:
        summary.notes.append(f"read from {cfg.output_url}, nothing sent there (working copy {cfg.output_dir})")
    elif copy is not None:
        removed = f", {copy.removed} removed there" if copy.removed else ""
        summary.notes.append(f"outputs sent to {cfg.output_url} ({copy.sent} file(s){removed}; working copy "
                             f"{cfg.output_dir})")
    return summary


def at_url(outputs: dict[str, str], work_dir: Path, url: str | None) -> dict[str, str]:
    """A run's outputs as the URL holds them, where they were written in its working copy (which
    the summary named, a folder the Ray engine's images never were in)."""
    if not url:
        return outputs
    root = Path(os.path.abspath(work_dir))

    def there(value: str) -> str:
        path, sep, rest = value.partition(" (")  # "path (what it holds)"
        try:
            rel = Path(os.path.abspath(path)).relative_to(root)
        except ValueError:
            return value  # not in the working copy
        return url.rstrip("/") + ("/" + rel.as_posix() if rel.parts else "") + sep + rest

    return {k: there(v) for k, v in outputs.items()}


@contextmanager
def output_session(cfg: RunConfig) -> Iterator[None]:
    """Hold --output-dir's lock for a run, and first clear the temp files a killed run left in the
    folders of the output layout."""
    layout = [cfg.output_dir, cfg.images_dir, cfg.store_dir, cfg.store_dir / PARTIAL_DIR, cfg.results_dir,
              cfg.plots_dir, cfg.queries_dir]
    if cfg.video.clip:  # a clip refused (empty, no frames) left video_results/<clip>/ behind
        layout += [cfg.video_results_dir, cfg.video_results_dir.parent]
    if cfg.searches_only and (cfg.store_dir / SIDECAR_FILE).is_file():  # another --output-dir holds no gallery
        check_writable(cfg.output_dir, remedy=(
            "A search writes its results there (retrieval_results/queries/ and the report): copy the folder where "
            f"you can write, or search it where it is with --serve or Catalog.open('{cfg.output_dir}'), which write "
            "nothing"))
    # with a URL output, the working copy is the folder written: --work-dir's (or its default's)
    flag = "--work-dir" if cfg.output_url else "--output-dir"
    with removed_if_left_empty(layout), OutputLock(cfg.output_dir, flag):
        removed = sum(remove_temp_leftovers(p) for p in cfg.owned_folders())
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run in %s", removed, cfg.output_dir)
        yield


def run_gallery(cfg: RunConfig) -> RunSummary:
    """Standard or segmentation run: build or load the gallery, then neighbours, pictures, plots."""
    mode = ("segmentation" if cfg.segmented else "standard") + (" (from cache)" if cfg.from_cache else "")
    summary = RunSummary(mode=mode)
    gallery = open_gallery(cfg, summary)
    rows = gallery.rows
    summary.count("rows", len({r.source_row for r in rows}))
    if cfg.segmented:
        summary.count("crops", sum(1 for r in rows if r.person >= 0 and r.status == "ok"))
        whole = sum(1 for r in rows if r.person < 0 and r.status == "ok")  # --keep-unsegmented: embedded whole
        summary.count("rows without person", sum(1 for r in rows if r.status == "no_person") + whole)
        maskless = sum(1 for r in rows if r.status == "no_person" and r.error.startswith(NO_MASK))
        if maskless:  # beside "photo(s) had more than N persons", a count that looked contradictory
            summary.notes.append(f"rows without person: {maskless} had persons, but none with a mask among the "
                                 f"{cfg.segment.max_persons} most confident (manifest.csv's error column says which; "
                                 "a larger --max-persons looks further)")
        if whole:
            summary.count("kept whole", whole)
    # an update embeds only its added and changed photos (counted by it), a cache run none
    if cfg.from_cache or cfg.update:
        summary.count("items", len(gallery.embeddings))
    else:  # a resumed build's own work: the shards of the run it finished are counted apart (RESUMED_COUNT)
        summary.count("embedded", len(gallery.embeddings) - summary.counts.get(RESUMED_COUNT, 0))
    summary.count("failed", len(summary.failures))
    summary.outputs["images"] = str(cfg.images_dir)
    summary.outputs["embeddings"] = str(cfg.store_dir)
    if not cfg.from_cache:
        retire_earlier_outputs(cfg)
    else:  # a metadata table of another version of the store is refused now, not after every output was rewritten
        load_metadata(cfg.store_dir, gallery.embedded)
    on_gpu = cfg.embedder.device == "cuda" or on_cuda(gallery.embedder)
    with summary.stage("index"):
        searcher = open_searcher(cfg, gallery.embeddings, gallery.embedded, gpu=on_gpu, build_auto=True)
    if searcher.index is not None:
        summary.outputs["index"] = f"{cfg.store_dir / INDEX_FILE} ({searcher.describe()})"
    nb, groups = write_retrieval_outputs(cfg, searcher, summary, gallery.carried)
    with summary.stage("report"):
        write_gallery_report(cfg, summary, rows, nb, groups)
    return summary


def retire_earlier_outputs(cfg: RunConfig) -> None:
    """A gallery run that changed its store: the neighbour table, the duplicates table and the report
    section of the store before go now, and its distance matrix moves aside (the neighbours carry
    from it there, _earlier_matrix), so that a run stopped before it writes its own leaves none
    that describes another store (rows of photos that went, a matrix of another size). A store
    left as it was (an update with nothing to do) keeps them."""
    section_id = "gallery" + cfg.suffix
    section = read_section(cfg.plots_dir, section_id)
    try:
        store = store_sha256(cfg.store_dir)
    except PipelineError:
        return
    if section is None or (section.get("data") or {}).get("store") == store:
        return
    drop_section(cfg.plots_dir, section_id)
    unlink_quietly(cfg.results_dir / "neighbours.csv")
    unlink_quietly(cfg.plots_dir / f"duplicates{cfg.suffix}.csv")
    matrix = cfg.plots_dir / f"distance_matrix{cfg.suffix}.npy"
    if matrix.is_file():
        os.replace(matrix, _earlier_matrix(matrix))  # a rename keeps the stamp the saved lists know it by


def _earlier_matrix(matrix: Path) -> Path:
    return matrix.with_name(f".{matrix.stem}.earlier.npy")


REPORT_GROUPS = 60  # duplicate groups shown side by side in the report (duplicates.csv lists all)
REPORT_MEMBERS = 12  # photos shown of each (a placeholder picture's group may hold thousands)


def write_gallery_report(cfg: RunConfig, summary: RunSummary, rows: list[ManifestRow], nb: Neighbours | None,
                         groups: list[DuplicateGroup]) -> None:
    """The gallery's section of outputs/report.html: every item with its neighbours, the duplicate
    groups, and the plots. A run that reuses the store keeps the summary of the run that built it
    (counts, stage times)."""
    embedded = embedded_rows(rows)
    section_id = "gallery" + cfg.suffix
    try:
        store = store_sha256(cfg.store_dir)
    except PipelineError:
        store = ""
    data: dict = {"plots": [], "store": store, "built": not cfg.from_cache}
    if cfg.from_cache and (build := build_summary(cfg.plots_dir, section_id, store)) is not None:
        data["build"] = build
    if nb is None and len(embedded) == 1:  # one item: shown, with no neighbours to show
        nb = Neighbours(np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32))
    if nb is not None:
        reader = ThumbnailReader.of(cfg.store_dir)
        meta = load_metadata(cfg.store_dir, embedded)
        try:
            data["gallery"] = write_gallery_pages(
                cfg.plots_dir / REPORT_DIR,
                section_id,
                [r.file for r in embedded],
                [r.index for r in embedded],
                nb,
                lambda i: reader[i],
                None if meta is None else meta.json_values,
                tile_keys=_tile_keys(cfg.store_dir, embedded),
                sources=[r.source for r in embedded],
                names=[r.shown_name for r in embedded],
            )
        finally:
            reader.close()
        if len(embedded) > 1:
            data["plots"] = [f"distance_heatmap{cfg.suffix}.png", f"nearest_neighbour_hist{cfg.suffix}.png"]
    data["duplicates"] = {
        "groups": len(groups),
        "photos": sum(len(g.members) for g in groups),
        "csv": f"duplicates{cfg.suffix}.csv",
        # each photo with its size, to choose the one to keep by (the first is the dataset's first, not the original)
        "shown": [[[m, k, d, embedded[m].width, embedded[m].height]
                   for m, k, d in list(zip(g.members, g.kinds, g.distances))[:REPORT_MEMBERS]]
                  for g in groups[:REPORT_GROUPS]],
        "sizes": [len(g.members) for g in groups[:REPORT_GROUPS]],
        "unsigned": (unsigned := unsigned_rows(embedded)),  # left out: no signals of this version (--update signs)
        "checked": len(embedded) - unsigned,
        "version": SIGNATURE_VERSION,
    }
    title = ("Segmented gallery" if cfg.segmented else "Gallery") + f" ({count_of(len(embedded), 'item')})"
    summary.outputs["report"] = str(write_section(cfg.plots_dir, Section(section_id, "gallery", title, summary, data)))


def code_signature(*modules: ModuleType) -> str:
    """The source files of the modules that draw an output, hashed: a kept output whose drawing
    code changed is drawn again."""
    return "".join(sha256_file(Path(str(m.__file__))) for m in modules)


def _tile_keys(store_dir: Path, embedded: list[ManifestRow]) -> list[str] | None:
    """Per item, what its stored thumbnail is a function of: its file's bytes, the store's
    preprocessing and thumbnail size, and the code that decodes and shrinks (so report sprites of
    unchanged pages are kept, webreport.write_gallery_pages); None when the sidecar is unreadable."""
    from . import items as items_module

    try:
        sidecar = Sidecar.read(store_dir / SIDECAR_FILE)
    except CacheMismatchError:
        return None
    made = json.dumps([sidecar.identity.to_json().get("preprocess"), sidecar.thumbnail_size], sort_keys=True)
    prefix = sha256_bytes((made + code_signature(plots_module, images_module, items_module)).encode())[:16]
    return [f"{prefix} {r.file} {r.sha256}" for r in embedded]


def write_retrieval_outputs(
    cfg: RunConfig, searcher: Searcher, summary: RunSummary, carried: tuple[np.ndarray, str] | None = None
) -> tuple[Neighbours | None, list[DuplicateGroup]]:
    """Neighbour table, duplicates, one composite picture per item, the distance matrix, heatmap,
    histogram.

    The searcher answers every item's neighbours: exactly (and then the distance matrix comes from
    the same distance blocks), or through an approximate index (no matrix then); the summary says
    which it was, with the index's measured recall. The neighbours also propose duplicate pairs;
    with --dedup they are asked again, one photo per duplicate group.
    """
    embedded = searcher.rows
    n = len(embedded)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    cfg.plots_dir.mkdir(parents=True, exist_ok=True)
    if n < 2:
        write_duplicates(cfg, searcher, summary)
        what = "one embedded item" if n == 1 else "no embedded items"
        summary.notes.append(f"{what}: no neighbours, distance matrix or plots (they need two items)")
        return None, []
    heat = cfg.plots_dir / f"distance_heatmap{cfg.suffix}.png"
    # The heatmap needs the vectors alone: drawn in a thread while the neighbours are found (numpy and
    # file writes, mostly without the GIL), and done before the pictures (whose captions use matplotlib's
    # fonts too). Leaving the block waits for it, whatever happened (a Ctrl-C too); a heatmap that
    # fails stops the run there, before the pictures.
    # matplotlib imported here, not first in the thread: a Ctrl-C that lands in the main thread during an
    # import can leave that module's import lock held, and the thread, importing it, never ends (seen once)
    pyplot()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="heatmap") as beside:
        heatmap = beside.submit(_timed, plot_once, heat, ["save_heatmap, default cells", searcher.embeddings],
                                lambda: save_heatmap(searcher.embeddings, heat))
        nb = gallery_neighbours(cfg, searcher, summary, carried)
        groups = write_duplicates(cfg, searcher, summary)
        nb = regrouped_neighbours(cfg, searcher, groups, nb, summary) or nb
        ids = [r.index for r in embedded]
        files = [r.file for r in embedded]
        sources = [r.source for r in embedded]
        table = cfg.results_dir / "neighbours.csv"
        write_neighbours_csv(table, iter_neighbour_rows(nb, ids, files, ids, files, sources, sources))
        summary.outputs["neighbour table"] = str(table)
        with summary.stage("wait for the heatmap"):
            seconds, heat_drawn = heatmap.result()
        summary.timed("heatmap", seconds, "heatmap (beside the neighbours, overlapped)")
    with summary.stage("result pictures"):
        written, drawn = write_result_pictures(cfg, nb, files, [r.sha256 for r in embedded],
                                               [shown_name(r.source, r.file, lasting=True, person=r.person)
                                                for r in embedded])
    summary.count("result pictures", written)
    if drawn < written:
        summary.notes.append(f"result pictures: {drawn:,} drawn, {written - drawn:,} unchanged since the last run kept")
    shown = n if cfg.max_result_images is None else min(cfg.max_result_images, n)
    if written < shown:
        summary.notes.append(f"{written:,} result pictures for {shown:,} items: items with equal bytes share one "
                             "file, and so one picture")
    if shown < n:
        summary.notes.append(
            f"result pictures for {shown:,} of {n:,} items (--max-result-images); neighbours.csv lists everyone"
        )
    if written:  # --max-result-images 0 writes none (and removes the last run's)
        summary.outputs["result pictures"] = f"{cfg.results_dir}/*_matches.jpg"
    with summary.stage("plots"):
        hist = cfg.plots_dir / f"nearest_neighbour_hist{cfg.suffix}.png"
        title = f"Distance to the nearest other item ({n} items)"
        hist_drawn = plot_once(hist, ["save_histogram", title, nb.distances[:, 0]],
                               lambda: save_histogram(nb.distances[:, 0], hist, title=title))
    if not (hist_drawn or heat_drawn):
        summary.notes.append("plots: kept, drawn from the same vectors and neighbours by the last run")
    summary.outputs["heatmap"] = str(heat)
    summary.outputs["histogram"] = str(hist)
    return nb, groups


def _timed(call: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """call(*args): the seconds it took, and what it returned."""
    t = time.perf_counter()
    got = call(*args)
    return time.perf_counter() - t, got


PLOTS_FILE = ".plots.json"  # in the plots folder: what each plot there was drawn from
_plots_lock = threading.Lock()


def plot_once(path: Path, inputs: Sequence[str | np.ndarray], draw: Callable[[], None]) -> bool:
    """Draw a plot with draw() unless the file there was drawn from the same inputs (texts saying
    what is drawn and how, arrays: their shape, type and values, hashed where they lie) by the same
    code (plots.py; matplotlib's, scipy's and numpy's versions), as recorded beside it in
    PLOTS_FILE: after an update that changed nothing, the heatmap (O(N) to order) is kept. Returns
    whether it drew."""
    import hashlib

    import matplotlib
    import scipy

    h = hashlib.sha256(json.dumps([code_signature(plots_module), matplotlib.__version__, scipy.__version__,
                                   np.__version__]).encode())
    for part in inputs:
        if isinstance(part, str):
            h.update(json.dumps(part).encode())
        else:
            a = np.ascontiguousarray(part)
            h.update(json.dumps([a.shape, str(a.dtype)]).encode())
            h.update(a.data if a.size else b"")
    key = h.hexdigest()
    record = path.parent / PLOTS_FILE
    with _plots_lock:
        known = read_json_dict(record)
        if path.is_file() and known.get(path.name) == key:
            return False
        if known.pop(path.name, None) is not None:  # forgotten first: a killed run draws it again
            atomic_write_text(record, json.dumps(known, sort_keys=True))
    draw()
    with _plots_lock:
        atomic_write_text(record, json.dumps({**read_json_dict(record), path.name: key}, sort_keys=True))
    return True


def regrouped_neighbours(cfg: RunConfig, searcher: Searcher, groups: list[DuplicateGroup], first: Neighbours,
                         summary: RunSummary) -> Neighbours | None:
    """With --dedup or --group-by, every item's neighbours one per duplicate group or product: the
    plain first pass, with only the rows it leaves short asked again; None when neither applies."""
    if not ((cfg.dedup and groups) or cfg.group_by):
        return None
    how = " ".join(flag for flag, on in (("--dedup", cfg.dedup), ("--group-by", cfg.group_by)) if on)
    with summary.stage(f"neighbours ({how})"):
        searcher.dedup(groups if cfg.dedup else None)
        if cfg.group_by:
            with_metadata(cfg, searcher)
            group_by(cfg, searcher, summary)
        # the first pass was already among the filter's rows: only the rows it leaves short are asked again
        nb = searcher.all_neighbours(cfg.top_k, first=first, allowed=searcher.allowed(cfg.filter))
    if cfg.dedup and groups:
        summary.notes.append("--dedup: each duplicate group stands once in every neighbour list")
    return nb


def gallery_neighbours(cfg: RunConfig, searcher: Searcher, summary: RunSummary,
                       carried: tuple[np.ndarray, str] | None = None) -> Neighbours:
    """Every item's top-k (and the distance matrix when exact and small enough), with notes. With
    --filter, every item's neighbours among the items the filter keeps (no matrix then). The lists
    of the last run (and its matrix, when it wrote one and it is there as it wrote it) are carried
    over where that costs less (see carried_neighbours): through an update (`carried`: the old rows
    kept and the old store), or as they are over the same store."""
    n = len(searcher.rows)
    allowed = filtered_rows(cfg, searcher, summary)
    with_matrix = n <= cfg.max_matrix and not searcher.approximate and allowed is None
    matrix = cfg.plots_dir / f"distance_matrix{cfg.suffix}.npy" if with_matrix else None
    with summary.stage("neighbours" + (" + distance matrix" if matrix else "")):
        nb = None
        if allowed is None:
            nb = carried_neighbours(cfg, searcher, carried, summary, matrix)
        if nb is None:
            nb = searcher.all_neighbours(cfg.top_k, matrix_path=matrix, allowed=allowed)
        if allowed is None:
            save_neighbours(cfg, searcher, nb, matrix)
    unlink_quietly(_earlier_matrix(cfg.plots_dir / f"distance_matrix{cfg.suffix}.npy"))  # carried from, or not
    summary.notes.append("neighbours: " + (searcher.describe() if searcher.approximate else "exact"))
    earlier = cfg.plots_dir / f"distance_matrix{cfg.suffix}.npy"
    if matrix is None and earlier.is_file():  # an earlier run's, of another store or other neighbours: not left
        unlink_quietly(earlier)                # beside these, and said
        summary.notes.append(f"{earlier} of an earlier run removed: it was not of this run's neighbours")
    if allowed is not None:
        summary.notes.append("distance matrix not saved: --filter asks for neighbours among some items only")
    elif matrix:
        summary.outputs["distance matrix"] = f"{matrix} (rows = manifest embedding_row)"
    elif searcher.approximate:
        summary.notes.append(
            "distance matrix not saved: the neighbours came from the approximate index, which computes no "
            "all-pairs distances (--index none or flat computes them)"
        )
    else:
        summary.notes.append(
            f"{n} items > --max-matrix {cfg.max_matrix}: distance matrix not saved (neighbours were computed blockwise)"
        )
    return nb


NEIGHBOURS_FILE = ".neighbours.npz"  # in the results folder: the last run's plain lists, and of what


def _neighbours_path(cfg: RunConfig) -> Path:
    return cfg.results_dir / f"{NEIGHBOURS_FILE.removesuffix('.npz')}{cfg.suffix}.npz"


def _neighbours_key(cfg: RunConfig, searcher: Searcher, store: str) -> str:
    """What saved lists are of: the store, k, and the search (exact, or the index's kind and parameters:
    lists of another index, or of another nprobe, are not carried over)."""
    index = searcher.index
    search: Any = "exact" if index is None or not searcher.approximate else {"kind": index.info.kind,
                                                                             "params": index.info.params}
    return json.dumps({"store": store, "k": cfg.top_k, "search": search}, sort_keys=True, default=str)


def save_neighbours(cfg: RunConfig, searcher: Searcher, nb: Neighbours, matrix: Path | None = None) -> None:
    """The plain lists of this run, for the next one to carry over, with the stamp of the distance
    matrix the run wrote (a cache: losing it costs a pass)."""
    path = _neighbours_path(cfg)
    tmp = path.with_name(path.name + ".tmp")
    try:
        key = _neighbours_key(cfg, searcher, store_sha256(cfg.store_dir))
        stamp = _matrix_stamp(matrix) if matrix is not None and matrix.is_file() else ""
        with open(tmp, "wb") as f:  # straight to the file (120 MB at a million items), moved into place whole
            np.savez(f, indices=nb.indices, distances=nb.distances, key=np.array(key), matrix=np.array(stamp))
        os.replace(tmp, path)
    except (PipelineError, OSError):
        unlink_quietly(tmp)
        unlink_quietly(path)


def carried_neighbours(cfg: RunConfig, searcher: Searcher, carried: tuple[np.ndarray, str] | None,
                       summary: RunSummary, matrix: Path | None = None) -> Neighbours | None:
    """The last run's lists carried over to this store, or None (no lists of the store before, or of
    another k or kind of search, or no saving in it). With `matrix` (the N x N distance matrix this
    run writes) only when the last run wrote one there and it is as that run left it (its stamp):
    the kept pairs' distances are copied from it, the new items' computed (retrieval.carried_matrix);
    over the same store it is kept as it is."""
    path = _neighbours_path(cfg)
    if not path.is_file():
        return None
    n = len(searcher.rows)
    try:
        take, before = carried if carried is not None else (np.arange(n), store_sha256(cfg.store_dir))
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != _neighbours_key(cfg, searcher, before):
                return None
            old = Neighbours(saved["indices"], saved["distances"])
            old_matrix = str(saved["matrix"]) if "matrix" in saved.files else ""
        # the last run's matrix: moved aside when this run changed the store (retire_earlier_outputs)
        source = _earlier_matrix(matrix) if matrix is not None and _earlier_matrix(matrix).is_file() else matrix
        if source is not None and (not old_matrix or not source.is_file() or _matrix_stamp(source) != old_matrix):
            return None
    except Exception:  # a cache: damaged or unreadable (a bad zip, another format) costs a full pass, nothing else
        return None
    found = searcher.carried_neighbours(old, take, cfg.top_k)
    if found is None:
        return None
    nb, asked = found
    if matrix is not None and carried is None and source != matrix and source is not None:
        # moved aside by retire_earlier_outputs (the report was of another store: an update stopped after its
        # switch), yet of this very store, as its stamp says: back in its place, or it was deleted below
        os.replace(source, matrix)
    if matrix is not None and carried is not None:
        try:
            carried_matrix(np.load(source or matrix, mmap_mode="r"), take, searcher.embeddings, matrix)
        except (OSError, ValueError):  # not the matrix it was (another shape, damaged): a full pass writes it
            return None
    summary.notes.append(f"neighbours: {n - asked:,} of {n:,} items' lists carried over from the last run, "
                         f"{asked:,} asked again" + ("" if matrix is None else "; the distance matrix carried over"
                                                     if carried is not None else "; the distance matrix kept as it is"))
    return nb


def _matrix_stamp(path: Path) -> str:
    st = path.stat()
    return json.dumps([st.st_size, st.st_mtime_ns, st.st_ino])


def filtered_rows(cfg: RunConfig, searcher: Searcher, summary: RunSummary) -> np.ndarray | None:
    """--filter on a gallery run: the rows it keeps (the store's metadata loaded for it), counted
    in the summary; None without a filter."""
    if not cfg.filter:
        return None
    allowed = with_metadata(cfg, searcher).allowed(cfg.filter)
    assert allowed is not None
    matching = int(allowed.sum())
    summary.count("items matching the filter", matching)
    empty = "" if matching else " (none: the neighbour lists are empty)"
    summary.notes.append(f"--filter {cfg.filter!r}: every item's neighbours among the {matching:,} of "
                         f"{len(allowed):,} items it keeps{empty}")
    return allowed


def write_duplicates(cfg: RunConfig, searcher: Searcher, summary: RunSummary) -> list[DuplicateGroup]:
    """Duplicate groups among the embedded items (duplicates.py): outputs/duplicates.csv, and the
    groups beside the store for --dedup. Every gallery run writes them, so they follow the store."""
    rows = searcher.rows
    path = cfg.plots_dir / f"duplicates{cfg.suffix}.csv"
    with summary.stage("duplicates"):
        # From the photos' signals alone, not the embedding's neighbours: then the groups depend on
        # the photos only (not on --top-k or the index), and an update's are a fresh build's.
        groups, unsigned = gallery_duplicates(rows)

        def sizes(m: int) -> tuple[object, object, object]:  # to choose the photo to keep by
            try:
                size: object = (cfg.images_dir / rows[m].file).stat().st_size
            except OSError:
                size = ""  # the images at a URL: their sizes not looked up one by one
            return rows[m].width, rows[m].height, size

        write_duplicates_csv(path, groups, [r.source_row for r in rows], [r.file for r in rows],
                             [r.source for r in rows], sizes)
        try:
            write_groups(cfg.store_dir, manifest_sha256(cfg.store_dir), groups)
        except PipelineError:
            pass  # no complete store (nothing embedded): nothing for --dedup to read
    photos = sum(len(g.members) for g in groups)
    exact = sum(1 for g in groups for k in g.kinds[1:] if k == "exact")
    summary.count("duplicate groups", len(groups))
    summary.outputs["duplicates"] = f"{path} ({count_of(photos, 'photo')} in {count_of(len(groups), 'group')})"
    if groups:
        hint = "" if cfg.dedup else "; --dedup shows one photo per group"
        summary.notes.append(
            f"duplicates: {count_of(photos, 'photo')} in {count_of(len(groups), 'group')} ({exact:,} exact "
            f"cop{'y' if exact == 1 else 'ies'}, {photos - len(groups) - exact:,} near){hint}"
        )
    if unsigned:
        summary.notes.append(
            f"duplicates: {count_of(unsigned, 'item')} {'has' if unsigned == 1 else 'have'} no duplicate signals of "
            f"this version ({SIGNATURE_VERSION}) and {'was' if unsigned == 1 else 'were'} left out: --update signs "
            "again, from their files and with no inference, those of a store made before duplicates were found or by "
            "an earlier signature (where the store records its preprocessing); a photo that cannot be decoded stays "
            "out"
        )
    return groups


PICTURES_FILE = ".result_pictures.json"  # in the results folder: each picture's signature


def picture_signatures(nb: Neighbours, files: list[str], shas: list[str], limit: int,
                       names: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """Picture name -> (the item it shows, what it shows): the query's and each neighbour's file,
    bytes and caption name, the distances as drawn, and the drawing code itself (plots.py), so a
    picture is redrawn only when one of them changed (after an update, most pictures are the same).
    Items with equal bytes share a file and so a picture name: the first of them is the one drawn."""
    import matplotlib

    # The drawing code and what it draws with: the composites, the JPEG encoder, the font's package.
    code = code_signature(plots_module, images_module, pictures_module) + matplotlib.__version__
    captions = names or files
    out: dict[str, tuple[int, str]] = {}
    for i in range(limit):
        name = picture_name(files[i])
        if name in out:
            continue
        shown = [(files[j], shas[j], captions[j], f"{d:.3f}") for j, d in zip(nb.indices[i], nb.distances[i]) if j >= 0]
        key = json.dumps([code, files[i], shas[i], captions[i], shown])
        out[name] = (i, sha256_bytes(key.encode()))
    return out


def write_result_pictures(cfg: RunConfig, nb: Neighbours, files: list[str], shas: list[str],
                          names: list[str] | None = None) -> tuple[int, int]:
    """One composite per query (query + top-k with distances) from the stored thumbnails, one per
    distinct file (items with equal bytes share it), each captioned by `names` (what the user knows
    the photos by; the files without them); a picture whose signature (picture_signatures) is the
    one recorded beside it is kept as it is.

    Returns:
        (pictures there now, pictures drawn by this run)
    """
    limit = len(files) if cfg.max_result_images is None else min(cfg.max_result_images, len(files))
    wanted = picture_signatures(nb, files, shas, limit, names)
    record = cfg.results_dir / PICTURES_FILE
    before = read_json_dict(record)
    for old in cfg.results_dir.glob("*_matches.jpg"):
        if old.name not in wanted or wanted[old.name][1] != before.get(old.name):
            old.unlink()
    todo = sorted(i for name, (i, _) in wanted.items() if not (cfg.results_dir / name).is_file())
    unlink_quietly(record)  # rewritten once the pictures are: a killed run redraws rather than trusts
    _draw_pictures(cfg, nb, files, todo, names or files)
    atomic_write_text(record, json.dumps({name: sig for name, (_, sig) in wanted.items()}, sort_keys=True))
    return len(wanted), len(todo)


def _draw_pictures(cfg: RunConfig, nb: Neighbours, files: list[str], todo: list[int], names: list[str]) -> None:
    if not todo:
        return
    reader = ThumbnailReader.of(cfg.store_dir)
    reader.close()  # its files, for whichever process draws
    jobs = []
    for i in todo:
        rows, labels = neighbour_labels(nb.indices[i], nb.distances[i], names)
        jobs.append(PictureJob(str(cfg.results_dir / picture_name(files[i])), i, f"query\n{names[i]}", tuple(rows),
                               tuple(labels)))
    lock = threading.Lock()
    with tqdm(total=len(jobs), desc="result pictures", unit="pic", disable=not cfg.progress) as bar:

        def done(n: int) -> None:
            with lock:  # both sides report
                bar.update(n)

        draw_pictures([str(p) for p in reader.paths], jobs, done)


def run_export(cfg: RunConfig, sample_rows: int = 96) -> RunSummary:
    """--export-onnx: fp32 + int8 ONNX image encoders from --model, verified before they land.

    The first `sample_rows` readable rows of --dataset (the default dataset unless another is
    given) are split: two thirds calibrate the int8 ranges, one third checks the result (dynamic
    int8, which is not calibrated, is checked on them all). Only when the dataset cannot be read
    (offline, say) do generated pictures serve both (two different sets), with a warning: static
    int8 ranges fitted to synthetic pictures are worse than ranges fitted to the catalogue.
    """
    target = Path(cfg.embedder.onnx)
    if target.is_dir():
        raise PipelineError(f"--onnx names the int8 file the export writes; {target} is a folder: pass a file in it, "
                            f"e.g. --onnx {target / 'model_image_int8.onnx'}")
    _check_twins_are_its_own(cfg)
    folder = target.parent
    with removed_if_left_empty([folder]):  # a failed export leaves no folder it made
        check_writable(folder, "--onnx")  # before the model (gigabytes, maybe) is loaded
        return _run_export(cfg, sample_rows)


def _check_twins_are_its_own(cfg: RunConfig) -> None:
    """An export writes its fp32 and text files under names derived from --onnx, which several int8
    names share (m_image.onnx, m_image_int8.onnx): a new file whose fp32 or text file is already
    there, exported from another model, would replace another int8 file's twins (its text queries
    then refused, its fp32 row gone). Refused before the model loads. Replacing the int8 file itself
    keeps the replaced files (export.keep_replaced)."""
    from .embedders import exported_from
    from .export import fp32_path_for

    target = Path(cfg.embedder.onnx)
    fp32 = fp32_path_for(target)
    # the other int8 files whose fp32 and text files these are (m.onnx's, for m_int8.onnx)
    sharing = sorted(p for p in target.parent.glob("*.onnx") if p.is_file() and p not in (target, fp32)
                     and fp32_path_for(p) == fp32) if target.parent.is_dir() else []
    if target.is_file() and not sharing:  # its own twins: replaced with it, the old ones kept (keep_replaced)
        return
    wanted = model_reference(cfg.embedder.model)
    for twin in (fp32, text_onnx_path_for(target)):
        made_from = exported_from(twin)
        if made_from and made_from != wanted:
            of = f"of {', '.join(map(str, sharing))}" if sharing else f"of another int8 file of {target.parent}"
            raise UsageError(
                f"--onnx {target} would write {twin}, which is there, exported from {made_from}: the fp32 and text "
                f"files {of} (the names share them), whose text queries would then be refused. Export "
                f"{cfg.embedder.model} under another name, or delete those files first")


MIN_SAMPLE = 6  # dataset pictures an export needs to calibrate on (two thirds) and verify on (a third)


def _unsampled(cfg: RunConfig, n: int, why: str | None) -> str:
    """Why an export's pictures are generated ones: the dataset could not be read, or holds too few."""
    if why:  # its own advice left out: the export's warning says what to pass
        return f"{cfg.dataset.name} could not be read ({why.split('. ' + OFFLINE_ADVICE)[0].rstrip('.')})"
    return f"{cfg.dataset.name} has {n} readable picture(s), fewer than the {MIN_SAMPLE} an export needs"


def _run_export(cfg: RunConfig, sample_rows: int) -> RunSummary:
    summary = RunSummary(mode="export-onnx")
    images, calibration = verification_images(), None
    with summary.stage("read calibration rows"):
        sample, why = calibration_sample(cfg, sample_rows)
    if cfg.export.quantization == "dynamic":  # its ranges are measured on each input as it runs: nothing to fit
        if len(sample) >= MIN_SAMPLE:
            images = sample
            summary.notes.append(f"verified on {len(images)} rows of {cfg.dataset.name} (dynamic int8 is not "
                                 "calibrated: each input's ranges are measured as it runs)")
        else:
            summary.notes.append(f"verified on generated pictures: {_unsampled(cfg, len(sample), why)}; dynamic "
                                 "int8 is not calibrated")
    elif len(sample) >= MIN_SAMPLE:
        cut = len(sample) * 2 // 3
        calibration, images = sample[:cut], sample[cut:]
        summary.notes.append(f"calibrated on {cut} and verified on {len(images)} rows of {cfg.dataset.name}")
    else:
        log.warning("calibrating and verifying on generated pictures, not real photos: %s. Pass a readable --dataset "
                    "of %d pictures or more (a folder of your own will do) to fit the int8 ranges to real photos",
                    _unsampled(cfg, len(sample), why), MIN_SAMPLE)
        summary.notes.append(f"calibrated on generated pictures: {_unsampled(cfg, len(sample), why)}")
    with summary.stage("export+quantize+verify"):
        report = export_onnx(
            cfg.embedder.model,
            cfg.embedder.onnx,
            images=images,
            per_channel=not cfg.export.per_tensor,
            quantization=cfg.export.quantization,
            calibration_images=calibration,
            profile=cfg.export.int8_profile,
            threads=cfg.embedder.threads,
        )
    summary.notes.extend(report.lines())
    summary.count("verification images", report.images)
    kind = INT8_FORMATS.get(cfg.export.quantization, cfg.export.quantization)
    if cfg.export.quantization == "static":  # the profile written: a tower without an AMX graph gets vnni's
        mine = cfg.export.int8_profile == "auto" and report.profile == int8_profile("auto")
        kind += f"; {report.profile} profile" + (" (this CPU's)" if mine else "")
        if report.graph == DEPTHWISE_GRAPH:
            kind += ", depthwise convolutions in float"
    summary.outputs["int8 model"] = f"{report.int8_path} ({kind})"
    summary.outputs["fp32 model"] = str(report.fp32_path)
    text = text_onnx_path_for(report.int8_path)
    if text.is_file():  # a model without a tokenizer gets none (its report says so)
        summary.outputs["text tower"] = f"{text} (fp32), tokenizer {tokenizer_path_for(text)}"
    if note := default_file_note(cfg):
        summary.notes.append(note)
    return summary


def default_file_note(cfg: RunConfig) -> str | None:
    """What an export of another model than the default to the default --onnx changes: every run
    without --onnx or --model embeds with it from then on (said, not silent)."""
    default = EmbedderSpec()
    # by name: a reference would read a hub model's family from the hub, and a folder's is its path
    if cfg.embedder.onnx != default.onnx or cfg.embedder.model == default.model:
        return None
    return (f"{cfg.embedder.onnx} is the default --onnx: gallery builds without --onnx or --model now embed with "
            f"{cfg.embedder.model}, not {default.model}; export with --onnx FILE to keep the default")


def calibration_sample(cfg: RunConfig, rows: int) -> tuple[list, str]:
    """The first `rows` decodable images of the run's dataset, and why none could be read ("" if
    the dataset opened). Only the rows needed are fetched (see dataset.iter_records)."""
    sample: list[Image.Image] = []
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
