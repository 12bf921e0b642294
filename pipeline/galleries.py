"""The gallery a mode works on: built (or resumed) from the dataset, or loaded from the cache and
checked against its files and against what was asked for. Every mode (standard, segmentation,
video, query) gets its gallery here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends import ONNXRUNTIME
from .catalog import Catalog
from .config import RunConfig
from .datarecord import file_stamps, record_build
from .dataset import (
    DatasetSpec,
    Record,
    capped_rows,
    check_dataset,
    check_meta_columns,
    check_pieces,
    dataset_stamp,
    folder_metadata_files,
    iter_records,
    metadata_none_why,
    read_metadata,
)
from .derived import retire_stale
from .duplicates import stored_groups
from .embedders import Embedder, EmbedderSpec, check_device, make_embedder, on_cuda, requested_identity
from .errors import CacheMismatchError, PipelineError
from .fileio import being_written, read_json_dict, sha256_file_once, unlink_quietly
from .gallery import STANDARD_FILES, DeviceEmbedding, GalleryTarget, build_gallery, record_failures, remove_stale_files
from .identity import GallerySource, VectorIdentity, differences
from .items import make_segment_items, make_standard_items, note_persons_cut
from .machine import TreeMemory
from .metadata import METADATA_FILE, changed_rows, keep_for_store, load_metadata, stored_table, write_metadata
from .persons import Segmenter
from .preprocess import CPU_DECODES, CPU_PIXELS, DEVICE_PIXELS, cpu_pixels
from .ray_engine import RayBuild, build_gallery_ray
from .remedy import (
    DECODE_OF_PIXELS,
    build_first,
    cache_flag,
    finish_unfinished,
    flags_that_made,
    from_cache,
    gallery_run,
    reuse_or_rebuild,
    source_flags,
)
from .remote import images_there, remove_stale_at_url
from .report import RunSummary
from .searcher import Searcher, unknown_group_column
from .store import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    NEXT_DIR,
    PARTIAL_DIR,
    SIDECAR_FILE,
    STORE_FORMAT,
    SWITCH_FILE,
    SWITCH_STOPPED,
    UPDATE_DIR,
    GalleryCache,
    ManifestRow,
    Sidecar,
    embedded_rows,
    load_cache,
    manifest_sha256,
    run_params,
    store_sha256,
    unfinished_pixels,
    verify_images,
)
from .yolo import FIELD_OF_SETTING, SegmentSpec, make_segmenter, recorded_segment

log = logging.getLogger(__name__)

SEGMENT_FILES = re.compile(r"seg_([0-9a-f]{16}|\d+_(p\d+|full))\.png$")  # the file names a segmented gallery owns


@dataclass
class Gallery:
    """A mode's gallery: embeddings float32 (N, D) and every manifest line; `embedder` is the one
    that built it, or the one passed in (None when loaded from the cache without one)."""

    embeddings: np.ndarray
    rows: list[ManifestRow]
    embedder: Embedder | None
    # After --update: the old store's embedding rows it kept, in its order (the new items follow), and
    # the old store's embeddings sha256, so that neighbours can be carried over (runner.gallery_neighbours).
    carried: tuple[np.ndarray, str] | None = None
    # After --update: each kept photo's source row in the old store -> its row in the dataset now (a
    # photo removed or added before it moves it), for what compares the old store's rows with the new.
    kept_rows: dict[int, int] | None = None

    @property
    def embedded(self) -> list[ManifestRow]:
        """Manifest lines with an embedding, in embedding-row order (line k owns row k)."""
        return embedded_rows(self.rows)


def segmenter_factory(cfg: RunConfig) -> Segmenter:
    """The segmenter for a run (a function, so tests can substitute one with known masks): for a run
    that reads a segmented store, the store's own where no --seg-* flag says otherwise."""
    return make_segmenter(store_segment(cfg), device=cfg.embedder.device)


def store_segment(cfg: RunConfig) -> SegmentSpec:
    """The segmentation settings of a run that reads a segmented store (a search, a video against the
    cached gallery): the store's own model, backend, confidence, size and persons a photo for those
    not typed (yolo.recorded_segment). Any other run: its own."""
    sidecar = store_sidecar(cfg) if cfg.segmented and (cfg.searches_only or cfg.from_cache) else None
    if sidecar is None or sidecar.source.kind != "segment":
        return cfg.segment
    spec, taken = recorded_segment(sidecar.source, cfg.segment, cfg.explicit, cfg.store_dir,
                                   persons=not cfg.video.clip)  # a video's frames are not capped by --max-persons
    if taken:
        log.info("the store's own segmentation settings, where no --seg-* flag says otherwise (%s)",
                 ", ".join(f"{n} {v}" for n, v in taken.items()))
    return spec


def segmenter_weights(cfg: RunConfig) -> str | None:
    """The sha256 of a segmented run's local segmenter weights file (None for a whole-image run, or
    weights not here: a name Ultralytics downloads on its first load)."""
    path = Path(cfg.segment.model)
    return sha256_file_once(path) if cfg.segmented and path.is_file() else None


def decodes_on_device(cfg: RunConfig, embedder: Embedder) -> bool:
    """JPEGs are decoded and preprocessed by torchvision on the embedder's device: with --decode
    device, or by default when the model runs on CUDA (whole-image galleries; crops are cut on the
    CPU)."""
    if cfg.segmented or cfg.embedder.decode in CPU_DECODES:
        return False
    return cfg.embedder.decode == "device" or getattr(embedder, "device", "cpu") == "cuda"


