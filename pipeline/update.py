"""--update: bring a gallery store up to date with its dataset as it is now.

Every photo of the dataset is matched to the store by what it is: its `--id-column` value when one
is given (a photo whose bytes changed under the same id is *changed*), else the sha256 of its bytes
(a re-shot photo is then one removed and one added). Matched photos are *unchanged*: their manifest
lines, vectors, thumbnails and files are carried over byte for byte (only their dataset row follows
the row, their source the dataset's name for them where it has one (a folder photo renamed), and
duplicate signals of an earlier signature are signed again from the files, `sign_again`; files are
named by their content, so no file is renamed, except once, those of a store made when names carried
the row). The others are embedded, by the same item pipeline as a build, into a staging store.
Photos the dataset no longer holds are dropped with everything of theirs.

Order rule: the new store lists the photos it kept in the old store's order, then the new ones in
dataset order. Sorted by (source_row, person), its manifest lines and vectors are a fresh build's.

Safe to interrupt: all the work happens in `<store>/.update/` and `<images>/.update/`; the old store
is untouched and usable (`--use-embeddings`, `--serve`) until the switch. The switch is decided by a
marker written once the new store is complete; it moves the new files into place, the sidecar last
(a reader in those milliseconds is refused, never served a mix), and a run killed during it
finishes it the next time. Rerunning an interrupted update resumes its embedding from its shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import ONNXRUNTIME
from .config import RunConfig
from .datarecord import dataset_hashes, known_as_is
from .dataset import Record, capped_rows, check_dataset, dataset_stamp
from .duplicates import SIGNATURE_VERSION
from .embedders import Embedder, EmbedderSpec, available_cores, make_embedder, requested_identity
from .errors import CacheMismatchError, PipelineError, UsageError, first_line
from .fileio import link_or_copy, sha256_file_once, unlink_quietly
from .galleries import (
    BuildPart,
    Gallery,
    build,
    decoded_as_made,
    gallery_source,
    made_identity,
    other_gallery,
    owned_files,
    store_dataset_flags,
    with_store_embedder,
)
from .identity import VectorIdentity, differences
from .index import INDEX_META, switch_index, update_index
from .items import crop_file_name, file_signals, image_file_name, image_reader, signed_in_chunks, unsigned_lines
from .preprocess import PreprocessConfig
from .remedy import DECODE_OF_PIXELS, FLAG_OF, flags_that_made
from .report import RunSummary
from .store import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    MAX_THUMBNAIL_SEGMENTS,
    NEW_PART_DIR,
    NEXT_DIR,
    PART_FILE,
    PARTIAL_DIR,
    RUN_FILE,
    SIDECAR_FILE,
    SWITCH_FILE,
    UPDATE_DIR,
    GalleryCache,
    ManifestRow,
    Sidecar,
    ThumbnailPart,
    ThumbnailReader,
    carry_thumbnails_stamp,
    load_cache,
    read_manifest,
    remove_unlisted_segments,
    rows_key,
    store_sha256,
    thumbnail_parts,
    write_store,
)
from .webreport import count_of

log = logging.getLogger(__name__)

STAGING, SWITCH = UPDATE_DIR, SWITCH_FILE  # see store.py
THUMB_CHUNK = 256  # thumbnails copied at a time (12 MiB at 128 px)


@dataclass
class Plan:
    """What an update does: `kept` pairs (old source row, new source row) in the old store's order;
    `embed` the dataset rows to embed; the counts the summary reports."""

    kept: list[tuple[int, int]] = field(default_factory=list)
    embed: list[int] = field(default_factory=list)
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    no_image: int = 0  # rows without a picture that the store has not as they are (new, or another reason): recorded
    no_image_gone: int = 0  # rows without a picture the dataset no longer holds
    unkeyed: int = 0  # photos of a store made before --update (no source_sha256): embedded again
    sources: dict[int, str] = field(default_factory=dict)  # new row -> its source now, where the dataset says
    ids: dict[int, str] = field(default_factory=dict)  # new row -> its id as written now, where only the writing
    # changed: a whole number's column turned decimal (pandas makes one so when a value goes missing): 5 -> 5.0

    def describe(self) -> str:
        line = f"added {self.added}, changed {self.changed}, removed {self.removed}, unchanged {self.unchanged}"
        if self.no_image:
            line += f"; {self.no_image} row(s) without a picture recorded (new, or failing otherwise than before)"
        if self.no_image_gone:
            line += f"; {self.no_image_gone} row(s) without a picture no longer read (gone, or past --limit)"
        if self.unkeyed:
            line += f"; {self.unkeyed} photo(s) of a store made before --update had no key and were embedded again"
        return line


def photo_groups(rows: Iterable[ManifestRow]) -> dict[int, list[ManifestRow]]:
    """The store's lines grouped by the dataset row they came from, in manifest order."""
    groups: dict[int, list[ManifestRow]] = {}
    for r in sorted(rows, key=lambda r: r.index):
        groups.setdefault(r.source_row, []).append(r)
    return groups


_WHOLE = re.compile(r"^([-+]?\d+)\.0+$")  # an id written as a decimal whole number is that number: 5.0 is 5


