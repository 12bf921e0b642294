"""The public Python API: a built gallery store, opened for search.

    from pipeline import Catalog
    cat = Catalog.open("runs/today/embeddings", model="./fashion-clip")
    cat.search_text("red floral midi dress", k=5)      # [Hit(rank=1, file='img_3f2a9c1e0b4d5a6f.jpg', ...), ...]
    cat.search_image("look.jpg", k=5)                  # one QueryResult per query picture
    cat.neighbours("img_3f2a9c1e0b4d5a6f.jpg", k=5)               # an item's look-alikes (never itself)

The same `Searcher` answers the CLI's queries, --serve and video, so the hits are the ones they give.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from .backends import ONNXRUNTIME, is_onnx_file, model_by_name
from .duplicates import stored_groups
from .embedders import Embedder, EmbedderSpec, make_embedder, model_reference
from .errors import CacheMismatchError, PipelineError, UsageError, first_line
from .fileio import being_written, printable_name, read_regular_file, sha256_file_once
from .identity import VectorIdentity, differences
from .images import ImageDecodeError, decode_image, to_rgb
from .index import INDEX_META
from .metadata import METADATA_FILE, load_metadata
from .persons import Segmenter
from .preprocess import CPU_PIXELS, PreprocessConfig, preprocess_batch
from .remedy import find_file_with_sha256
from .searcher import Hit, QueryCrop, Searcher, combine, query_crops
from .store import (
    SIDECAR_FILE,
    SWITCH_FILE,
    SWITCH_STOPPED,
    UPDATE_DIR,
    GalleryCache,
    ManifestRow,
    load_cache,
)
from .yolo import SegmentSpec, make_segmenter, recorded_segment

log = logging.getLogger(__name__)

Whole = int | np.integer  # a row or a count: numpy's integers too (an argsort's rows in a notebook)
UNIT_TOLERANCE = 1e-3  # how far from 1 a query vector's length may be (float16 vectors normalized, say)


@dataclass(frozen=True)
class QueryResult:
    """The hits of one query picture (the whole picture, or one person in it: label `name#p0`), and
    the picture searched (a person's white-background crop, or the whole picture, as decoded);
    person: whether it is a person's crop."""

    label: str
    hits: list[Hit]
    picture: Image.Image | None = None
    person: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON has it (the picture left out): label, person and each hit's to_dict."""
        return {"label": self.label, "person": self.person, "hits": [h.to_dict() for h in self.hits]}


class _Items(Sequence[ManifestRow]):
    """A catalog's items as it hands them out: a read-only sequence over the searcher's rows, each
    row given as a copy (a ManifestRow is a plain dataclass: a caller's change to its own copy
    changes no hit). Made in O(1); a line is copied when it is read."""

    def __init__(self, rows: list[ManifestRow]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, i: slice) -> list[ManifestRow]: ...

    def __getitem__(self, i: int | slice) -> ManifestRow | list[ManifestRow]:
        if isinstance(i, slice):
            return [replace(r) for r in self._rows[i]]
        return replace(self._rows[i])


class Thumbnails:
    """A store's thumbnails: its open files (one reader, read under a lock, from any thread) and how
    many rows it holds. Outlives its Catalog where kept (--serve keeps an earlier store's for the
    results it gave), and reads the files it opened whatever replaced them on disk since."""

    def __init__(self, reader: Any, count: int) -> None:
        self._reader, self.count = reader, count
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return self.count

    def of(self, row: int) -> np.ndarray:
        """uint8 (T, T, 3) RGB thumbnail of row `row` (checked by the caller)."""
        with self._lock:
            if self._closed:
                raise PipelineError("the catalog was closed, and its thumbnails with it: open it again "
                                    "(Catalog.open) to show thumbnails")
            return self._reader[row].copy()

    def close(self) -> None:
        with self._lock:
            self._reader.close()
            self._closed = True


def store_folder(folder: str | Path) -> Path:
    """The store a folder names: the folder itself (embeddings/, embeddings_segment/) or, for a run's
    output folder, its embeddings/ (its embeddings_segment/ where it has no embeddings/ at all: a
    run of person crops alone; an embeddings/ between its files is not passed over for it)."""
    from .remote import is_url

    if is_url(folder):  # Path() made s3://b/run into s3:/b/run, "no gallery store: build one first"
        raise UsageError(f"{folder}: Catalog.open reads a store on this machine, not at a URL: search it there with "
                         f"python main.py --output-dir {folder} --query-text ... (or --serve), which fetch the store "
                         "into a working copy; or open that working copy's folder")
    folder = Path(folder)
    if (folder / SIDECAR_FILE).is_file():
        return folder
    if (folder / "embeddings" / SIDECAR_FILE).is_file():
        return folder / "embeddings"
    if not (folder / "embeddings").exists() and (folder / "embeddings_segment" / SIDECAR_FILE).is_file():
        return folder / "embeddings_segment"
    for output in (folder, folder.parent):  # a run's folder, or the store folder in it
        if said := being_written(output):  # a store between its files (an update's switch): not one to build
            raise PipelineError(f"{folder} holds no complete gallery store now{said}")
    for store in _stores_in(folder):  # an update stopped in its switch: finished in a second, not built again
        if (store / UPDATE_DIR / SWITCH_FILE).is_file():
            raise PipelineError(SWITCH_STOPPED.format(store=store) + ", then open it again")
    raise PipelineError(
        f"{folder} holds no gallery store ({SIDECAR_FILE} not found there, in {folder / 'embeddings'} or in "
        f"{folder / 'embeddings_segment'}); build one first: python main.py --output-dir DIR"
    )


def _stores_in(folder: Path) -> list[Path]:
    """The store folders `folder` may name: itself, or a run's embeddings/ and embeddings_segment/."""
    return [folder, folder / "embeddings", folder / "embeddings_segment"]


def store_state(root: Path) -> tuple[int, ...] | None:
    """What changes when a store is switched in over the folder `root`, or its metadata alone
    changes: its sidecar's inode, time and size (written last, by replacing it), its metadata
    table's (written after it, or alone when only metadata changed) and its index's (made again
    alone by a --use-embeddings --index run); None while there is no sidecar."""
    state: list[int] = []
    for name in (SIDECAR_FILE, METADATA_FILE, INDEX_META):
        try:
            st = (root / name).stat()
        except OSError:
            if name == SIDECAR_FILE:
                return None
            state += [0, 0, 0]
        else:
            state += [st.st_ino, st.st_mtime_ns, st.st_size]
    return tuple(state)


def images_folder(store_dir: Path, cache_kind: str) -> Path:
    """The images a store's manifest names sit beside it: images/ or images_segment/."""
    return store_dir.parent / ("images_segment" if cache_kind == "segment" else "images")


def _check_open_arguments(device: str, threads: int, index: str, model: str | None = None,
                          onnx: str | None = None) -> None:
    """Catalog.open's arguments that would otherwise be taken silently (an index kind the open does
    not choose) or refused only by the first query (threads=-1, an ONNX file as the model, a file or
    folder given that is not there: a service would start and fail its first request)."""
    from .backends import DEVICES

    if onnx is not None and not Path(onnx).is_file():
        raise UsageError(f"onnx={str(onnx)!r}: no such file (the ONNX file the store was made with; opened without "
                         "onnx=, the store's own file is looked for by its sha256)")
    path_like = isinstance(model, Path) or str(model).startswith(("/", "."))  # not a hub id, not a short name
    if model is not None and path_like and not Path(model).exists():
        raise UsageError(f"model={str(model)!r}: no such folder (a model is a folder, a hub id or a short name)")

    if is_onnx_file(model):
        raise UsageError(f"model={str(model)!r} is an exported ONNX file: give it as onnx={str(model)!r} (model= names "
                         "a model: a folder, a hub id or a short name)")

    if device not in DEVICES:
        raise UsageError(f"device={device!r}: choose from {', '.join(DEVICES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(f"threads={threads!r}: a whole number, 0 for every core")
    if index not in ("auto", "none"):
        raise UsageError(f"index={index!r}: 'auto' searches with the index beside the store (of the kind its gallery "
                         "run built: python main.py --index KIND), 'none' exactly")


R = TypeVar("R")
P = ParamSpec("P")


# What a refusal says in the command line's words, and in the API's (Catalog.open's catalogs speak
# Python: an API user never typed --filter). A message that begins with a flag, or names one as a remedy.
_PYTHON_WORDS = (
    (re.compile(r"^--filter\b"), "filter"),
    (re.compile(r"^--group-by\b"), "group_by"),
    (re.compile(r"^--device cuda\b"), "device='cuda'"),
    (re.compile(r"lower --text-weight\b"), "lower text_weight"),
    (re.compile(r"pass a local folder with --model DIR\."), "pass a local folder as model=."),
    (re.compile(r"\. Pass a local (\.pt, \.onnx or (model )?\.yaml file)\."), r". Pass seg_model= a local \1."),
)


def _said_in_python(e: PipelineError) -> PipelineError | None:
    """The refusal with the API's argument names for the command line's flags (its class and
    attributes, a CacheMismatchError's, kept); None when it names no flag."""
    said = str(e)
    for flag, word in _PYTHON_WORDS:
        said = flag.sub(word, said)
    if said == str(e):
        return None
    again = copy.copy(e)
    again.args = (said, *e.args[1:])
    return again


def _in_python(method: Callable[Concatenate[Catalog, P], R]) -> Callable[Concatenate[Catalog, P], R]:
    """A public method of a catalog opened by Catalog.open: a refusal that names a flag names the
    argument instead (`filter: expected a value...`, not `--filter: ...`), the same error class."""

    @functools.wraps(method)
    def said_in_python(self: Catalog, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except PipelineError as e:
            if not self.speaks_python:
                raise
            again = _said_in_python(e)
            if again is None:
                raise
            raise again from e.__cause__

    return said_in_python


class Catalog:
    """A verified gallery store with its searcher, opened with `Catalog.open(folder)`; the embedder
    (for text and picture queries) and the segmenter load on first use. Queries may come from
    several threads (the --serve app): each model loads once, under its own lock, and a text query
    never waits for the segmenter."""

    def __init__(
        self,
        cache: GalleryCache,
        searcher: Searcher,
        embedder: Callable[[], Embedder],
        segmenter: Callable[[], Segmenter] | None = None,
        opened: tuple[int, ...] | None = None,
    ) -> None:
        self.cache, self.searcher = cache, searcher
        self._embedder_slot: _FirstUse[Embedder] = _FirstUse(embedder)  # its lock taken only until it is loaded
        # its lock taken to load it and for each call: Ultralytics models are not thread-safe
        self._segmenter_slot: _FirstUse[Segmenter] = _FirstUse(segmenter)
        self.thumbnails = Thumbnails(cache.thumbnails(), len(searcher.rows))
        # the store's files as they were before it was read (is_current() compares the store on disk with it)
        self.opened_state = opened if opened is not None else store_state(cache.root)
        self.speaks_python = False  # Catalog.open's: its refusals name the arguments, not the command line's flags

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        *,
        model: str | os.PathLike[str] | None = None,
        onnx: str | os.PathLike[str] | None = None,
        device: str = "auto",
        threads: int | np.integer = 0,
        index: str = "auto",
        seg_model: str | os.PathLike[str] | None = None,
        dedup: bool = False,
        group_by: str | None = None,
    ) -> Catalog:
        """Open a store folder (or a run's output folder) for search.

        model / onnx: the embedder for text and picture queries: a transformers CLIP id or folder, or
            an ONNX image encoder file (its text tower beside it). Default: what the store records (its
            model, or its ONNX file: the default --onnx, else the file of its sha256 where found). The
            embedder is checked against the store when it first loads (vectors of another model are
            never compared).
        device: where the embedder runs ("auto": a GPU when there is one).
        threads: the CPU cores the embedder and the index use (0: every core). faiss's thread count,
            and torch's for a torch model, are settings of the whole process: the last catalog that
            sets them sets them for all (an ONNX file's sessions are its own).
        index: "auto" uses the index file beside the store when there is one; "none": exact search.
        seg_model: the person segmenter for `search_image(..., segment=True)`.
        dedup: one photo per duplicate group in every answer (the groups of outputs/duplicates.csv).
        group_by: a metadata column (a product id): one result per value in every answer.

        A catalog is a snapshot of the store as it was opened: a gallery run or --update since (in
        another process too) is not seen by it (is_current() says whether it still is the store on
        disk; open the folder again for the new one). Open one in each process: it does not pickle.
        """
        if not isinstance(folder, (str, os.PathLike)):
            raise UsageError(f"folder={folder!r}: a store's folder (or a run's output folder), as a str or Path")
        # a Path is taken wherever a file or folder is (model=Path(...) failed at the first query)
        model, onnx, seg_model = (os.fspath(v) if isinstance(v, os.PathLike) else v for v in (model, onnx, seg_model))
        # "~/models/fashion-clip", as the README's commands write it (a shell expands it; a hub id never starts so)
        model, onnx, seg_model = (os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                                  for v in (model, onnx, seg_model))
        if isinstance(folder, (str, os.PathLike)) and os.fspath(folder).startswith("~"):
            folder = os.path.expanduser(os.fspath(folder))
        threads = int(threads) if isinstance(threads, np.integer) else threads
        if not isinstance(dedup, (bool, np.bool_)) and dedup not in (0, 1):  # dedup="no" was taken as True
            raise UsageError(f"dedup={dedup!r}: True or False")
        _check_open_arguments(device, threads, index, model, onnx)
        group_by = group_by or None  # "" is "each photo", as a query's group_by="" says
        root = store_folder(os.fspath(folder))
        opened = store_state(root)  # before the store is read: an update switched in meanwhile is not taken as this
        cache = load_cache(root, Path(), identity=None, check_images=False)
        cache = replace(cache, images_dir=images_folder(root, cache.sidecar.source.kind or "standard"))
        searcher = Searcher.open(root, cache.embeddings, cache.embedded_rows, cache.sidecar.embeddings_sha256, index,
                                 threads)
        if dedup:
            searcher.dedup(stored_groups(root, searcher.rows, cache.sidecar.manifest_sha256))
        searcher.metadata = load_metadata(root, searcher.rows, cache.sidecar.manifest_sha256)
        try:
            searcher.group_by(group_by)
        except PipelineError as e:  # said with the argument's name, as a query's group_by is
            again = _said_in_python(e)
            if again is None:
                raise
            raise again from e.__cause__
        try:
            spec = store_embedder_spec(cache.sidecar.identity, cache.root, model, onnx, device, threads,
                                       cache.sidecar.onnx_file)
        except CacheMismatchError as e:
            if model is not None:
                raise  # a model asked for that cannot answer for this store: said at open
            refusal = e  # the store's file found nowhere: said when a query needs the embedder (vectors,
            spec = None  # neighbours and metadata need none)
        asked = SegmentSpec(model=seg_model) if seg_model else SegmentSpec()

        def segmenter() -> Segmenter:  # at the first query that segments: a text query needs no weights
            spec = asked
            if cache.sidecar.source.kind == "segment":  # query persons cut as its crops were: its model, size, cap
                spec, _ = recorded_segment(cache.sidecar.source, asked, {"seg_model"} if seg_model else set(),
                                           cache.root, model_flag="seg_model=PATH")
            return make_segmenter(spec, device=device)

        def embedder() -> Embedder:
            if spec is None:  # a new exception each time: one raised again keeps every query's frames alive
                raise CacheMismatchError(str(refusal))
            return _checked_embedder(spec, cache)

        catalog = cls(cache, searcher, embedder, segmenter, opened)
        catalog.speaks_python = True
        return catalog

    # ------------------------------------------------------------------ what is in it
    @property
    def items(self) -> Sequence[ManifestRow]:
        """The manifest lines of the searchable items; items[row] owns embeddings[row]. Read-only, and
        each line a copy of the searcher's: nothing done to them changes an answer."""
        return _Items(self.searcher.rows)

    @property
    def embeddings(self) -> np.ndarray:
        """float32 (N, D), L2-normalized; read-only (the searcher's own: a write would change answers)."""
        view = self.searcher.embeddings.view()
        view.flags.writeable = False
        return view

    def is_current(self) -> bool:
        """Whether the store on disk is still the one this catalog opened. A catalog is a snapshot: a
        gallery run or an --update since (in another process too) leaves it answering from the store
        as it was, and naming image files that may be gone; open the folder again for the new one
        (`--serve` does so by itself)."""
        return self.opened_state is not None and store_state(self.cache.root) == self.opened_state

    def __len__(self) -> int:
        return len(self.searcher.rows)

    def close(self) -> None:
        """Let go of the store's thumbnails file (a search after this cannot show thumbnails)."""
        self.thumbnails.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_in_python
    def duplicates(self) -> list[list[ManifestRow]]:
        """The store's duplicate groups (outputs/duplicates.csv), each a list of items, its first
        photo first."""
        groups = stored_groups(self.cache.root, self.searcher.rows, self.cache.sidecar.manifest_sha256)
        # copies, as `items` gives: a caller's edit of one (r.file = ...) changed every later answer
        return [[replace(self.searcher.rows[m]) for m in g.members] for g in groups]

    def describe(self) -> str:
        """One line: how many items, where, and how they are searched."""
        return f"{len(self):,} items in {self.cache.root}; search: {self.searcher.describe()}"

    def __repr__(self) -> str:
        return f"<Catalog {self.describe()}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"a Catalog does not pickle (its files, locks and models are this process's): open it in "
                        f"each process, Catalog.open('{self.cache.root}', ...)")

    @_in_python
    def thumbnail(self, row: Whole) -> np.ndarray:
        """uint8 (T, T, 3) RGB thumbnail of embedding row `row`."""
        self._check_row(row)
        return self.thumbnails.of(int(row))

    @property
    def embedder(self) -> Embedder:
        slot = self._embedder_slot
        if slot.value is None:
            with slot.lock:
                return slot.get()
        return slot.value

    def keep_models_of(self, other: Catalog, segmenter: bool = True) -> Catalog:
        """This catalog, asking with `other`'s embedder and, with segmenter=True, its segmenter (the
        same objects, loaded or to load on first use, and the segmenter's lock): a store opened again
        after an update (--serve) loads no model again. Returns self."""
        self._embedder_slot = other._embedder_slot
        if segmenter:
            self._segmenter_slot = other._segmenter_slot
        return self

    # ------------------------------------------------------------------ search
    def _searcher(self, group_by: str | None) -> Searcher:
        """The searcher grouped as asked: None, as the catalog was opened; "" each photo; a column
        name, one result per value of it."""
        if group_by is not None and not isinstance(group_by, str):
            raise UsageError(f"group_by={group_by!r}: a metadata column's name, a text ('' for each photo)")
        return self.searcher if group_by is None else self.searcher.grouped(group_by or None)

    @_in_python
    def search_vectors(self, vectors: npt.ArrayLike, k: Whole = 5, filter: str | None = None,
                       group_by: str | None = None) -> list[list[Hit]]:
        """Top-k hits for each vector: float32 (D,) or (Q, D), L2-normalized. filter: a metadata
        filter ("category = 'dress' AND price < 50", filters.py), applied inside the search.
        group_by: a metadata column, one result per value of it ("" : each photo; None: as the
        catalog was opened)."""
        k = self._k(k)
        if np.iscomplexobj(vectors):  # its imaginary part would be dropped with a ComplexWarning alone
            raise UsageError("query vectors are real numbers, float32 (D,) or (Q, D): these are complex")
        try:
            q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise UsageError(f"query vectors are numbers, float32 (D,) or (Q, D): {first_line(e)}") from None
        dim = self.embeddings.shape[1]
        if q.ndim != 2 or q.shape[1] != dim:
            raise UsageError(f"query vectors must be of shape ({dim},) or (Q, {dim}), as the store's; got "
                             f"{np.shape(vectors)}")
        if not np.isfinite(q).all():
            bad = sorted(set(np.nonzero(~np.isfinite(q))[0].tolist()))
            raise UsageError(f"query vector(s) {bad[:5]} hold NaN or infinite values: they are near nothing")
        norms = np.linalg.norm(q.astype(np.float64), axis=1)
        off = np.nonzero(np.abs(norms - 1.0) > UNIT_TOLERANCE)[0]
        if len(off):  # distances are 1 - q.g: of a vector of another length they mean nothing (and clip at 0)
            said = ", ".join(f"{i} ({norms[i]:.4g})" for i in off[:5].tolist())
            raise UsageError(f"query vector(s) must be L2-normalized, as the store's are: vector(s) {said} have "
                             "another length; divide each by its norm (v / np.linalg.norm(v)); a zero vector is "
                             "near nothing")
        searcher = self._searcher(group_by)
        return searcher.search(q, k, searcher.allowed(filter))

    @_in_python
    def search_text(self, text: str, k: Whole = 5, filter: str | None = None, group_by: str | None = None) -> list[Hit]:
        """The top-k items for a description (filter, group_by: as in search_vectors)."""
        k = self._k(k)
        if not isinstance(text, str):  # a list would be checked as one text and said as one
            raise UsageError(f"search_text takes one text, got a {type(text).__name__}: for several, search each "
                             "(or search_combined's texts= for one picture and words)")
        text = _checked_texts([text])[0]
        searcher = self._searcher(group_by)
        allowed = searcher.allowed(filter)
        return searcher.search(self.embedder.embed_text([text]), k, allowed)[0]

    @_in_python
    def query_crops(self, picture: str | Path | bytes | Image.Image, segment: bool = False,
                    name: str | None = None) -> tuple[list[QueryCrop], bool]:
        """A query picture as the pictures searched (each person in it with segment=True), and
        whether a person was found. Raises ImageDecodeError for bytes that are not a picture. A
        whole picture is decoded as the gallery's photos were (a JPEG at a reduced DCT scale when the
        model's size allows), so that a photo of the gallery gets the pixels, and so the vector, it has
        there; a picture to segment is decoded whole, as the gallery's photos to segment were."""
        if not isinstance(segment, (bool, np.bool_)):  # segment="yes" was taken as True
            raise UsageError(f"segment={segment!r}: True or False")
        if name is not None and not isinstance(name, str):  # name=5 labelled the result with a number
            raise UsageError(f"name={name!r}: the query's label, a text")
        if isinstance(picture, Image.Image):  # as a decoded file's: upright by its EXIF, alpha on white
            try:
                image = to_rgb(ImageOps.exif_transpose(picture))
            except OSError as e:  # a lazily opened file that turns out damaged, as its path or bytes would say
                raise ImageDecodeError(f"the picture cannot be decoded: {first_line(e)}") from e
            if 0 in image.size:
                raise ImageDecodeError(f"the picture is {image.width}x{image.height}: nothing to search with")
            label = name or "picture"
        elif isinstance(picture, (str, Path, bytes, bytearray, memoryview)):
            if isinstance(picture, (str, Path)) and Path(picture).is_dir():
                raise UsageError(f"{picture} is a folder: search_image takes one picture (a file, its bytes or a PIL "
                                 "image); search each of its pictures, as the CLI's --query-image FOLDER does")
            try:
                data = read_regular_file(picture) if isinstance(picture, (str, Path)) else bytes(picture)
            except OSError as e:
                raise ImageDecodeError(f"cannot read {str(picture)}: {e.strerror or e}") from e
            image = decode_image(data, min_side=None if segment else self.decode_min_side).image
            label = name or (printable_name(Path(picture).name) if isinstance(picture, (str, Path)) else "picture")
        else:
            raise UsageError(f"a picture is a file's path, its bytes or a PIL image, not a {type(picture).__name__}"
                             + (" (Image.fromarray makes one of an array)" if isinstance(picture, np.ndarray) else ""))
        if not segment:
            return query_crops(image, label, None)
        with self._segmenter_slot.lock:
            return query_crops(image, label, self._segmenter_slot.get())

    @_in_python
    def load_segmenter(self) -> None:
        """Load the segmenter now, not on the first picture cut into persons (a server says it is
        ready once it is). PipelineError when it cannot be loaded."""
        with self._segmenter_slot.lock:
            self._segmenter_slot.get()

    @functools.cached_property
    def decode_min_side(self) -> int | None:
        """The smallest side a reduced-scale decode of a whole picture may leave, as the store's photos
        were decoded: by the CPU's decoder, from the preprocessing the store records; None, a full
        decode, for a store of the device's decoder or of person crops (both decoded their photos
        whole), or one that records no preprocessing."""
        side = self.cache.sidecar
        made = side.identity.preprocess
        if not made or side.identity.pixels not in CPU_PIXELS or side.source.kind == "segment":
            return None
        return PreprocessConfig.from_json(json.dumps(made)).decode_min_side

    def embed_crops(self, crops: Sequence[QueryCrop]) -> np.ndarray:
        """float32 (len(crops), D) vectors of query pictures."""
        emb = self.embedder
        return emb.embed(preprocess_batch([c.image for c in crops], emb.preprocess_cfg))

    @_in_python
    def search_combined(self, picture: str | Path | bytes | Image.Image, texts: str | Sequence[str],
                        negative: str | Sequence[str] = (), k: Whole = 5, fusion: str = "sum",
                        text_weight: float | None = None,
                        segment: bool = False, name: str | None = None,
                        filter: str | None = None, group_by: str | None = None) -> list[QueryResult]:
        """"This dress, but in red": one query from a picture and texts (for each person in the picture
        with segment=True). fusion "sum": the weighted sum of the normalized vectors (searcher.combine;
        negative texts are subtracted); "rrf": reciprocal-rank fusion of the picture's and each text's
        result lists (no negative texts, no text_weight: the lists weigh alike). text_weight: the texts'
        weight in the sum, 0.5 unless given. filter, group_by: as in search_vectors. texts, negative: a
        text or several."""
        k = self._k(k)
        texts, negative = _checked_texts(texts), _checked_texts(negative)
        if fusion not in ("sum", "rrf"):
            raise UsageError(f"fusion must be 'sum' or 'rrf', got {fusion!r}")
        if fusion == "rrf" and negative:
            raise UsageError("negative texts need fusion='sum' (--fusion sum): a rank fusion cannot subtract a list")
        if fusion == "rrf" and text_weight is not None:  # it was taken and had no effect
            raise UsageError("text_weight is fusion='sum''s: a rank fusion weighs the picture's and each text's "
                             "lists alike (--fusion rrf has no --text-weight)")
        text_weight = 0.5 if text_weight is None else text_weight
        if isinstance(text_weight, bool) or not isinstance(text_weight, (int, float, np.integer, np.floating)):
            raise UsageError(f"text_weight={text_weight!r}: a finite number >= 0")
        if not texts and not negative:
            raise UsageError("a picture-plus-text query needs a text")
        searcher = self._searcher(group_by)
        allowed = searcher.allowed(filter)
        crops, found = self.query_crops(picture, segment, name)
        pictures = self.embed_crops(crops)
        said = self.embedder.embed_text(list(texts)) if texts else np.zeros((0, pictures.shape[1]), np.float32)
        minus = self.embedder.embed_text(list(negative)) if negative else None
        out = []
        for crop, v in zip(crops, pictures):
            if fusion == "sum":
                nb = searcher.neighbours(combine(v, said, minus, text_weight)[None, :], k, allowed)
            else:
                nb = searcher.fused(np.concatenate([v[None, :], said]), k, allowed)
            out.append(QueryResult(crop.label, searcher.hits(nb, 0), crop.image, found))
        return out

    @_in_python
    def search_image(self, picture: str | Path | bytes | Image.Image, k: Whole = 5, segment: bool = False,
                     name: str | None = None, filter: str | None = None,
                     group_by: str | None = None) -> list[QueryResult]:
        """The top-k items for a picture (a path, its bytes, or a PIL image); with segment=True, for
        each person in it (the whole picture when nobody is found). filter, group_by: as in
        search_vectors."""
        k = self._k(k)
        searcher = self._searcher(group_by)
        allowed = searcher.allowed(filter)
        crops, found = self.query_crops(picture, segment, name)
        hits = searcher.search(self.embed_crops(crops), k, allowed)
        return [QueryResult(c.label, h, c.image, found) for c, h in zip(crops, hits)]

    @_in_python
    def neighbours(self, item: Whole | str | Path, k: Whole = 5, filter: str | None = None,
                   group_by: str | None = None) -> list[Hit]:
        """An item's top-k other items; item: its embedding row, its store file name (refused when
        several items share it: equal photos are one file), or its source (the name the user knows it
        by). Another item with the same bytes is another item, and comes first (dedup=True hides it).
        filter, group_by: as in search_vectors."""
        k = self._k(k)
        searcher = self._searcher(group_by)
        nb = searcher.item_neighbours(np.array([self._row_of(item)]), k, searcher.allowed(filter))
        return searcher.hits(nb, 0)

    def _k(self, k: Whole) -> int:
        """k checked, and at most the catalogue's size: no answer holds more, and the searches'
        (queries, k) arrays stay that small whatever k is asked."""
        _check_k(k)
        return max(1, min(int(k), len(self)))

    def _check_row(self, row: Whole) -> None:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise UsageError(f"an item is asked for by its row (a whole number), its file name or its source, got "
                             f"{row!r}")
        if not 0 <= int(row) < len(self):
            held = f"has rows 0..{len(self) - 1}" if len(self) else "is empty"
            raise UsageError(f"no item {row}: the store {held}")

    def _as_source(self, item: str) -> list[str]:
        """A photo's path as a folder dataset's sources may spell it, other than `item`: `/` between
        folders, no leading `./`, and a path on disk inside the dataset's folder relative to that
        folder, or to its split's folder (train/, as a split dataset's sources are)."""
        spelled = item.replace("\\", "/")
        while spelled.startswith("./"):
            spelled = spelled[2:]
        source = self.cache.sidecar.source
        if source.dataset and os.path.isabs(spelled) and Path(source.dataset).is_dir():
            try:
                spelled = Path(spelled).resolve().relative_to(Path(source.dataset).resolve()).as_posix()
            except (ValueError, OSError):
                pass
        split = f"{source.split}/" if source.split else None
        ways = [spelled] + ([spelled[len(split):]] if split and spelled.startswith(split) else [])
        return [w for w in ways if w != item]

    def _row_of(self, item: Whole | str | Path) -> int:
        if isinstance(item, Path):
            item = str(item)
        if not isinstance(item, str):
            self._check_row(item)
            return int(item)
        rows = [r.embedding_row for r in self.searcher.rows if r.file == item]
        said = "is the file of {n} items with the same bytes"  # files are named by their bytes: equal photos are one
        # the name the user knows it by: its source (a path in the dataset folder), else its caption
        # (store.shown_name: its folder and name), else its file's name alone; the first that names any
        for name_of in (lambda r: r.source, lambda r: r.shown_name, lambda r: re.split(r"[\\/]", r.source)[-1]):
            if rows:
                break
            rows = [r.embedding_row for r in self.searcher.rows if r.source and name_of(r) == item]
            said = "names {n} items"
        for spelled in self._as_source(item) if not rows else ():  # ./a.jpg, shirts\\a.jpg, its path on disk
            rows = [r.embedding_row for r in self.searcher.rows if r.source == spelled]
            said = "names {n} items"
            if rows:
                break
        if len(rows) > 1:
            listed = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise UsageError(f"{item!r} {said.format(n=len(rows))} (rows {listed}): ask for one by its row, e.g. "
                             f"neighbours({rows[0]})")
        if not rows:
            raise UsageError(f"no item named {item!r} in {self.cache.root}: an item is asked for by its row "
                             "(hit.row), its store file (hit.file, img_….jpg), its source (hit.source), its caption "
                             "(hit.shown_name) or its file's name in the dataset")
        return rows[0]


T = TypeVar("T")


class _FirstUse(Generic[T]):
    """A model loaded on first use; the caller holds `lock` for get(). Catalogs of one store opened
    again after an update share it (Catalog.keep_models_of)."""

    def __init__(self, factory: Callable[[], T] | None) -> None:
        self.factory = factory
        self.value: T | None = None
        self.lock = threading.Lock()

    def get(self) -> T:
        if self.value is None:
            if self.factory is None:
                raise PipelineError("this catalog has no segmenter")  # the embedder's factory is never None
            self.value = self.factory()
            self.factory = None  # let go of what it held (the store it was first opened over)
        return self.value


def _checked_texts(texts: str | Sequence[str]) -> list[str]:
    """Query texts as a list (one text alone is one text, not its letters), each checked: a text
    must say something, and be Unicode a tokenizer takes (no lone surrogate)."""
    if not isinstance(texts, str) and not hasattr(texts, "__iter__"):
        raise UsageError(f"query texts are a text or a list of texts, got {texts!r}")
    out = [texts] if isinstance(texts, str) else list(texts)
    for t in out:
        if not isinstance(t, str) or not t.strip():
            raise UsageError(f"a query text must say something, got {t!r}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"a query text must be valid Unicode: {t!r} has {e.reason} at character {e.start + 1}"
                             ) from None
    return out


def _check_k(k: Whole) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k is the number of results to return: a whole number of at least 1, got {k!r}")


def store_embedder_spec(made: VectorIdentity, root: Path, model: str | None, onnx: str | None, device: str,
                        threads: int, recorded: str | None = None) -> EmbedderSpec:
    """What embeds the queries of the store at `root`, which `made` made. A store made by an ONNX
    file is asked with that file: with `model=` (the model the file was exported from; its own
    vectors are not the file's), the file whose sha256 the store records is looked for where the
    store recorded it (`recorded`, the sidecar's onnx_file), beside the default one, in ./onnx and
    the project's onnx/, else refused with what to pass."""
    runtime = made.runtime or ONNXRUNTIME  # a store's queries run on the runtime that made its vectors
    if model is not None:
        model = model_by_name(model)  # a short name, as --model takes it (marqo-fashionsiglip)
    if onnx:
        return EmbedderSpec(model=model or made.model or "", onnx=onnx, backend="onnx", device=device,
                            threads=threads, runtime=runtime)
    if made.backend == "onnx":
        # the default file, checked on load
        default = EmbedderSpec(backend="onnx", device=device, threads=threads, runtime=runtime)
        if model is None and Path(default.onnx).is_file() and sha256_file_once(default.onnx) == made.onnx_sha256:
            return default
        found = find_file_with_sha256(made.onnx_sha256 or "", default.onnx, recorded)
        if found is None:
            # named by what the store records: the default file's "make it with --export-onnx" would make a
            # file of the default model, which this store's vectors may never have come from
            why = "whose vectors are not the model's own" if model is not None else (
                (f"not at {recorded} any more (or with other bytes), " if recorded else "")
                + f"found neither at the default --onnx {default.onnx} nor by its sha256 in ./onnx or the project's "
                "onnx/")
            kind = (made.precision or "onnx-int8").removeprefix("onnx-").split("-")[0]  # int8, fp32
            raise CacheMismatchError(
                f"the store in {root} was made by an {kind} ONNX file (sha256 {(made.onnx_sha256 or '?')[:12]}…, "
                f"exported from {made.model}), {why}: pass --onnx FILE (onnx='FILE.onnx' from Python), the file that "
                f"made it (one an export replaced is kept beside the new one as <name>.{(made.onnx_sha256 or '?')[:12]}"
                ".onnx)"
            )
        if model is None:
            log.info("%s: the store was made by %s: its queries are embedded with it", root, found)
            model = made.model or ""
        elif made.model and model_reference(model) != made.model:
            log.warning("%s: the store was made by %s, exported from %s, not from %s: its queries are embedded "
                        "with that file", root, found, made.model, model)
            model = made.model  # the file's own model, for what the file does not record
        else:
            log.info("%s: the store was made by %s (exported from the model): its queries are embedded with it",
                     root, found)
        return EmbedderSpec(model=model, onnx=str(found), backend="onnx", device=device,
                            threads=threads, runtime=runtime)
    if model is None and made.model and Path(made.model).is_absolute() and not Path(made.model).exists():
        raise CacheMismatchError(
            f"the store in {root} was made by the model folder {made.model}, which is not there any more: pass "
            f"--model FOLDER (model='FOLDER' from Python), a folder with the same weights"
            + (f" (checked by their sha256, {made.model_sha256[:12]}…)" if made.model_sha256 else ""))
    return EmbedderSpec(model=model or made.model or "", backend="torch", device=device, threads=threads)


def _checked_embedder(spec: EmbedderSpec, cache: GalleryCache) -> Embedder:
    """The embedder, refused when it is not the one that made the store's vectors."""
    embedder = make_embedder(spec)
    problems = differences(embedder.identity, cache.sidecar.identity)
    if problems:
        raise CacheMismatchError(
            f"the store in {cache.root} was made by another embedder than this one:\n  " + "\n  ".join(problems)
            + "\npass the model (model=...) or ONNX file (onnx=...) that made it"
        )
    return embedder