def made_identity(cfg: RunConfig, embedder: Embedder) -> VectorIdentity:
    """What makes the vectors of this run's build: the loaded embedder's identity and which code
    makes its pixels, part of what made the vectors (a resume or an update never mixes them). Ray's
    workers decode on the CPU."""
    return embedder.identity.asks(pixels=made_pixels(cfg, embedder))


def decoded_as_made(cfg: RunConfig, pixels: str | None) -> RunConfig:
    """--decode auto goes on as a resumed run or an updated store was made when the CPU made its
    pixels (preprocess.CPU_PIXELS): a store made with --decode cpu-simd keeps torch's resize. Pixels
    of the device decoder are left to the checks, which name the flag."""
    if cfg.embedder.decode != "auto" or pixels not in CPU_PIXELS:
        return cfg
    return replace(cfg, embedder=replace(cfg.embedder, decode=DECODE_OF_PIXELS[pixels]))


def made_pixels(cfg: RunConfig, embedder: Embedder) -> str:
    """Which code makes the model inputs (preprocess.PIXELS_OF_DECODE): torchvision on the device,
    or on the CPU Pillow's decode and Pillow's or, with --decode cpu-simd, torch's resize."""
    if cfg.engine != "ray" and decodes_on_device(cfg, embedder):
        return DEVICE_PIXELS
    return cpu_pixels(cfg.embedder.decode)


def gallery_source(cfg: RunConfig) -> GallerySource:
    """What the gallery is made from; stored in the sidecar and part of the resume check."""
    data = cfg.dataset.as_dict()
    source = GallerySource(
        kind="segment" if cfg.segmented else "standard",
        dataset=data["dataset"],
        split=data["split"],
        limit=data["limit"],
        image_column=data["image_column"],
        id_column=cfg.dataset.id_column,
        config=cfg.dataset.config,
    )
    if not cfg.segmented:
        return source
    seg = cfg.segment
    return source.asks(
        seg_model=seg.model,
        seg_backend=seg.backend,
        seg_conf=seg.conf,
        seg_imgsz=seg.imgsz,
        keep_unsegmented=seg.keep_unsegmented,
        max_persons=seg.max_persons,
        seg_weights=segmenter_weights(cfg),
    )


def requested_fields(cfg: RunConfig) -> frozenset[str]:
    """The source fields compared against a cache: the kind, and those the user typed (defaults are
    not a request)."""
    # The id column is not a search's concern (a store made before it was recorded has none to compare): the
    # resume check (run_params) and --update compare it
    asked = {f for f in gallery_source(cfg).to_json() if f in cfg.explicit and f != "id_column"}
    if "seg_model" in asked:  # the file named, as it is now: its weights retrained under the same name are another
        asked.add("seg_weights")
    return frozenset({"kind"} | asked)


def _remove_stale_images_at_url(cfg: RunConfig, target: GalleryTarget, rows: list[ManifestRow]) -> None:
    keep = {r.file for r in rows if r.file}
    assert cfg.images_url is not None  # called for URL outputs only
    n = remove_stale_at_url(cfg.images_url, target.owned_files, keep)
    if n:
        log.info("removed %d image file(s) of an earlier, different run from %s", n, cfg.images_url)


def load_gallery_cache(cfg: RunConfig, identity: VectorIdentity | None = None) -> GalleryCache:
    """Load embeddings/ (or embeddings_segment/) and check it against files and the request."""
    images_at = None
    if cfg.images_url:  # the images stay in the bucket: listed, not fetched
        images_at = (cfg.images_url, images_there(cfg.images_url, cfg.output_dir, cfg.images_dir))
    try:
        return load_cache(
            cfg.store_dir,
            cfg.images_dir,
            identity=identity if identity is not None else requested_identity(cfg.embedder),
            source=gallery_source(cfg),
            source_fields=requested_fields(cfg),
            images_at=images_at,
        )
    except CacheMismatchError as e:
        # a search mode builds nothing, with a cache flag or without: the way to a store is a gallery run
        # a URL's, not its working copy's: a build into the copy would leave the bucket as it is
        shown: Path | str = cfg.output_url or cfg.output_dir
        search_from = shown if cfg.searches_only or not cfg.from_cache else None
        if e.missing and (cfg.store_dir / UPDATE_DIR / SWITCH_FILE).is_file():  # not a build's to redo
            raise CacheMismatchError(f"{e}\n{switch_pending(cfg)}") from None
        store_files = any((cfg.store_dir / f).is_file() for f in (MANIFEST_FILE, EMBEDDINGS_FILE))
        if e.missing and cfg.output_url and store_files:
            # the URL holds a store's files without its sidecar (sent last): an upload stopped, or under way
            raise CacheMismatchError(
                f"{e}\nThe store at {cfg.output_url} has its files but not its {SIDECAR_FILE}, which a run sends last: "
                "a run that wrote it is sending it now, or its upload stopped. Run that command again from the machine "
                "(the working copy) that made it, which sends the rest; a build here would embed every photo again"
            ) from None
        other = other_gallery(cfg)
        if (e.missing and (cfg.searches_only or cfg.from_cache) and not (cfg.store_dir / PARTIAL_DIR).is_dir()
                and other is not None):  # the other gallery's there: the flag forgotten, not a build
            other_dir, kind = other
            if cfg.searches_only:
                how = "to search that one, run the same command with " + (
                    "--use-segmentation" if not cfg.segmented else "no --use-segmentation")
            else:  # the other cache flag; or the build of this one
                how = (f"to reuse that one, run the same command with {cache_flag(not cfg.segmented)} in place of "
                       f"{cache_flag(cfg.segmented)}; to build this one, {from_cache(cfg.segmented)}")
            raise CacheMismatchError(f"{e}\n{cfg.output_dir} holds {kind} in {other_dir}: {how}") from None
        if e.missing and not (cfg.store_dir / PARTIAL_DIR).is_dir():
            line = build_first(cfg.store_dir, cfg.segmented, search_from, cfg.gallery_flags)
            raise CacheMismatchError(f"{e}\n{line}") from None
        if e.missing and search_from is not None:  # a search mode: the interrupted gallery run is what finishes it
            line = finish_unfinished(cfg.store_dir, cfg.segmented, search_from, cfg.embedder.onnx)
            raise CacheMismatchError(f"no complete store in {cfg.store_dir}\n{line}") from None
        if isinstance(e.made_by, Sidecar):
            made = e.made_by
            line = reuse_or_rebuild(e.differing, made.identity, made.source, cfg.segmented, cfg.embedder.onnx,
                                    search_from, cfg.gallery_flags)
            if (cfg.store_dir / PARTIAL_DIR).is_dir() and search_from is not None:  # a rebuild stopped early
                line += "\n" + finish_unfinished(cfg.store_dir, cfg.segmented, shown, cfg.embedder.onnx)
            elif (cfg.store_dir / PARTIAL_DIR).is_dir():
                line += (f"\nA gallery run into it stopped before it finished (its shards are in "
                         f"{cfg.store_dir / PARTIAL_DIR}): {from_cache(cfg.segmented)} to finish it, if it is that "
                         "run's (it resumes where it stopped, and replaces this store).")
            raise CacheMismatchError(f"{e}\n{line}") from None
        if not e.missing:  # a damaged store (a file cut short or replaced): no flag reuses it, a build makes it again
            build = (f" with a gallery run: {gallery_run(search_from, cfg.segmented)} with the flags that made it"
                     if search_from is not None else f": {from_cache(cfg.segmented)}")
            raise CacheMismatchError(f"{e}\nRebuild it{build} (the damaged store is replaced).") from None
        raise