def plan_update(groups: dict[int, list[ManifestRow]], records: Iterable[tuple[Record, str]], by_id: bool,
                dataset: str = "") -> Plan:
    """Match the dataset's records, in order, each with the sha256 of its bytes ("" for a row without
    a picture; see dataset_hashes), to the store's photos (by id, or by that sha256; equal photos
    are matched in order, so copies keep their number). A matched record's source, where it has one,
    is its name now (`plan.sources`); one without (a parquet cell with no path of its own) whose line
    had a name of its own is named "<dataset>[row]", as a fresh build of `dataset` names it."""
    plan = Plan()

    def name(old_row: int, rec: Record) -> None:
        if by_id and rec.item_id != groups[old_row][0].item_id:
            plan.ids[rec.source_row] = rec.item_id
        if rec.source:
            plan.sources[rec.source_row] = rec.source
        elif dataset and not groups[old_row][0].source.endswith(f"[{old_row}]"):  # its own path lost
            plan.sources[rec.source_row] = f"{dataset}[{rec.source_row}]"

    def key_of(item_id: str, sha: str) -> str:
        """By id; a photo whose id is empty, and every photo without ids, by its bytes (a prefix no id has)."""
        return _WHOLE.sub(r"\1", item_id) if by_id and item_id else f"\0{sha}" if sha else ""

    pool: dict[str, deque[int]] = defaultdict(deque)
    pictureless: dict[tuple[str, str], deque[int]] = defaultdict(deque)  # by (id, why), in order
    for old_row, lines in groups.items():
        key = key_of(lines[0].item_id, lines[0].source_sha256)
        if key:
            pool[key].append(old_row)
        if not lines[0].source_sha256 and not lines[0].sha256:  # a row that had no picture, and why
            pictureless[(key_of(lines[0].item_id, ""), lines[0].error)].append(old_row)
    matched: dict[int, int] = {}
    replaced: set[int] = set()  # old rows whose id came back with other bytes
    new_bytes: dict[str, int] = defaultdict(int)  # per id: its photos that found no old row of the same bytes left
    for rec, sha in records:
        if not sha:  # still without a picture, for the same reason: its line is kept as it is
            same = pictureless.get((key_of(rec.item_id, ""), rec.error))  # a matched row leaves it and its pool
            if same:
                old_row = same.popleft()
                if by_id and old_row in (same_id := pool.get(key_of(rec.item_id, ""), deque())):
                    same_id.remove(old_row)
                matched[old_row] = rec.source_row
                name(old_row, rec)
                plan.unchanged += 1
                continue
            plan.embed.append(rec.source_row)
            plan.no_image += 1
            continue
        key = key_of(rec.item_id, sha)
        if key and pool.get(key):
            queue = pool[key]  # an id may repeat: the old row with these very bytes, if there is one
            same_bytes = next((r for r in queue if groups[r][0].source_sha256 == sha), None)
            if same_bytes is not None:
                queue.remove(same_bytes)
                matched[same_bytes] = rec.source_row
                name(same_bytes, rec)  # a file of a folder renamed, its bytes the same: it keeps all but its name
                plan.unchanged += 1
                continue
            # New bytes under an id of the store: a photo that replaces one of the id's or one added to
            # it, told at the end, once every photo of the id whose bytes are the same has its own row
            # back (a product's new photo listed before its old ones takes none of theirs).
            new_bytes[key] += 1
        else:
            plan.added += 1
        plan.embed.append(rec.source_row)
    for key, count in new_bytes.items():
        queue = pool[key]  # the id's old rows no photo of the same bytes came back to, in order: replaced
        for _ in range(count):
            if queue:
                replaced.add(queue.popleft())
                plan.changed += 1
            else:
                plan.added += 1
    plan.kept = [(old, matched[old]) for old in groups if old in matched]
    gone = [lines for old, lines in groups.items() if old not in matched and old not in replaced]
    plan.unkeyed = sum(1 for lines in gone if not lines[0].source_sha256 and lines[0].sha256)  # had a picture
    plan.removed = sum(1 for lines in gone if lines[0].source_sha256)
    plan.no_image_gone = sum(1 for lines in gone if not lines[0].source_sha256 and not lines[0].sha256)
    return plan


def renamed(line: ManifestRow) -> str:
    """The file name a kept line has in the new store: its content name (items.image_file_name),
    which is its name already unless the store was made when names carried the dataset row."""
    if not line.file or not line.sha256:
        return line.file
    if line.file.startswith("seg_"):
        return crop_file_name(line.sha256)
    return image_file_name(line.sha256, line.file.rsplit(".", 1)[-1])


def moved_source(source: str, dataset: str, old_row: int, new_row: int) -> str:
    """A line's `source` at its new row: a cell without a path of its own is named "<dataset>[row]"
    (dataset._row_record), which follows the row, in the dataset's spelling of this run (the store's
    may be another: `cat` then `/data/cat`), as a fresh build names it; a file's path stays."""
    named = source.endswith(f"[{old_row}]")
    spelled = source[: -len(f"[{old_row}]")] if named else ""
    same = spelled == dataset or (bool(spelled) and Path(spelled).name == Path(dataset).name)
    return f"{dataset}[{new_row}]" if named and same else source


def update_gallery(cfg: RunConfig, summary: RunSummary, embedder: Embedder | None = None) -> Gallery:
    """--update: the store brought up to date, then switched into place (see the module's doc)."""
    store = cfg.store_dir
    stage = store / STAGING
    if (stage / SWITCH).is_file():
        finished = [line for line in (stage / SWITCH).read_text().splitlines() if line.startswith("update: ")]
        with summary.stage("finish an interrupted switch"):
            switch(cfg)
        # what that update did (this run compares the store, now switched, with the dataset again)
        summary.notes.append("finished an interrupted update's switch" + (f" ({finished[0]})" if finished else ""))
    rows_now = capped_rows(check_dataset(cfg.dataset), cfg.dataset.limit)
    with summary.stage("load store"):
        old = _old_store(cfg)
        if embedder is None:  # no --model, --onnx or --backend: the store's own embedder
            cfg = with_store_embedder(cfg)
        cfg = decoded_as_made(cfg, old.sidecar.identity.pixels)
        _check_embedder(cfg, old)
    groups = photo_groups(old.rows)
    by_id = cfg.dataset.id_column is not None
    if not by_id and any(r.item_id for r in old.rows):  # kept lines would keep ids, new ones get none
        raise PipelineError(
            f"{store} was built with --id-column, so its photos have ids: update with the same --id-column, so that "
            "they stay current, or build afresh without it"
        )
    made_by = old.sidecar.source.id_column  # None in a store made before it was recorded
    if by_id and made_by is not None and made_by != cfg.dataset.id_column:
        raise PipelineError(
            f"{store} was built with --id-column {made_by}: its photos are known by that column's values, so an "
            f"update by --id-column {cfg.dataset.id_column} would take every photo for a new one. Update with "
            f"--id-column {made_by}, or build afresh"
        )
    if by_id and made_by is None and not any(r.item_id for r in old.rows):
        raise PipelineError(
            f"{store} was built without --id-column, so its photos have no ids to match: update without "
            "--id-column (photos are then matched by content), or build afresh with "
            f"--id-column {cfg.dataset.id_column}"
        )
    # Comparing changed files takes seconds, mostly outside the GIL (reading, hashing): where the
    # dataset has more rows than the store has photos, the model loads beside it (its sessions are
    # made outside the GIL too), as photos are likely to be embedded. Not on Ray (its workers load
    # it), nor when the caller has one.
    grown = rows_now is None or rows_now > len(groups)
    loading = (_ModelLoad(cfg) if embedder is None and cfg.engine != "ray" and grown and not known_as_is(cfg.dataset)
               else None)
    with summary.stage("compare with the dataset"):
        plan = plan_update(groups, dataset_hashes(cfg.dataset), by_id, cfg.dataset.name)
    if loading is not None:
        embedder = loading.result(summary, needed=bool(plan.embed))
    log.info("update: %s", plan.describe())
    for name in ("added", "changed", "removed", "unchanged"):
        summary.count(name, getattr(plan, name))
    summary.notes.append(f"update: {plan.describe()}")
    signed = sign_again(cfg, old, [line for old_row, _ in plan.kept for line in groups[old_row]], summary)
    same = (not signed and not plan.embed and len(plan.kept) == len(groups)
            and all(old == new for old, new in plan.kept)
            and all(plan.sources.get(new, groups[old][0].source) == groups[old][0].source for old, new in plan.kept)
            and not plan.ids
            and all(renamed(r) == r.file for r in old.rows))  # a store named by row is renamed once
    if same and old.sidecar.source == gallery_source(cfg):
        shutil.rmtree(stage, ignore_errors=True)  # nothing changed: the store stays as it is, not rewritten
        shutil.rmtree(cfg.images_dir / STAGING, ignore_errors=True)
        if cfg.images_url:
            UrlImages(cfg.images_url).drop_staged(keep=set())
        return Gallery(old.embeddings, old.rows, embedder, kept_rows=dict(plan.kept))
    new = _embed_new(cfg, summary, embedder, plan, old)
    with summary.stage("write the new store"):
        emb, rows, take = _write_next(cfg, old, groups, plan, new)
    shutil.rmtree(stage / "index", ignore_errors=True)  # an abandoned update's: never switched in with this store
    if (cfg.store_dir / INDEX_META).is_file():  # --index none too: the index keeps its kind and stays current
        with summary.stage("update index"):
            said = update_index(
                cfg.store_dir, np.asarray(take, np.int64), emb[len(take):], emb, store_sha256(stage / NEXT_DIR),
                kind=cfg.index, old_store_sha256=old.sidecar.embeddings_sha256, out_dir=stage / "index",
                threads=cfg.embedder.threads,
            )
        summary.notes.append(f"index: {said}")
    (stage / SWITCH).write_text("the new store in next/ (and its index in index/) is complete: move them into place\n"
                                f"update: {plan.describe()}\n")
    with summary.stage("switch"):
        switch(cfg)
    return Gallery(emb, rows, new.embedder if new is not None else embedder,
                   carried=(np.asarray(take, np.int64), old.sidecar.embeddings_sha256), kept_rows=dict(plan.kept))