def switch_pending(cfg: RunConfig) -> str:
    """What a reader is told of a store whose update's switch is not finished: stopped, or under way
    now in another run (which holds the output folder's lock)."""
    now = being_written(cfg.output_dir)
    if now:
        return f"an update of {cfg.store_dir} is switching its new store in{now}"
    return SWITCH_STOPPED.format(store=cfg.store_dir)


def open_gallery(cfg: RunConfig, summary: RunSummary, embedder: Embedder | None = None) -> Gallery:
    """The gallery for this run: from the cache when asked, else built (or resumed); its failed
    rows are recorded in the summary."""
    pending = (cfg.store_dir / UPDATE_DIR / SWITCH_FILE).is_file()
    if pending and cfg.from_cache:
        raise CacheMismatchError(switch_pending(cfg))
    if cfg.from_cache:
        with summary.stage("load cache"):
            # no embedder loaded (a gallery from the cache): the store's own, with no model flags
            cache = load_gallery_cache(cfg, identity=embedder.identity if embedder is not None
                                       else store_identity_if_default(cfg))
        log.info("loaded %d embeddings from %s", len(cache.embeddings), cfg.store_dir)
        summary.model = model_said(cache.sidecar.identity, embedder)
        gallery = Gallery(cache.embeddings, cache.rows, embedder)
        said = dataset_changed(cache.sidecar)
        if said:
            log.warning("%s", said)
            summary.notes.append(said)
    else:
        # a name the dataset lacks fails before the build, and so does an image folder's metadata.csv
        # that cannot be used (its warnings said once, here)
        checked = bool(cfg.meta_columns or cfg.filter or cfg.group_by or folder_metadata_files(cfg.dataset.name))
        if checked:
            schema = check_meta_columns(cfg.dataset, cfg.meta_columns)
            if cfg.filter:
                check_gallery_filter(cfg.filter, schema)
            if cfg.group_by:
                check_gallery_group_by(cfg.group_by, schema)
        if cfg.update:
            from .update import update_gallery  # update.py builds on this module

            gallery = update_gallery(cfg, summary, embedder)
        else:
            gallery = build(cfg, summary, embedder)
        summary.model = store_model(cfg.store_dir, gallery.embedder)  # as the sidecar just written records it
        if not cfg.images_url:  # hashed now (just written: read back from the page cache), so later loads hash none
            with summary.stage("verify image files"):
                verify_images(cfg.store_dir, cfg.images_dir, gallery.rows)
        with summary.stage("metadata"):  # the plain columns only: on the hub, the row groups under --limit
            table = read_metadata(cfg.dataset, cfg.meta_columns, warn=not checked)  # said once
        keep_metadata(cfg, table, gallery.rows, summary, gallery.kept_rows)
        # the query and video results made on the store before this run, if it changed
        retire_stale(cfg.store_dir, cfg.output_dir, cfg.plots_dir, summary, cfg.output_url)
    if cfg.segmented and not cfg.from_cache:
        note_persons_cut(gallery.rows, cfg.segment.max_persons, summary)
    record_failures(gallery.rows, summary)
    return gallery


def check_gallery_filter(text: str, schema: Any) -> None:
    """A gallery run's --filter checked against the columns the build will keep (FilterError, exit
    2, before any photo is embedded)."""
    from .filters import Filter, FilterError

    if schema is None or not len(schema):
        raise FilterError("--filter: this dataset keeps no metadata (a folder of pictures without subfolders or a "
                          "metadata.csv, a streamed dataset, or --meta-columns chose none), so there is nothing to "
                          "filter on")
    Filter.parse(text, schema)