class _ModelLoad:
    """The run's embedder, loaded in a daemon thread from the moment it starts (a run that stops
    before it needs it never waits for it)."""

    def __init__(self, cfg: RunConfig) -> None:
        self._done = threading.Event()
        self._got: tuple[Embedder, float] | BaseException | None = None
        threading.Thread(target=self._load, args=(cfg.embedder,), name="load-model", daemon=True).start()

    def _load(self, spec: EmbedderSpec) -> None:
        t = time.perf_counter()
        try:
            self._got = (make_embedder(spec), time.perf_counter() - t)
        except BaseException as e:  # handed to whoever asks for the model
            self._got = e
        finally:
            self._done.set()

    def result(self, summary: RunSummary, needed: bool) -> Embedder | None:
        """The embedder once loaded (its loading time is the stage "load model", the time waited for
        it after the compare "wait for the model"); a load that failed raises when the model is
        needed, else leaves it to be loaded by whoever needs it."""
        t = time.perf_counter()
        self._done.wait()
        if time.perf_counter() - t >= 0.05:
            summary.timed("wait for the model", time.perf_counter() - t)
        if isinstance(self._got, BaseException):
            if needed:
                raise self._got
            log.debug("the model did not load beside the compare, and nothing is to be embedded: %s", self._got)
            return None
        assert self._got is not None
        embedder, seconds = self._got
        summary.timed("load model", seconds, "load model (beside the compare)")
        return embedder


def _old_store(cfg: RunConfig) -> GalleryCache:
    """The store to update, checked: made by the embedder asked for, from the same dataset, split,
    column and segmentation (the row limit may differ)."""
    fields = frozenset({"kind", "dataset", "config", "split", "image_column", "seg_model", "seg_backend", "seg_conf",
                        "seg_imgsz", "keep_unsegmented", "max_persons", "seg_weights"})
    images_at = None
    if cfg.images_url:  # the images stay at the URL: listed, not fetched
        from .remote import images_there

        images_at = (cfg.images_url, images_there(cfg.images_url, cfg.output_dir, cfg.images_dir))
    _check_config(cfg)
    try:
        old = load_cache(cfg.store_dir, cfg.images_dir, identity=None, source=gallery_source(cfg),
                         source_fields=fields, images_at=images_at)
    except CacheMismatchError as e:
        other = other_gallery(cfg)
        if e.missing and other is not None:  # the other gallery's there: the flag forgotten
            how = "without --use-segmentation" if cfg.segmented else "with --use-segmentation"
            raise UsageError(f"{e}\n{cfg.output_dir} holds {other[1]} in {other[0]}: to update that one, run the "
                             f"same command {how}.") from None
        if e.missing:
            raise PipelineError(f"{e}\nThere is no store to update in {cfg.output_dir.resolve()}: give --output-dir "
                                "the folder the gallery was built in, or build it first, without --update.") from None
        if not e.differing and e.made_by is None:  # damaged, not made otherwise: no flag can reuse it
            flags = store_dataset_flags(cfg)
            raise PipelineError(f"{e}\nA damaged store cannot be updated: build it afresh, running the same command "
                                "without --update" + (f" and with the dataset flags that built it: {flags}" if flags
                                                      else "") + ".") from None
        if set(e.differing) == {"seg_weights"}:  # the weights alone: no flag gives the old ones back
            raise PipelineError(
                f"{e}\nThe segmenter's weights file {cfg.segment.model} changed since the store was built: its "
                "crops were cut by the old weights, the new photos' would be cut by these. Build afresh without "
                "--update, or put the old weights back.") from None
        typed = [FLAG_OF[name] for name in e.differing if name in FLAG_OF and name in cfg.explicit]
        drop = (f"drop {' and '.join(typed)} (an update takes the store's own where not given)" if typed
                else "use the flags that built it")
        raise UsageError(f"{e}\nAn update keeps the photos the store has, made as they were: {drop}, or build "
                         "afresh without --update.") from None
    return old


def _check_config(cfg: RunConfig) -> None:
    """The store's dataset configuration against the one asked for, before the store is read: none
    given reads the default configuration, whose rows an update would put into a store of another."""
    try:
        made = Sidecar.read(cfg.store_dir / SIDECAR_FILE).source.config
    except (CacheMismatchError, OSError):
        return  # no store, or a damaged one: loading it says so
    if made != cfg.dataset.config:
        raise PipelineError(
            f"{cfg.store_dir} was built from {cfg.dataset.name}'s configuration {made!r}: update with --config {made}"
            if made else f"{cfg.store_dir} was built from {cfg.dataset.name}'s default configuration: update without "
            "--config, or build afresh")