def store_model(store_dir: Path, embedder: Embedder | None = None) -> str:
    """What made a store's vectors, for the run's summary ("" when its sidecar cannot be read)."""
    try:
        return model_said(Sidecar.read(store_dir / SIDECAR_FILE).identity, embedder)
    except (OSError, ValueError, KeyError, PipelineError):
        return ""


def model_said(made: VectorIdentity, embedder: Embedder | None) -> str:
    """What made the vectors, for the run's summary, with the file that ran where it is the one that
    made them (two exports of one model differ only by their files: "…/clip (onnx, …), edge/m.onnx")."""
    said = made.label()
    if embedder is None:
        return said
    ran = embedder.identity
    if embedder.source_file is not None and ran.onnx_sha256 == made.onnx_sha256:
        said += f", {embedder.source_file}"
    if (ran.backend == "torch" and ran.model and made.model and ran.model != made.model and made.model_sha256
            and ran.model_sha256 == made.model_sha256):
        said += f", loaded from {ran.model} (the same weights; the store records the folder it was made from)"
    return said


def check_gallery_group_by(column: str, schema: Any) -> None:
    """A gallery run's --group-by checked against the columns the build will keep (UsageError, exit
    2, before any photo is embedded; Searcher.group_by says the same of a store already built)."""
    kept = list(schema.names) if schema is not None else []
    if column not in kept:
        raise unknown_group_column(column, kept or None, "this dataset")


def with_metadata(cfg: RunConfig, searcher: Searcher) -> Searcher:
    """The searcher with the store's metadata loaded (once), for --filter and --group-by."""
    if searcher.metadata is None:
        searcher.metadata = load_metadata(cfg.store_dir, searcher.rows)
    return searcher


def group_by(cfg: RunConfig, searcher: Searcher, summary: RunSummary) -> None:
    """--group-by on a searcher whose metadata is loaded; the summary says how many items had no value."""
    if cfg.group_by is None:
        return
    missing = searcher.group_by(cfg.group_by)
    products = len(np.unique(searcher.group_of)) if searcher.group_of is not None else 0
    said = f"--group-by {cfg.group_by}: {products:,} products among {len(searcher.rows):,} items"
    kept = searcher.allowed(cfg.filter) if cfg.filter else None
    if kept is not None and searcher.group_of is not None:  # the searches' products are the filter's
        among = len(np.unique(searcher.group_of[kept]))
        said = (f"--group-by {cfg.group_by}: {among:,} products among the {int(kept.sum()):,} items --filter keeps "
                f"({products:,} among all {len(searcher.rows):,})"
                + (f"; a search returns at most {among:,}" if among < cfg.top_k else ""))
    summary.notes.append(said)
    if missing:
        summary.notes.append(
            f"--group-by {cfg.group_by}: {missing:,} item(s) have no value there; each stands as a product of its own"
        )


def keep_metadata(cfg: RunConfig, table: Any, rows: list[ManifestRow], summary: RunSummary,
                  kept_rows: dict[int, int] | None = None) -> None:
    """metadata.parquet beside the store (metadata.py): the dataset's plain columns for its rows. After
    an update, its note counts the kept photos whose values changed (kept_rows: their old source row ->
    their row now)."""
    path = cfg.store_dir / METADATA_FILE
    if table is None:
        unlink_quietly(path)
        summary.notes.append(f"metadata: none ({metadata_none_why(cfg.dataset.name)})")
        return
    before = stored_table(cfg.store_dir) if cfg.update else None
    written = write_metadata(cfg.store_dir, table, rows)
    columns = [c for c in table.column_names if c != "source_row"]
    if columns:
        kept = ", ".join(columns)
        summary.notes.append(f"metadata: {len(columns)} column(s) kept for --filter and every hit: {kept}")
    if before is not None and written:  # an update whose photos stayed said "changed 0" of a price changed
        changed = changed_rows(before, keep_for_store(table, rows), kept_rows)
        said = (f"values of {changed:,} kept photo(s) changed" if changed is not None
                else "its columns or their types changed")
        summary.notes.append(f"metadata: {said} (metadata.parquet written anew)")


def _build_on_ray(cfg: RunConfig, summary: RunSummary, embedder: Embedder | None, part: BuildPart | None) -> Gallery:
    """The gallery built by Ray (--engine ray): the driver's model loads while Ray starts."""
    images_dir, store_dir = _folders(cfg, part)
    if cfg.segmented:  # the actors load their own; this one checks the model before Ray starts
        with summary.stage("load segmenter"):
            segmenter_factory(cfg)
    target = GalleryTarget(images_dir, store_dir, owned_files=owned_files(cfg))
    given = embedder

    def load() -> Embedder:
        return given if given is not None else make_embedder(cfg.embedder)

    build = RayBuild(  # every local path as this process reads it: a joined cluster's workers start in its folder
        dataset=replace(cfg.dataset, name=_here(cfg.dataset.name), label=cfg.dataset.name),
        embedder=replace(cfg.embedder, onnx=_here(cfg.embedder.onnx), model=_here(cfg.embedder.model)),
        segment=replace(cfg.segment, model=_here(cfg.segment.model)) if cfg.segmented else None,
        images=_url_images(cfg, part) or str(images_dir.absolute()),
        store_dir=store_dir.absolute(),
        batch_size=cfg.batch_size,
        shard_rows=cfg.shard_rows,
        fresh=cfg.fresh,
        progress=cfg.progress,
        address=cfg.ray_address,
        cpus=cfg.embedder.threads,
        rows=None if part is None else part.rows,
        segmenter_weights=segmenter_weights(cfg),
        pixels=cpu_pixels(cfg.embedder.decode),  # the workers decode on the CPU
    )
    with TreeMemory() as memory:
        emb, rows, embedder = build_gallery_ray(build, summary, load, gallery_source(cfg))
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):  # a cluster joined: its workers are not this process's
        said = (f"peak memory during the Ray build, this process alone: {memory.peak_mib:,.0f} MiB (the joined "
                "cluster's workers, on this machine or others, are not counted)")
    else:
        said = (f"peak memory during the Ray build, this process and its Ray processes together: "
                f"{memory.peak_mib:,.0f} MiB; the peak memory above counts this process alone")
    summary.notes.append(said)
    if part is not None:
        pass  # an update's new photos: the update's switch puts them in place
    elif cfg.output_url:  # the workers wrote the images to the URL
        _remove_stale_images_at_url(cfg, target, rows)
    else:
        remove_stale_files(target, rows)
    return Gallery(emb, rows, embedder)