def _check_embedder(cfg: RunConfig, old: GalleryCache, made: VectorIdentity | None = None) -> None:
    """The embedder asked for (before it loads: what the flags say), or the one that embeds the new
    photos (`made`: every field it records, the precision and the code that made its pixels too,
    which `auto` flags leave open until it loads) is the one that made the store's vectors. Fields
    a store made by an earlier version does not record are not compared."""
    if made is None:
        problems = differences(requested_identity(cfg.embedder), old.sidecar.identity)
    else:
        problems = differences(made, old.sidecar.identity, only=frozenset(old.sidecar.identity.compared_json()))
    if problems:
        pixels = old.sidecar.identity.pixels
        decode = DECODE_OF_PIXELS.get(pixels or "") if any(p.startswith("pixels:") for p in problems) else None
        hint = f" Its pixels came from {pixels}: add --decode {decode} to update it as it was made." if decode else ""
        if decode == "device" and cfg.engine == "ray":
            hint = (f" Its pixels came from {pixels}, and Ray's workers decode on the CPU: update it without "
                    "--engine ray.")
        if any(p.startswith("runtime:") for p in problems):
            runtime = old.sidecar.identity.runtime or ONNXRUNTIME
            hint += f" Its vectors were made on {runtime}: add --onnx-runtime {runtime} to update it with them."
        named = [p.split(":", 1)[0].split(".", 1)[0] for p in problems]
        flags = flags_that_made([n for n in named if n not in ("pixels", "runtime")], old.sidecar.identity,
                                old.sidecar.source, cfg.embedder.onnx)
        if flags:
            hint += f" It was made with {' '.join(flags)}: ask for that"
            typed = {"model", "onnx", "backend"} & cfg.explicit
            if typed and {"model", "backend", "onnx_sha256"} & set(named):  # left out, the store's own is used
                hint += (f", or leave out {', '.join(f'--{f}' for f in sorted(typed))} (an update then embeds "
                         "with the store's own)")
            hint += "."
        built_from = store_dataset_flags(cfg)  # an update took them from the store: a build without it needs them
        raise PipelineError(
            f"{cfg.store_dir} was embedded differently from what is asked:\n  " + "\n  ".join(problems)
            + f"\nAn update reuses the vectors the store has, so it needs the embedder that made them.{hint} A new "
            "embedder (model, backend, precision, preprocessing) means building afresh: run without --update"
            + (f", with the dataset flags that built it: {built_from}" if built_from else "") + "."
        )


SIGNED_LOG = "signed-{version}.jsonl"  # in the staging folder: what sign_again signed, a file a line