def _here(name: str) -> str:
    """A name that is a local file or folder as an absolute path (relative ones were read from a joined
    cluster's own folder: every photo of --dataset photos failed, a relative --onnx was "not found");
    a hub id or a short name as it is."""
    return str(Path(name).absolute()) if name and Path(name).exists() else name


def _url_images(cfg: RunConfig, part: BuildPart | None) -> str | None:
    """Where the images go with a URL --output-dir: its images folder, or for an update's new photos
    that folder's staging (the old store's files stay as they are). Ray workers write them there; a
    local build's resumed shards made in another working copy have theirs there."""
    if cfg.images_url is None:
        return None
    return cfg.images_url if part is None else f"{cfg.images_url}/{UPDATE_DIR}"


@dataclass(frozen=True)
class BuildPart:
    """Some rows of the dataset built into their own store and image folders (--update's new photos)."""

    store_dir: Path
    images_dir: Path
    rows: frozenset[int]  # the dataset rows to build


def build(cfg: RunConfig, summary: RunSummary, embedder: Embedder | None = None, part: BuildPart | None = None
          ) -> Gallery:
    """Build (or resume) the run's gallery store from its dataset (or, with `part`, some of its rows
    into other folders)."""
    # A wrong dataset, split or column fails here: before the model loads and before the run's state is written.
    size = check_dataset(cfg.dataset) if part is None else None
    if cfg.engine == "ray":  # said before Ray starts or a folder is made: a format its workers cannot read in
        check_pieces(cfg.dataset)  # pieces, a GPU that is not there
        check_device(cfg.embedder)
    total_rows = capped_rows(size, cfg.dataset.limit) if part is None else len(part.rows)
    again = built_again(cfg) if part is None else None
    if again:
        log.warning("%s", again)
        summary.notes.append(again)
    if size is not None and total_rows is not None and size > total_rows:  # the default 10,000 cut a catalogue short
        said = (f"--limit {total_rows:,}: the first {total_rows:,} of the dataset's {size:,} rows (--limit 0 reads "
                "them all)")
        log.info("%s", said)
        summary.notes.append(said)
    if part is None:
        staged = [f for f in (cfg.store_dir / UPDATE_DIR, cfg.images_dir / UPDATE_DIR) if f.is_dir()]
        if staged:  # the build replaces the store: an update's work on the old one is moot
            log.info("discarding an interrupted update's staging in %s", cfg.store_dir / UPDATE_DIR)
            for folder in staged:
                shutil.rmtree(folder, ignore_errors=True)
    images_dir, store_dir = _folders(cfg, part)
    if not cfg.fresh:
        cfg = decoded_as_made(cfg, unfinished_pixels(store_dir))
    if cfg.engine == "ray":
        return _build_on_ray(cfg, summary, embedder, part)
    segmenter, embed_batch = None, None
    if cfg.segmented:  # first: a --seg-model that cannot segment is refused in a second or two, not after the model
        with summary.stage("load segmenter"):
            segmenter = segmenter_factory(cfg)
    with summary.stage("load model"):
        embedder = embedder or make_embedder(cfg.embedder)
    min_side = embedder.preprocess_cfg.decode_min_side
    on_device = decodes_on_device(cfg, embedder)
    images_url = _url_images(cfg, part)
    if segmenter is not None:
        make_items = make_segment_items(segmenter, cfg.segment)
        target = GalleryTarget(images_dir, store_dir, owned_files=owned_files(cfg), group_size=8,
                               images_url=images_url)
        stage_name = "decode+segment+crop"
    elif on_device:
        make_items = make_standard_items(min_side, device_decode=True)
        target = GalleryTarget(images_dir, store_dir, device_decode=True, images_url=images_url)
        embed_batch = DeviceEmbedding(embedder, getattr(embedder, "device", "cpu"), min_side)
        stage_name = "headers+CPU decode"
    else:
        make_items = make_standard_items(min_side)
        target = GalleryTarget(images_dir, store_dir, parallel_items=True, images_url=images_url)
        stage_name = "decode"
    source = gallery_source(cfg)
    identity = made_identity(cfg, embedder)
    params = run_params(source, identity, cfg.batch_size, cfg.shard_rows, None if part is None else part.rows,
                        dataset_stamp(cfg.dataset), segmenter_weights(cfg))
    reading = _Reading(cfg.dataset) if part is None else None

    def records(start: int) -> Iterator[Record]:
        if part is not None:  # an update's new photos: their rows alone
            return iter_records(cfg.dataset, start, part.rows)
        assert reading is not None
        return reading.watch(iter_records(cfg.dataset, start), start)

    emb, rows = build_gallery(
        records=records,
        total_rows=total_rows,
        rows_before=None if part is None else (lambda n: sum(r < n for r in part.rows)),
        make_items=make_items,
        embedder=embedder,
        target=target,
        run_params=params,
        source=source,
        summary=summary,
        batch_size=cfg.batch_size,
        shard_rows=cfg.shard_rows,
        fresh=cfg.fresh,
        progress=cfg.progress,
        item_stage_name=stage_name,
        identity=identity,
        embed_batch=embed_batch,
    )
    if cfg.output_url and part is None:  # an earlier run from another working copy may have left images there
        _remove_stale_images_at_url(cfg, target, rows)
    if segmenter is not None:
        summary.timed("embed/items/segment", segmenter.predict_seconds, "of which segmentation predict")
    if reading is not None and reading.whole:
        with summary.stage("record the dataset for --update"):
            try:
                record_build(cfg.dataset, reading.stamps, rows, reading.linked)
            except Exception as e:  # a cache, whatever went wrong: the build stands; updates read the files
                log.warning("could not record what the build read of %s for --update: %s", cfg.dataset.name, e)
    return Gallery(emb, rows, embedder)


class _Reading:
    """What a local build reads of a local parquet dataset, for datarecord.record_build: the files'
    stamps before the read, the rows whose cells named picture files, and whether this process read
    every row (a resumed build read some in an earlier one)."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.stamps = file_stamps(spec)
        self.linked: set[int] = set()
        self.whole = False  # set once every row was read here, from the first

    def watch(self, records: Iterator[Record], start: int) -> Iterator[Record]:
        for rec in records:
            if rec.linked:
                self.linked.add(rec.source_row)
            yield rec
        self.whole = start == 0 and bool(self.stamps)


def _folders(cfg: RunConfig, part: BuildPart | None) -> tuple[Path, Path]:
    """(images, store) folders of a build: the run's, or a part's."""
    return (cfg.images_dir, cfg.store_dir) if part is None else (part.images_dir, part.store_dir)


def owned_files(cfg: RunConfig) -> re.Pattern:
    """The image file names the run's gallery owns (stale ones of them are removed)."""
    return SEGMENT_FILES if cfg.segmented else STANDARD_FILES


def open_searcher(cfg: RunConfig, embeddings: np.ndarray, rows: list[ManifestRow], gpu: bool,
                  build_auto: bool = False, build_named: bool = False, made_by: Sidecar | None = None,
                  renew: bool = False) -> Searcher:
    """The searcher of the run's store and its index: --index none searches exactly; otherwise the
    index beside the store is used. build_auto (gallery runs) makes or renews it first; build_named
    (video, which holds the output folder) does so when --index names a kind, and `renew` when --index
    auto and the run built the store itself (the index beside it is an earlier store's). The read-only modes
    (--query-*, --serve) never write an index, and pass the sidecar their store was loaded with
    (`made_by`): an update switched in since then is not read from the sidecar now on disk, whose
    index and duplicate groups are the new store's."""
    if cfg.index == "none" or len(embeddings) < 2:
        searcher = Searcher(embeddings, rows, None, device="cuda" if gpu else None)
    else:
        build = build_auto or renew if cfg.index == "auto" else build_auto or build_named
        searcher = Searcher.open(
            cfg.store_dir, embeddings, rows, made_by.embeddings_sha256 if made_by else store_sha256(cfg.store_dir),
            cfg.index, cfg.embedder.threads, gpu=gpu,
            build=build,
        )
    if cfg.dedup and not build_auto:  # a gallery run finds the groups itself, from its neighbours
        lines_key = made_by.manifest_sha256 if made_by else manifest_sha256(cfg.store_dir)
        searcher.dedup(stored_groups(cfg.store_dir, searcher.rows, lines_key))
    return searcher


# GallerySource field -> DatasetSpec field: what an --update takes from its store where no flag says
_STORE_DATASET = {"dataset": "name", "config": "config", "split": "split", "image_column": "image_column",
                  "limit": "limit", "id_column": "id_column"}


def with_store_source(cfg: RunConfig) -> tuple[RunConfig, str]:
    """--update: the dataset settings no flag gave taken from the store (its dataset, configuration,
    split, image column, row limit and id column), as its embedder is, so that an update with no
    dataset flags keeps the store's scope (the default --limit would cut a gallery of every row to
    10,000 photos). Returns the configuration and what was taken, as flags ("" when nothing). A
    sidecar that cannot be read is refused: the update would go on with the default dataset."""
    if not cfg.update:
        return cfg, ""
    path = cfg.store_dir / SIDECAR_FILE
    if not path.is_file() and (cfg.store_dir / UPDATE_DIR / SWITCH_FILE).is_file():
        path = cfg.store_dir / UPDATE_DIR / NEXT_DIR / SIDECAR_FILE  # a switch stopped midway: the store it brings in
    if not path.is_file():
        return cfg, ""
    try:
        sidecar = Sidecar.read(path)
    except CacheMismatchError as e:
        if read_json_dict(path).get("format") not in (None, STORE_FORMAT):  # an older version's: its way is said
            raise
        raise PipelineError(
            f"{e}\nA damaged store cannot be updated, and what it was built from cannot be read from it: build it "
            "afresh without --update, giving the dataset flags that built it (--dataset, and --limit, --split, "
            "--config where they were given)") from None
    taken = _taken_from_store(cfg, sidecar)
    segment, cut = _segmentation_of_store(cfg, sidecar)
    if not taken and not cut:
        return cfg, ""
    spec = replace(cfg.dataset, **{_STORE_DATASET[f]: getattr(sidecar.source, f) for f in taken})
    said = flags_that_made([*taken, *cut], sidecar.identity, sidecar.source, None)
    return replace(cfg, dataset=spec, segment=segment), " ".join(said)