def _read_signed(path: Path, key: str) -> dict[str, tuple[str, str]]:
    """What an earlier, interrupted update signed with these decode settings (`key`): file ->
    (pixel hash, look). A log of other settings is not used; a line cut short by a kill is skipped."""
    got: dict[str, tuple[str, str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline() or "null")
            if not isinstance(first, dict) or first.get("key") != key:
                return {}
            for text in f:
                try:
                    name, pixel, look = json.loads(text)
                except (ValueError, TypeError):
                    continue
                if isinstance(name, str) and isinstance(pixel, str) and isinstance(look, str):
                    got[name] = (pixel, look)
    except (OSError, ValueError):
        return {}
    return got


def sign_again(cfg: RunConfig, old: GalleryCache, kept: Sequence[ManifestRow], summary: RunSummary) -> int:
    """Kept photos whose duplicate signals are not of this SIGNATURE_VERSION (a store made by an
    earlier signature, or before duplicates were found) signed again from their files: decoded as
    a build decodes them (a standard gallery's JPEG at the model's reduced DCT scale, its file being
    the dataset's bytes; a person crop whole), no inference, each file once however many lines
    share it. Their lines get the pixel hash and look a fresh build would give them. Each file
    signed is logged in the staging folder (SIGNED_LOG, buffered), so an update interrupted after
    signs again only what the log does not hold (files are named by their content: a name logged
    is the same bytes; a hard kill may lose the log's last few kilobytes). A file that cannot be
    read or decoded leaves its lines with the signals they had (left out of duplicate finding),
    said; so does a store that records no preprocessing (its photos' decode cannot be a build's).
    A store at a URL is read with more threads than cores: each file is a request. Returns how many
    lines were signed again."""
    stale = unsigned_lines(kept)
    if not stale:
        return 0
    made, segmented = old.sidecar.identity.preprocess, old.sidecar.source.kind == "segment"
    if not made and not segmented:
        n = len(stale)
        summary.notes.append(
            f"duplicates: {count_of(n, 'kept item')} without signals of this version "
            f"{'is' if n == 1 else 'are'} left out of duplicate finding: the store records no preprocessing, so "
            f"{'it' if n == 1 else 'they'} cannot be decoded as a build decodes them; build afresh to include "
            f"{'it' if n == 1 else 'them'}")
        return 0
    min_side = None if segmented else PreprocessConfig.from_json(json.dumps(made)).decode_min_side
    read = image_reader(cfg.images_url or cfg.images_dir)
    log_path = cfg.store_dir / STAGING / SIGNED_LOG.format(version=SIGNATURE_VERSION)
    key = f"{'segment' if segmented else min_side}"
    signals = _read_signed(log_path, key)
    todo = {line.file for line in stale} - set(signals)
    source_of = {line.file: line.source or line.file for line in reversed(stale)}  # a file's first line's
    files = sorted(todo)

    def sign(name: str) -> tuple[str, str] | str:
        try:
            return file_signals(name, read(name), min_side)
        except Exception as e:  # noqa: BLE001 - any reader's or decoder's error is this photo's, recorded
            return f"{source_of[name]} ({name}): {first_line(e)}"

    failed: list[str] = []
    if files:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        per_file = Counter(line.file for line in stale)
        workers = max(1, cfg.embedder.threads or available_cores()) * (8 if cfg.images_url else 1)
        with (summary.stage("sign kept photos again"), ThreadPoolExecutor(workers) as pool,
              open(log_path, "w", encoding="utf-8") as logged,
              tqdm(total=len(stale), initial=len(stale) - sum(1 for line in stale if line.file in todo),
                   desc=f"duplicate signals ({SIGNATURE_VERSION})", unit="photo", disable=not cfg.progress) as bar):
            # written again whole, then added to: a line a kill cut short is not carried on
            logged.writelines(json.dumps(x) + "\n" for x in [{"key": key}, *([n, *g] for n, g in signals.items())])
            for name, got in signed_in_chunks(pool, sign, files):
                if isinstance(got, str):
                    failed.append(got)
                else:
                    signals[name] = got
                    logged.write(json.dumps([name, *got]) + "\n")  # flushed as the buffer fills, and at the end
                bar.update(per_file[name])
    signed = 0
    for line in stale:
        if line.file in signals:
            line.pixel_hash, line.look = signals[line.file]
            signed += 1
    if signed:
        summary.count("signed again", signed)
        summary.notes.append(
            f"duplicates: {count_of(signed, 'kept item')} signed again ({SIGNATURE_VERSION}: signals of an earlier "
            "signature, or none), from the files; nothing embedded again")
    if failed:
        lines = len(stale) - signed
        summary.notes.append(f"duplicates: {count_of(lines, 'kept item')} could not be signed again and "
                             f"{'is' if lines == 1 else 'are'} left out of duplicate finding: {'; '.join(failed[:3])}"
                             + (" ..." if len(failed) > 3 else ""))
    return signed


def _embed_new(cfg: RunConfig, summary: RunSummary, embedder: Embedder | None, plan: Plan,
               old: GalleryCache) -> Gallery | None:
    """The new and changed photos, built by the gallery's own build into the staging folders
    (resumable: its shards stay there until the switch), by an embedder that makes vectors as the
    store's were made: checked before they are embedded, and after, from the staging store."""
    if not plan.embed:
        return None
    part = BuildPart(cfg.store_dir / STAGING / NEW_PART_DIR, cfg.images_dir / STAGING, frozenset(plan.embed))
    if (part.store_dir / PARTIAL_DIR / RUN_FILE).is_file() and not _same_part(cfg, part):
        shutil.rmtree(part.store_dir)  # an earlier update's staging for other rows or flags: ours to discard
        said = ("the interrupted update's staged photos were of other rows or flags (the dataset changed since it "
                "stopped): set aside, and the new photos embedded afresh")
        log.info("%s", said)
        summary.notes.append(said)
    finished = _finished_part(cfg, part)
    if finished is not None:  # an update stopped after it had embedded them: nothing to embed again
        _check_embedder(cfg, old, finished.sidecar.identity)
        summary.notes.append(f"the {len(finished.embeddings):,} new and changed photo(s) embedded by the update "
                             "that stopped are taken as it left them (nothing embedded again)")
        return Gallery(finished.embeddings, finished.rows, embedder)
    if embedder is None:  # on Ray too: the driver's model, which the store's identity is taken from
        with summary.stage("load model"):
            embedder = make_embedder(cfg.embedder)
    _check_embedder(cfg, old, made_identity(cfg, embedder))
    new = build(cfg, summary, embedder, part=part)
    _check_embedder(cfg, old, Sidecar.read(part.store_dir / SIDECAR_FILE).identity)
    return new


def _finished_part(cfg: RunConfig, part: BuildPart) -> GalleryCache | None:
    """The staging store of the new photos as an update that stopped after building it left it
    (whole, for these rows, sizes and dataset files: part.json), loaded; None otherwise."""
    record = part.store_dir / PART_FILE
    if (part.store_dir / PARTIAL_DIR).is_dir() or not (part.store_dir / SIDECAR_FILE).is_file() or not record.is_file():
        return None
    try:
        if not _part_matches(cfg, part, json.loads(record.read_text())):
            return None
        return load_cache(part.store_dir, part.images_dir, identity=None)
    except (OSError, ValueError, CacheMismatchError):  # damaged or partly there: built again
        return None


def _same_part(cfg: RunConfig, part: BuildPart) -> bool:
    """The staging build on disk was started for these rows with these batch and shard sizes, on the
    dataset's files as they are now (its identity and source were checked against the store
    already)."""
    try:
        run = json.loads((part.store_dir / PARTIAL_DIR / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return _part_matches(cfg, part, run)


def _part_matches(cfg: RunConfig, part: BuildPart, run: dict) -> bool:
    asked = {"rows": rows_key(part.rows), "batch_size": cfg.batch_size, "shard_rows": cfg.shard_rows}
    stamp = dataset_stamp(cfg.dataset)
    if "dataset_files" in run and stamp is not None:  # staged by a version that stamped the dataset, and stamped now
        asked["dataset_files"] = stamp
    return all(run.get(k) == v for k, v in asked.items())


def _write_next(
    cfg: RunConfig, old: GalleryCache, groups: dict[int, list[ManifestRow]], plan: Plan, new: Gallery | None
) -> tuple[np.ndarray, list[ManifestRow], list[int]]:
    """The merged store in <store>/.update/next; kept photos whose file a store made before content
    names named by row get their content name in <images>/.update (hard links where the file system
    allows)."""
    next_dir = cfg.store_dir / STAGING / NEXT_DIR
    # An abandoned update's files (no switch was decided: the marker comes after this) are never this one's: a
    # thumbnails.npy it left there must not be moved over the one this update keeps.
    shutil.rmtree(next_dir, ignore_errors=True)
    next_dir.mkdir(parents=True, exist_ok=True)
    staged_images = cfg.images_dir / STAGING
    staged_images.mkdir(parents=True, exist_ok=True)
    built = {r.file for r in new.rows if r.file} if new is not None else set()
    for p in staged_images.iterdir():  # an abandoned update's files: never the new store's
        if p.is_file() and p.name not in built:
            p.unlink()
    rows: list[ManifestRow] = []
    take: list[int] = []  # old embedding rows kept, in order
    moves: list[tuple[str, str]] = []  # files of a store named by row, renamed once to their content names
    for old_row, new_row in plan.kept:
        for line in groups[old_row]:
            kept = replace(line, index=len(rows), source_row=new_row, file=renamed(line),
                           item_id=plan.ids.get(new_row, line.item_id),
                           source=plan.sources.get(new_row) or moved_source(line.source, cfg.dataset.name, old_row,
                                                                              new_row))
            if line.embedding_row >= 0:
                kept.embedding_row = len(take)
                take.append(line.embedding_row)
            if kept.file and kept.file != line.file:
                moves.append((line.file, kept.file))
            rows.append(kept)
    if cfg.images_url:  # the images are at the URL: copied there, beside the old store's
        at_url = UrlImages(cfg.images_url)
        at_url.drop_staged(keep=built | {new_name for _, new_name in moves})
        for old_name, new_name in moves:
            at_url.stage_copy(old_name, new_name)
    else:
        for old_name, new_name in moves:
            link_or_copy(cfg.images_dir / old_name, staged_images / new_name)
    for line in new.rows if new is not None else []:
        rows.append(replace(line, index=len(rows), embedding_row=line.embedding_row + len(take)
                            if line.embedding_row >= 0 else -1))
    dim = old.embeddings.shape[1]
    parts = [old.embeddings[np.asarray(take, np.int64)] if take else np.zeros((0, dim), np.float32)]
    if new is not None:
        parts.append(new.embeddings)
    emb = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    kept_parts = kept_thumbnails(thumbnail_parts(old.sidecar), take, len(emb))
    at = sum(part.count for part in kept_parts)
    thumbs = _thumbnails(old, take[at:], new, cfg.store_dir / STAGING / NEW_PART_DIR)
    write_store(next_dir, emb, rows, thumbs, old.sidecar.identity, gallery_source(cfg), old.sidecar.thumbnail_size,
                kept_thumbnails=kept_parts, dataset_files=dataset_stamp(cfg.dataset),
                onnx_file=_onnx_file(cfg, old.sidecar))
    return emb, rows, take


def _onnx_file(cfg: RunConfig, made: Sidecar) -> Path | None:
    """The ONNX file the updated store records: the one this update embedded with (checked to be the
    store's by its sha256), else the one recorded before (an update that embedded nothing)."""
    if made.identity.backend != "onnx":
        return None
    used = Path(cfg.embedder.onnx)
    if used.is_file() and sha256_file_once(used) == made.identity.onnx_sha256:
        return used
    return Path(made.onnx_file) if made.onnx_file else None


def kept_thumbnails(parts: list[ThumbnailPart], take: Sequence[int], total: int) -> list[ThumbnailPart]:
    """The old store's thumbnails files the new store keeps as they are: thumbnails.npy and the
    segments after it, while every row of each is kept, in place (the new store lists its kept
    photos in the old store's order, so after photos are only added, all of them). The rows after
    them are written again, with the new photos', as one new segment. A file with a removed photo is
    never kept: nothing of a removed photo stays.

    Compaction: past MAX_THUMBNAIL_SEGMENTS segments, only thumbnails.npy is kept (the segments
    joined into one); once the segments would hold more rows than it, nothing is (one new
    thumbnails.npy). Each thumbnail is so written again O(1) times on average, whatever the updates.
    `total`: the new store's rows."""
    moved = np.flatnonzero(np.asarray(take, np.int64) != np.arange(len(take)))
    in_place = int(moved[0]) if len(moved) else len(take)
    kept: list[ThumbnailPart] = []
    at = 0
    for part in parts:
        if at + part.count > in_place or (not kept and part.count == 0):
            break
        kept.append(part)
        at += part.count
    if len(kept) > MAX_THUMBNAIL_SEGMENTS:  # thumbnails.npy and more segments than allowed (the new one to come)
        kept = kept[:1]
    if kept and total - kept[0].count > kept[0].count:  # the segments would outweigh the base
        kept = []
    return kept


def _thumbnails(old: GalleryCache, take: Sequence[int], new: Gallery | None, new_dir: Path) -> Iterator[np.ndarray]:
    """The thumbnails of old rows `take`, then the new photos' (built in new_dir), a chunk at a time."""
    yield from _thumbnail_chunks(old.thumbnails(), take)
    if new is not None and len(new.embeddings):
        yield from _thumbnail_chunks(ThumbnailReader.of(new_dir), range(len(new.embeddings)))


def _thumbnail_chunks(reader: ThumbnailReader, rows: Sequence[int]) -> Iterator[np.ndarray]:
    """uint8 (n, T, T, 3) chunks of the thumbnails at `rows` of a store: each run of consecutive rows
    (most of a kept store) read at once, at most THUMB_CHUNK rows, into one buffer reused for every
    chunk (each is valid until the next is asked for: the writer consumes it first)."""
    try:
        buf = np.empty((min(THUMB_CHUNK, max(1, len(rows))), *reader.shape[1:]), np.uint8)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and j - i < THUMB_CHUNK and rows[j] == rows[j - 1] + 1:
                j += 1
            yield reader.read_into(rows[i], buf[: j - i])
            i = j
    finally:
        reader.close()


def move(src: Path, dst: Path) -> None:
    """One step of the switch (a rename within the folder's file system)."""
    os.replace(src, dst)


def switch(cfg: RunConfig) -> None:
    """Move the staged store into place, the sidecar last; then remove the files no line names and
    the staging folders. Repeatable: a switch killed midway is finished by running it again."""
    store, images = cfg.store_dir, cfg.images_dir
    stage, staged_images = store / STAGING, images / STAGING
    next_dir = stage / NEXT_DIR
    at_url = UrlImages(cfg.images_url) if cfg.images_url else None
    if at_url is not None and cfg.output_url:
        # The URL's store is refused from here until the new one is sent (its sidecar last).
        sidecar = (store / SIDECAR_FILE).relative_to(cfg.output_dir).as_posix()
        at_url.remove_file(f"{cfg.output_url.rstrip('/')}/{sidecar}")
    if (next_dir / SIDECAR_FILE).is_file():
        unlink_quietly(store / SIDECAR_FILE)  # from here until the sidecar moves, readers are refused
        # The new store's manifest: still staged, or already moved by a switch that was killed after it
        manifest = next_dir / MANIFEST_FILE if (next_dir / MANIFEST_FILE).is_file() else store / MANIFEST_FILE
        named = {r.file for r in read_manifest(manifest) if r.file}
        for p in sorted(staged_images.iterdir()) if staged_images.is_dir() else []:
            if p.is_file() and p.name in named:  # an earlier, abandoned update's files are not the new store's
                move(p, images / p.name)
    switch_index(stage / "index", store)  # the index with its store, before the sidecar
    # The new store's thumbnails files (from its sidecar: still staged, or already moved by a switch that was killed)
    new_sidecar = next_dir / SIDECAR_FILE if (next_dir / SIDECAR_FILE).is_file() else store / SIDECAR_FILE
    parts = thumbnail_parts(Sidecar.read(new_sidecar)) if new_sidecar.is_file() else None
    staged = [part.file for part in parts or [] if (next_dir / part.file).is_file()]
    for name in (*staged, EMBEDDINGS_FILE, MANIFEST_FILE, SIDECAR_FILE):
        if (next_dir / name).is_file():
            move(next_dir / name, store / name)
    # The thumbnails files written were hashed then: their stamps follow them (checked against the files when
    # loaded); the segments the new store no longer lists go (a reader of the old store has them open).
    carry_thumbnails_stamp(next_dir, store, staged)
    if parts is not None:
        remove_unlisted_segments(store, parts)
    keep = {r.file for r in read_manifest(store / MANIFEST_FILE) if r.file}  # the store in place now
    pattern = owned_files(cfg)
    for p in images.iterdir() if images.is_dir() else []:
        if p.is_file() and pattern.fullmatch(p.name) and p.name not in keep:
            p.unlink()
    if at_url is not None:
        at_url.switch(keep, pattern, images)
    shutil.rmtree(staged_images, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


class UrlImages:
    """The images of a URL --output-dir, which stay at the URL (remote.py): an update copies the
    kept photos whose name changes into the URL's staging folder, beside the old store's files, and
    its switch moves them into place there, after the URL's sidecar is removed (the new store,
    sent after the run, brings its sidecar last). Every step may run again."""

    def __init__(self, url: str) -> None:
        from .remote import filesystem

        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.staged = f"{self.root}/{STAGING}"

    def staged_names(self) -> set[str]:
        self.fs.invalidate_cache(self.staged)
        try:
            return {p.rsplit("/", 1)[1] for p in self.fs.find(self.staged)}
        except FileNotFoundError:
            return set()

    def drop_staged(self, keep: set[str]) -> None:
        """Remove an abandoned update's staged files (those not in keep)."""
        stale = [f"{self.staged}/{name}" for name in self.staged_names() if name not in keep]
        if stale:
            self.fs.rm(stale)

    def stage_copy(self, old_name: str, new_name: str) -> None:
        self.fs.copy(f"{self.root}/{old_name}", f"{self.staged}/{new_name}")

    def remove_file(self, path: str) -> None:
        try:
            self.fs.rm_file(path.split("://", 1)[-1])
        except FileNotFoundError:
            pass

    def switch(self, keep: set[str], pattern: re.Pattern, local_images: Path) -> None:
        """Staged files the new store names into place; files it does not name removed; a local
        copy of a renamed file (only a store named by row is renamed, once: the working copy's
        file of that row name may be another photo's) removed, unless it is a new photo's, still
        to be sent."""
        from .remote import remove_stale_at_url

        moved = self.staged_names() & keep
        for name in sorted(moved):
            self.fs.mv(f"{self.staged}/{name}", f"{self.root}/{name}")
        remove_stale_at_url(self.url, pattern, keep)
        try:
            self.fs.rm(self.staged, recursive=True)
        except FileNotFoundError:
            pass
        for name in moved:
            unlink_quietly(local_images / name)