def _segmentation_of_store(cfg: RunConfig, sidecar: Sidecar) -> tuple[SegmentSpec, list[str]]:
    """--update of a segmented store: its segmentation settings where no flag gave them (the new photos
    cut as its crops were; the nightly job had to repeat every --seg-* flag, refused by field names),
    and the fields taken. Its weights are checked as a search checks them (yolo.recorded_segment)."""
    made = sidecar.source
    if not cfg.segmented or made.kind != "segment":
        return cfg.segment, []
    spec, taken = recorded_segment(made, cfg.segment, cfg.explicit, cfg.store_dir, whole=True)
    return spec, [FIELD_OF_SETTING[name] for name in taken]


def _taken_from_store(cfg: RunConfig, sidecar: Sidecar) -> list[str]:
    """The dataset settings an --update takes from its store: those no flag gave that differ (None
    recorded: the default configuration, every row; an id column or image column not recorded)."""
    made = sidecar.source
    if made.dataset is None:
        return []
    return [field for field, name in _STORE_DATASET.items()
            if field not in cfg.explicit and getattr(made, field) != getattr(cfg.dataset, name)
            and (getattr(made, field) is not None or field in ("config", "limit"))]


def built_again(cfg: RunConfig) -> str | None:
    """What a gallery run is told over a complete store that the same flags made (the first
    command run a second time, where --use-embeddings was meant): it embeds every photo again,
    which --use-embeddings or --update would not. None for any other run (--fresh asks for it; a
    stopped rebuild resumes)."""
    if cfg.fresh or cfg.update or cfg.from_cache or (cfg.store_dir / PARTIAL_DIR).is_dir():
        return None
    sidecar = store_sidecar(cfg)
    if sidecar is None or sidecar.source != gallery_source(cfg):
        return None
    try:
        if differences(requested_identity(cfg.embedder), sidecar.identity):
            return None
    except PipelineError:  # the file asked for is not there: said when the run loads it
        return None
    how = ("the dataset changed since: --update embeds only its new and changed photos" if dataset_changed(sidecar)
           else "--use-embeddings reuses it as it is, --update catches up with a changed dataset")
    return f"{cfg.store_dir} holds a complete store these flags made: this run embeds every photo again ({how})"


def dataset_changed(sidecar: Sidecar) -> str | None:
    """What a reuse of the store is told when the local dataset it was made from changed since (as
    the resume check stamps it: a picture of a folder added, replaced or removed, a parquet file
    rewritten; not a folder's metadata.csv, which --update reads): its vectors are of the photos as
    they were. None when it did not, or nothing was recorded (a hub dataset, an older store)."""
    made = sidecar.source
    if sidecar.dataset_files is None or made.dataset is None:
        return None
    spec = replace(DatasetSpec(), **{name: getattr(made, f) for f, name in _STORE_DATASET.items()})
    now = dataset_stamp(spec)
    if now is None or now == sidecar.dataset_files:
        return None
    return (f"the dataset {made.dataset} changed since this store was made from it ({sidecar.dataset_files} then, "
            f"{now} now): the store holds its photos as they were; --update brings it up to date, embedding only "
            "what changed")


def store_dataset_flags(cfg: RunConfig) -> str:
    """The dataset flags that built the run's store, as a build without --update needs them typed
    ("" when the sidecar cannot say): an update's remedy "build afresh" would otherwise read the
    default dataset."""
    sidecar = store_sidecar(cfg)
    if sidecar is None or sidecar.source.dataset is None:
        return ""
    return " ".join(source_flags(sidecar.source, sidecar.identity))


def other_gallery(cfg: RunConfig) -> tuple[Path, str] | None:
    """The other gallery of the output folder (the segmented one beside a gallery of whole photos, or
    that one beside a segmented), with what it is for a person, where it is complete; None otherwise.
    A store missing beside it means a flag left out, not a store to build."""
    other = cfg.output_dir / ("embeddings" if cfg.segmented else "embeddings_segment")
    if not (other / SIDECAR_FILE).is_file():
        return None
    return other, "a gallery of whole photos" if cfg.segmented else "a segmented gallery (person crops)"


def store_identity_if_default(cfg: RunConfig) -> VectorIdentity | None:
    """What made the store, for a mode that reads one when no --model, --onnx or --backend was given
    (the embedder is the default one); None when one was, or the store cannot be read (loading it
    then says what is wrong)."""
    sidecar = store_sidecar_if_default(cfg)
    return None if sidecar is None else sidecar.identity


def store_sidecar_if_default(cfg: RunConfig) -> Sidecar | None:
    """The store's sidecar for a mode that reads one with no --model, --onnx or --backend given (the
    embedder is the store's own); None when one was, or the store cannot be read."""
    default, asked = EmbedderSpec(), cfg.embedder
    if {"model", "onnx", "backend"} & cfg.explicit or (asked.model, asked.onnx, asked.backend) != (
            default.model, default.onnx, default.backend):
        return None
    return store_sidecar(cfg)


def store_sidecar(cfg: RunConfig) -> Sidecar | None:
    """The sidecar of the run's store, for what a run takes from it where no flag says; None when
    there is none or it cannot be read (loading the store then says what is wrong with it)."""
    if not (cfg.store_dir / SIDECAR_FILE).is_file():
        return None
    try:
        return Sidecar.read(cfg.store_dir / SIDECAR_FILE)
    except CacheMismatchError:
        return None


def store_embedder_note(cfg: RunConfig, note: str | None) -> str | None:
    """config.onnx_fallback's note ("using the transformers model ..."), or None where it would be
    untrue: a run that embeds with its store's own embedder (the search modes, --update, a video
    against the cached gallery), or embeds nothing (--export, a gallery from the cache), when the
    store was made by another embedder than the default model."""
    if note is None or not (cfg.searches_only or cfg.from_cache or cfg.update):
        return note
    made = store_identity_if_default(cfg)
    if made is None or (made.backend, made.model) == ("torch", cfg.embedder.model):
        return note
    return None


def with_store_embedder(cfg: RunConfig) -> RunConfig:
    """The run's configuration with the embedder that made its store where no --model, --onnx or
    --backend was given (as the search modes take it: _search_embedder)."""
    spec = _search_embedder(cfg)
    return cfg if spec == cfg.embedder else replace(cfg, embedder=spec)


def _search_embedder(cfg: RunConfig) -> EmbedderSpec:
    """--model / --onnx / --backend as given; none of them given, the embedder the store records
    where it is another than the default (its ONNX file not found: the default, which loading the
    cache checks, saying what to pass)."""
    sidecar = store_sidecar_if_default(cfg)
    if sidecar is None:
        _backend_against_store(cfg)
        return _on_store_runtime(cfg)
    from .catalog import store_embedder_spec

    # the store's ONNX file found nowhere: refused, naming it (CacheMismatchError)
    spec = store_embedder_spec(sidecar.identity, cfg.store_dir, None, None, cfg.embedder.device, cfg.embedder.threads,
                               sidecar.onnx_file)
    # its file on the runtime that made its vectors, unless --onnx-runtime says another (refused, with its remedy)
    runtime = cfg.embedder.runtime if "onnx_runtime" in cfg.explicit else spec.runtime
    if spec.backend == "onnx" and spec.onnx == EmbedderSpec().onnx:
        return replace(cfg.embedder, runtime=runtime)  # the default file: as asked
    log.info("no --model or --onnx given: the store's own embedder (%s)",
             spec.onnx if spec.backend == "onnx" else spec.model)
    return replace(cfg.embedder, model=spec.model or cfg.embedder.model, onnx=spec.onnx, backend=spec.backend,
                   runtime=runtime)


def _backend_against_store(cfg: RunConfig) -> None:
    """--backend onnx alone against a store the torch backend made, the file not there: said as what
    it is (its "make it with --export-onnx --model <the default model>" exported a model the store
    was never made by), before a model loads."""
    if "backend" not in cfg.explicit or {"model", "onnx"} & cfg.explicit or cfg.embedder.resolve_backend() != "onnx":
        return
    sidecar = store_sidecar(cfg)
    if sidecar is None or sidecar.identity.backend != "torch" or Path(cfg.embedder.onnx).is_file():
        return
    raise CacheMismatchError(
        f"{cfg.store_dir} was made by {sidecar.identity.label()}: --backend onnx would embed its queries with an ONNX "
        f"file (the default, {cfg.embedder.onnx}, is not there), whose vectors are not the store's. Drop --backend "
        "onnx: a search takes the store's own embedder")


def _on_store_runtime(cfg: RunConfig) -> EmbedderSpec:
    """The embedder asked for, its ONNX file on the runtime the store records where --onnx-runtime
    does not say (as Catalog.open(onnx=...) takes it): one runtime's vectors are never searched or
    updated with the other's, and the flag left out asks for none in particular."""
    spec = cfg.embedder
    sidecar = None if "onnx_runtime" in cfg.explicit or spec.resolve_backend() != "onnx" else store_sidecar(cfg)
    if sidecar is None:
        return spec
    made = sidecar.identity
    if made.backend != "onnx" or (made.runtime or ONNXRUNTIME) == spec.runtime:
        return spec
    log.info("%s was made on %s: its queries run there too", cfg.store_dir, made.runtime)
    return replace(spec, runtime=made.runtime or ONNXRUNTIME)


def open_catalog(cfg: RunConfig, summary: RunSummary, embedder: Embedder | None = None) -> Catalog:
    """The cached gallery of a search mode (--query-*, --serve), checked against the files and the model
    asked for, with its searcher (per --index, --threads, on the GPU when the model is there). With
    no --model, --onnx or --backend, the embedder is the one the store records, as Catalog.open
    takes it (its ONNX file found by its sha256 where the default is another), not the default."""
    if not (cfg.store_dir / SIDECAR_FILE).is_file():
        load_gallery_cache(cfg)  # no store: refused with how to make one, before a model loads (or downloads)
    with summary.stage("load model"):
        embedder = embedder or make_embedder(_search_embedder(cfg))
    with summary.stage("load cache"):
        cache = load_gallery_cache(cfg, identity=embedder.identity)
    summary.model = model_said(cache.sidecar.identity, embedder)  # every search mode's: what made the vectors
    with summary.stage("load index"):
        searcher = open_searcher(cfg, cache.embeddings, cache.embedded_rows, gpu=on_cuda(embedder),
                                 made_by=cache.sidecar)
    searcher.metadata = load_metadata(cfg.store_dir, searcher.rows, cache.sidecar.manifest_sha256)
    group_by(cfg, searcher, summary)
    loaded = embedder
    return Catalog(cache, searcher, lambda: loaded, lambda: segmenter_factory(cfg))
