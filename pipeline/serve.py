"""--serve: a local search page over a cached gallery. Type a text or upload a picture (optionally
cut into its persons, each a query) and see the gallery's top-k; the run's HTML report is served too.

FastAPI on uvicorn, bound to 127.0.0.1 unless --host says otherwise. The model, the store and its
index are loaded once (the store and index again when an --update switches a new store in: the
server follows the store on disk, SearchService); a query is answered exactly as --query-text /
--query-image answer it (same embedder, same search). A request body over its endpoint's limit is
refused before it is read (MAX_UPLOAD_BYTES for a picture, MAX_BODY_BYTES for the rest); an upload
not an image, or whose header claims over MAX_UPLOAD_PIXELS, gets a 4xx with the reason, and at
most DECODING uploads are read, decoded and embedded at once (the others wait in the event loop,
holding neither a worker thread nor their bytes), so a burst of large pictures cannot take the machine's memory. Only
the report's folders are served as files, and on loopback only requests named for loopback are
answered (a page on another site cannot read the catalogue through a rebound DNS name).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime,
# and those name classes imported inside the functions that add the endpoints (FastAPI loads only for
# --serve).
import errno
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from .catalog import Catalog, Thumbnails, store_state
from .config import RunConfig, onnx_fallback
from .errors import PipelineError, UsageError
from .fileio import being_written
from .filters import column_kind
from .galleries import open_catalog, store_embedder_note
from .images import ImageDecodeError, encode_jpeg, pil_open
from .report import RunSummary, terminal_text
from .searcher import Hit
from .webreport import template

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 << 20
MAX_BODY_BYTES = 64 << 10  # a text query, a filter: any body but an upload's
UPLOAD_TOO_LARGE = f"the picture is over {MAX_UPLOAD_BYTES >> 20} MB: choose a smaller one, or a smaller copy of it"
MAX_UPLOAD_PIXELS = 40_000_000  # a query picture (a 50 MP camera's photo is over it: said, not decoded)
DECODING = 2  # uploads decoded and embedded at once; the others wait
MAX_TEXT_CHARS = 500
MAX_K = 100
PAGE = Path(__file__).parent / "templates" / "search.html"
NO_SEGMENTER = (
    "this server does not cut pictures into persons (it serves the whole-picture gallery); "
    "start it with --serve --use-segmentation to search with each person in a picture"
)


# "One result per photo" as a form sends it: FastAPI reads an empty form field as absent (the
# server's --group-by), so the page sends this marker instead.
EACH_PHOTO = "(photo)"


def each_photo(group_by: str | None) -> str | None:
    """A query's group_by as Catalog takes it: "" for each photo, None for the server's."""
    return "" if group_by == EACH_PHOTO else group_by


FOLLOW_EVERY_S = 2.0  # how often a request looks whether the store on disk was switched (an --update)
RETRY_AT_LEAST_S = 2.0  # a store that could not be opened while a run writes it: tried again after this, or 5x its try
REFUSED_RETRY_S = 60.0  # one refused as it is (another model's, its images not all there): after this, or 5x its try


@dataclass
class SearchService:
    """What the app answers with: the run's settings and the opened catalog (model, gallery and index,
    loaded once), and the latency of each answer.

    It follows the store on disk: when an --update (or a build) switches a new store in, the next
    request after it starts opening it in a thread, with the models already loaded, while the
    catalog in hand answers; then it is swapped in. A store that cannot be served (made by another
    model, or caught between its files) is said once and tried again when its files change, while a run
    writes it, and otherwise after REFUSED_RETRY_S; the loaded one is served
    meanwhile; a store gone from disk is said too. Results name their thumbnails by the store's
    version (its manifest), so that a result given just before a swap still shows its own photo (the
    version before is kept for them); the generation counts every swap, a change of metadata or
    index alone included, by which the page and its filter controls notice one."""

    cfg: RunConfig
    catalog: Catalog
    latencies: list[float] = field(default_factory=list)
    follow: bool = True
    updates: int = 0  # stores swapped in while serving
    declined: list[int] = field(default_factory=list)  # the status of each query answered with an error (a bad
    # upload, filter, k): not in the latencies (appended from worker threads, as they are)
    refused: str | None = None  # why the store on disk is not the one served, while it is not
    generation: int = 0  # the catalog swapped in last: 0 the one loaded first
    _generation_of: Any = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _seen: tuple[int, ...] | None = field(default=None, repr=False)
    _missing: bool = field(default=False, repr=False)  # the refusal said is that the store is gone
    _earlier: dict[str, Thumbnails] = field(default_factory=dict, repr=False)  # a version's thumbnails alone
    _refused_state: tuple[int, ...] | None = field(default=None, repr=False)  # a store that cannot be served as it is
    _refused_until: float = field(default=0.0, repr=False)  # when it is tried again all the same
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _opening: bool = field(default=False, repr=False)
    _next_look: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._seen = self.catalog.opened_state  # taken before the store was read
        self._generation_of[self.catalog] = self.generation

    @classmethod
    def load(cls, cfg: RunConfig, summary: RunSummary | None = None) -> "SearchService":
        summary = summary or RunSummary(mode="serve")
        catalog = open_catalog(cfg, summary)
        check_server_filter(cfg, catalog)  # refused now, not in every query's answer
        if cfg.segmented:  # loaded before the server says it is ready: the first person query waited ~3 s for it
            with summary.stage("load segmenter"):
                catalog.load_segmenter()
        return cls(cfg, catalog)

    @staticmethod
    def version(catalog: Catalog) -> str:
        """A store's version as its thumbnails' URLs and ETags say it: its manifest's sha256, cut."""
        return catalog.cache.sidecar.manifest_sha256[:16]

    def current(self) -> Catalog:
        """The catalog to answer with; at most every FOLLOW_EVERY_S, a look whether the store on disk
        changed, which starts opening it in a thread (see the class)."""
        if self.follow and time.monotonic() >= self._next_look:
            with self._lock:
                start = not self._opening and time.monotonic() >= self._next_look
                if start:
                    self._next_look = time.monotonic() + FOLLOW_EVERY_S
                    state = store_state(self.catalog.cache.root)
                    if state is None and self._seen is not None:  # deleted, or a build between its files
                        self._gone()
                    elif self._missing and state == self._seen:  # back as it was: nothing to say
                        self.refused, self._missing = None, False
                    start = state is not None and state != self._seen and (
                        state != self._refused_state or time.monotonic() >= self._refused_until)
                    self._opening = start
            if start:
                threading.Thread(target=self.reopen, name="reopen-store", daemon=True).start()
        return self.catalog

    def reopen(self) -> bool:
        """Open the store on disk and swap it in when it is not the one served; True when it was."""
        old = self.catalog
        state, t = store_state(old.cache.root), time.monotonic()
        try:
            if state is None or state == self._seen:
                return False
            new = None
            try:
                new = open_catalog(self.cfg, RunSummary(mode="serve"), embedder=old.embedder)
                # the segmenter loaded for the old store cuts persons as the new one's were cut, or not at all
                new.keep_models_of(old, segmenter=_segmentation(old) == _segmentation(new))
                if self.cfg.segmented:  # a segmenter of other settings loads now, not on the next person query
                    new.load_segmenter()
                check_server_filter(self.cfg, new)  # a column the --filter names gone: every query would be refused
            except PipelineError as e:  # another model's store, or one between its files: the old one goes on
                if new is not None:
                    new.close()
                said = f"the store in {self.cfg.store_dir} changed on disk and is not served yet ({e}); serving the " \
                       f"{len(old):,} items loaded before"
                if said != self.refused:
                    log.warning("%s", said)
                self.refused = said
                with self._lock:  # tried again when it changes, and after a while (files it does not watch,
                    took = time.monotonic() - t  # images copied after the store, may complete it meanwhile)
                    if being_written(self.cfg.output_dir):
                        self._next_look = time.monotonic() + max(RETRY_AT_LEAST_S, 5 * took)
                    else:
                        self._refused_state = state
                        self._refused_until = time.monotonic() + max(REFUSED_RETRY_S, 5 * took)
                return False
            with self._lock:
                if self.version(old) != self.version(new):  # its rows hold other photos: one version back is kept
                    for version, earlier in list(self._earlier.items()):
                        earlier.close()
                        del self._earlier[version]
                    self._earlier[self.version(old)] = old.thumbnails  # its thumbnails alone, not its vectors
                self.generation += 1
                self._generation_of[new] = self.generation
                self.catalog, self._seen, self.refused, self._missing = new, state, None, False
                self.updates += 1
            log.warning("the store in %s changed on disk: now serving %s items (%s before)", self.cfg.store_dir,
                        f"{len(new):,}", f"{len(old):,}")
            return True
        finally:
            with self._lock:
                self._opening = False

    def _gone(self) -> None:
        """The store's sidecar is not on disk (deleted, or a build between its files): said, once."""
        said = (f"the store in {self.cfg.store_dir} is not on disk now (deleted, or being built); serving the "
                f"{len(self.catalog):,} items loaded before")
        if said != self.refused:
            log.warning("%s", said)
        self.refused, self._missing = said, True

    def thumbnails_of(self, version: str | None) -> tuple[str, Thumbnails] | None:
        """The version and thumbnails of the store whose results named `version` (None: the current
        one); None when that store is gone (more than one update of its photos ago)."""
        catalog = self.current()
        if version is None or version == self.version(catalog):
            return self.version(catalog), catalog.thumbnails
        with self._lock:
            kept = self._earlier.get(version)
        return None if kept is None else (version, kept)

    def schema(self, catalog: Catalog | None = None) -> Any:
        """The served store's (or `catalog`'s) metadata schema (pyarrow), None when it keeps none."""
        meta = (catalog or self.current()).searcher.metadata
        return None if meta is None else meta.table.schema

    @property
    def can_segment(self) -> bool:
        """Whether an upload may be cut into its persons: when serving the segmented gallery
        (--use-segmentation), whose items are persons too; its segmenter loads with the server."""
        return self.cfg.segmented

    @classmethod
    def as_json(cls, hits: list[Hit], catalog: Catalog) -> list[dict[str, Any]]:
        """row: the embedding row; thumb: its thumbnail's URL, with the store's version; line: the
        manifest line."""
        version = cls.version(catalog)
        return [{**h.to_dict(), "thumb": f"/thumb/{h.row}.jpg?v={version}", "name": h.shown_name,
                 "distance": round(h.distance, 6)} for h in hits]

    def store_json(self, catalog: Catalog) -> dict[str, Any]:
        """The store an answer comes from: the page notices an update by its generation."""
        return {"version": self.version(catalog), "generation": self._generation_of.get(catalog, -1),
                "items": len(catalog)}

    def text(self, text: str, k: int, filter: str | None = None, group_by: str | None = None,
             catalog: Catalog | None = None) -> dict[str, Any]:
        """A text's answer: {"results": hits, "store": the store that gave them}; catalog: the one the
        request took (its filter checked against it), else the current one."""
        catalog = catalog or self.current()
        hits = catalog.search_text(text, k, filter=filter, group_by=group_by)
        return {"results": self.as_json(hits, catalog), "store": self.store_json(catalog)}

    def similar(self, row: int, k: int, filter: str | None = None, group_by: str | None = None,
                catalog: Catalog | None = None) -> dict[str, Any]:
        """A gallery item's look-alikes (a result clicked on the page), as image() answers: one query,
        the item's thumbnail its picture."""
        catalog = catalog or self.current()
        hits = catalog.neighbours(row, k, filter=filter, group_by=group_by)
        name = catalog.searcher.rows[row].shown_name
        return {"queries": [{"label": f"More like {name}", "results": self.as_json(hits, catalog),
                             "picture": f"/thumb/{row}.jpg?v={self.version(catalog)}", "caption": "this item",
                             "name": name}],
                "store": self.store_json(catalog)}

    def image(self, data: bytes, name: str, k: int, segment: bool, filter: str | None = None,
              text: str = "", group_by: str | None = None, catalog: Catalog | None = None) -> dict[str, Any]:
        """An uploaded picture's answer, {"queries": [{"label", "results"}], "store": ...}: the
        picture's, or each person's in it; with a text, the picture
        and the text as one query (--fusion, --text-weight). group_by: None the server's
        --group-by, "" each photo, or a column. Raises ImageDecodeError, and UsageError for
        segment=True on a server that does not segment (or a column it does not keep)."""
        if segment and not self.can_segment:
            raise UsageError(NO_SEGMENTER)
        check_upload_pixels(data)
        catalog = catalog or self.current()
        if text.strip():
            q = self.cfg.query
            found = catalog.search_combined(data, [text], (), k, q.fusion, q.weight_of_texts, segment=segment,
                                            name=name, filter=filter, group_by=group_by)
        else:
            found = catalog.search_image(data, k, segment=segment, name=name, filter=filter, group_by=group_by)
        said = f" + “{text}”" if text else ""
        # each person's crop, which the page shows beside its results: the whole picture is the page's own
        return {"queries": [{"label": q.label + said, "results": self.as_json(q.hits, catalog),
                             **({"picture": picture_url(q.picture)} if q.person and q.picture else {})}
                            for q in found],
                "store": self.store_json(catalog)}

    def thumbnail_jpeg(self, row: int, thumbnails: Thumbnails | None = None) -> bytes:
        return encode_jpeg(Image.fromarray((thumbnails or self.catalog.thumbnails).of(row)), quality=88)

    def thumbnail_etag(self, row: int, version: str | None = None) -> str:
        """Row `row`'s thumbnail's version: the store's manifest (an update gives rows other photos)."""
        return f'"{version or self.version(self.catalog)}-{row}"'


def picture_url(image: Image.Image, side: int = 160) -> str:
    """A small JPEG of a searched picture (a person's crop) as a data: URL, for the page to show."""
    import base64

    small = image.copy()
    small.thumbnail((side, side))
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(small.convert("RGB"), quality=85)).decode("ascii")


def _segmentation(catalog: Catalog) -> tuple[Any, ...]:
    """How a store's person crops were cut, as its sidecar records it."""
    made = catalog.cache.sidecar.source
    return made.kind, made.seg_model, made.seg_backend, made.seg_conf, made.seg_imgsz, made.seg_weights


def check_server_filter(cfg: RunConfig, catalog: Catalog) -> None:
    """The server's own --filter checked against a catalog's columns: FilterError (a UsageError)
    when it names one the catalogue does not keep."""
    if cfg.filter:
        catalog.searcher.allowed(cfg.filter)


def check_upload_pixels(data: bytes) -> None:
    """ImageDecodeError when the picture's header claims over MAX_UPLOAD_PIXELS (read from the header
    alone); bytes that are no picture are left to the decoder, which says what they are."""
    try:
        with pil_open(io.BytesIO(data)) as image:  # PIL's own: Ultralytics' would try to pip-install a decoder
            width, height = image.size
    except Image.DecompressionBombError:  # over twice PIL's limit: its message named PIL's limit, not ours
        raise ImageDecodeError(f"refused as a decompression bomb: its header claims over "
                               f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels; a query picture may have "
                               f"at most {MAX_UPLOAD_PIXELS / 1e6:.0f}") from None
    except Exception:  # noqa: BLE001 - not a picture, or a damaged one: the decoder's message says which
        return
    if width * height > MAX_UPLOAD_PIXELS:
        raise ImageDecodeError(f"refused: {width}x{height} is {width * height / 1e6:.0f} megapixels; a query picture "
                               f"may have at most {MAX_UPLOAD_PIXELS / 1e6:.0f}")


QUERY_PATHS = ("/api/text", "/api/image")  # what the summary counts as queries, answered or refused


class _BodyLimit:
    """ASGI middleware: a request body over its path's limit is answered 413 before it is read (by
    its Content-Length), or as soon as a body sent in chunks passes it."""

    def __init__(self, app, limits: dict[str, tuple[int, str]], default: int, refused: list[int] | None = None) -> None:
        """limits: a path's body limit in bytes, and what a person is told when a request passes it."""
        self.app, self.limits, self.default = app, limits, default
        self.refused = refused  # a query refused here is counted as the endpoints count theirs

    async def _answer(self, scope, send, status: int, detail: str) -> None:
        if self.refused is not None and scope["path"] in QUERY_PATHS:
            self.refused.append(status)
        await _answer(send, status, detail)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, over = self.limits.get(scope["path"], (self.default, f"the request is over {self.default >> 10} KiB"))
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and not length.isdigit():
            await self._answer(scope, send, 400, "the Content-Length is not a number")
            return
        if length is not None and int(length) > limit:
            await self._answer(scope, send, 413, over)
            return
        from starlette.exceptions import HTTPException

        seen, started, too_large, answered = 0, False, False, False

        async def counted():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # the app's read of the body stops here
                    too_large = True
                    raise HTTPException(413, over)
            return message

        async def tracked(message) -> None:
            nonlocal started, answered
            if too_large and not started:  # whatever the app made of the stopped read (behind the token's
                if not answered:  # middleware, a 400 "error parsing the body"): a 413
                    answered = True
                    await self._answer(scope, send, 413, over)
                return
            if message["type"] == "http.response.start":
                started = True
                status = int(message.get("status", 200))
                if status >= 400 and self.refused is not None and scope["path"] in QUERY_PATHS:
                    self.refused.append(status)  # the endpoints', FastAPI's own 422s and a 500 alike
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:  # the stopped read, raised through a middleware's task group
            if not too_large or started:
                raise
            if not answered:
                await self._answer(scope, send, 413, over)


async def _answer(send, status: int, detail: str) -> None:
    """A JSON error answered from the middleware, the connection closed (the rest of the body unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


TOKEN_ENV = "FASHION_SEARCH_TOKEN"
TOKEN_COOKIE = "fashion_search_token"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
OPEN_PATHS = {"/"}  # the page's shell: it holds no data, and asks for the token


def required_token(cfg: RunConfig) -> str | None:
    """The token the app requires: the one in $FASHION_SEARCH_TOKEN wherever it is set (on loopback
    too: a reverse proxy on the same machine forwards there), none with --no-auth or on loopback
    without one; beyond loopback without one (or with one too short) the server does not start."""
    if cfg.serve.no_auth:
        return None
    token = os.environ.get(TOKEN_ENV, "")
    if cfg.serve.host in LOOPBACK and not token:
        return None
    if len(token) < 16:
        given = f"${TOKEN_ENV} holds {len(token)} characters, too few to guess-proof; " if token else ""
        raise UsageError(
            (f"--serve --host {cfg.serve.host} lets other machines search the catalogue: " if cfg.serve.host
             not in LOOPBACK else "") + f"{given}set a token of 16 or "
            f"more characters in ${TOKEN_ENV} (e.g. export {TOKEN_ENV}=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')), the page asks for it once; or pass --no-auth to serve it open"
        )
    return token


class _Hardened:
    """Every answer says its type is the one given (`nosniff`: an upload's answer or a report file is
    never run as another type) and that only the server's own pages may frame it."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def hardened(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, hardened)


class _LoopbackNames:
    """Without a token, on loopback, only loopback's own names are answered (127.0.0.1, localhost,
    ::1): a web page whose DNS name an attacker rebinds to 127.0.0.1 would reach the app otherwise.
    Any other Host is a 400 that says why and what to do (a reverse proxy that keeps the Host header
    meets it), where Starlette's TrustedHostMiddleware answers "Invalid host header"."""

    NAMES = LOOPBACK | {"[::1]"}

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":  # the app has no websocket
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.NAMES:
                said = (f"this server answers only the names of loopback (127.0.0.1, localhost, [::1]) while it runs "
                        f"without a token, and this request named {host[:80]!r}. Behind a reverse proxy, set a "
                        f"token of 16 or more characters in ${TOKEN_ENV} for --serve (then any name is answered, "
                        "with the token), or have the proxy send Host: localhost")
                return await _answer(send, 400, said)
        await self.app(scope, receive, send)


def _add_auth(app, token: str) -> None:
    """Every path but the page's shell needs the token: an `Authorization: Bearer` header or the
    cookie the page sets, compared in constant time; otherwise 401."""
    import hmac

    from fastapi.responses import JSONResponse

    expected = token.encode()

    @app.middleware("http")
    async def check_token(request, call_next):
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else ""  # a scheme's name is case-insensitive (RFC 7235)
        given = given or unquote(request.cookies.get(TOKEN_COOKIE, ""))  # the page percent-encodes it
        if not hmac.compare_digest(given.encode(), expected):
            return JSONResponse({"detail": "this search page needs its token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def both_filters(server: str | None, client: str | None, schema: Any = None) -> str | None:
    """The server's --filter and a client's, both applying: a client narrows, never widens. The
    client's must be a whole filter on its own (FilterError, pointing into it, otherwise): text
    such as `x = 1) OR (y IS NULL` would close the parentheses around it and escape the server's.
    schema: the metadata's (pyarrow), to check the client's columns and values against it alone, so
    that a refusal quotes and points into the client's own text, never into the joined one."""
    from .filters import MAX_FILTER_CHARS, check_filter, parse_bounded

    if client and client.strip():  # with the server's own filter, the whole must fit MAX_FILTER_CHARS
        room = MAX_FILTER_CHARS - (len(server) + len("() AND ()") if server and server.strip() else 0)
        node = parse_bounded(client, room, "filter", " here")
        if schema is not None:
            check_filter(node, client, schema)
    parts = [f for f in (server, client) if f and f.strip()]
    return parts[0] if len(parts) == 1 else " AND ".join(f"({f})" for f in parts) or None


MENU_VALUE_CHARS = 60  # a column of longer texts (a description) is free text, not a menu to choose from


def filter_controls(catalog: Catalog, most_values: int = 40) -> list[dict[str, Any]]:
    """What the page builds its filter controls from: per metadata column its kind, and the values
    of a text column with few and short ones (a menu), or a number column's range."""
    import pyarrow.compute as pc

    meta = catalog.searcher.metadata
    if meta is None:
        return []
    out = []
    for name in meta.columns:
        col = meta.table.column(name)
        kind = column_kind(col.type)
        entry: dict[str, Any] = {"name": name, "kind": kind}
        if kind == "text":
            values = pc.unique(col.drop_null()).to_pylist()
            if len(values) <= most_values and all(len(str(v)) <= MENU_VALUE_CHARS for v in values):
                entry["values"] = sorted(str(v) for v in values)
        elif kind == "number":
            import pyarrow as pa

            values = col.drop_null()
            if pa.types.is_floating(col.type):  # NaN (a missing value) and infinities make no bound a box can show
                values = values.filter(pc.is_finite(values))
            if len(values):
                bounds = pc.min_max(values)
                entry["min"], entry["max"] = bounds["min"].as_py(), bounds["max"].as_py()
        out.append(entry)
    return out


def create_app(service: SearchService):
    """The FastAPI app over a loaded SearchService: the search page, its query endpoints, the
    thumbnails and the output folder's files (the report)."""
    try:
        from fastapi import FastAPI
        from fastapi.staticfiles import StaticFiles
    except ImportError as e:
        raise UsageError(
            f"--serve needs FastAPI and uvicorn ({e}): pip install fastapi uvicorn python-multipart"
        ) from e

    cfg = service.cfg
    # PIL's own bomb warning (an upload of 89-179 MP) says nothing the answer does not: set once for the
    # process (warnings.catch_warnings around each upload is not thread-safe, and uploads run at once)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    app = FastAPI(title="Fashion visual search", docs_url=None, redoc_url=None)
    if (token := required_token(cfg)) is not None:
        _add_auth(app, token)
    elif cfg.serve.host in LOOPBACK:  # a rebound DNS name reaches loopback too: only loopback's names are answered
        app.add_middleware(_LoopbackNames)
    app.add_middleware(_Hardened)
    app.add_middleware(_BodyLimit, limits={"/api/image": (MAX_UPLOAD_BYTES + MAX_BODY_BYTES, UPLOAD_TOO_LARGE)},
                       default=MAX_BODY_BYTES, refused=service.declined)
    _add_page_endpoints(app, service)
    _add_query_endpoints(app, service)
    _add_file_endpoints(app, service)
    # the report's folders only: not the store (vectors, manifest, metadata) nor the gallery's photos
    class ReportFiles(StaticFiles):
        """A report folder's files; 404 while the folder is not there (a run without video has no
        video_results/; one may make it while this serves), where Starlette's check raises (a 500)."""

        async def check_config(self) -> None:
            if self.directory is not None and Path(self.directory).is_dir():
                await super().check_config()

        async def get_response(self, path: str, scope):
            """Revalidated on every use: a later run rewrites the report's files under the same names
            while this serves (without it a browser kept last run's sections.js for hours)."""
            response = await super().get_response(path, scope)
            response.headers["cache-control"] = "no-cache"
            return response

    for folder in REPORT_FOLDERS:
        app.mount(f"/files/{folder}", ReportFiles(directory=str(cfg.output_dir / folder), check_dir=False),
                  name=f"files-{folder}")
    _answer_invalid_requests(app)
    return app


def _answer_invalid_requests(app) -> None:
    """A request FastAPI cannot read is a 422 whose detail says which field and why, as the other
    answers' do (a text the page shows), without echoing the value: a JSON body may hold NaN or
    Infinity, which FastAPI's own answer cannot write (it was a 500)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        said = "; ".join(_invalid_part(e) for e in exc.errors())
        return JSONResponse({"detail": said or "the request cannot be read"}, status_code=422)


def _invalid_part(error: dict[str, Any]) -> str:
    """One of FastAPI's validation errors as a person reads it: the field it is about, or for the body
    as a whole what it had to be ("17: JSON decode error" said a character offset as if a field)."""
    if error.get("type") == "json_invalid":
        at = next((x for x in error.get("loc", ()) if isinstance(x, int)), None)
        return "the body is not valid JSON" + (f" (at character {at + 1})" if at is not None else "")
    field = ".".join(str(x) for x in error.get("loc", ()) if x != "body")
    msg = str(error.get("msg", ""))
    if not field:
        if error.get("type") in ("model_attributes_type", "dict_type"):  # a list, a number: not an object
            return "the body must be a JSON object, e.g. {\"text\": \"red dress\"}"
        return f"the body: {msg[:1].lower()}{msg[1:]}"
    return f"{field}: {msg}"


REPORT_FOLDERS = ("outputs", "retrieval_results", "video_results")


def _add_page_endpoints(app, service: SearchService) -> None:
    """/ (the search page) and /api/info (what the page says it searches)."""
    from fastapi.responses import HTMLResponse

    cfg = service.cfg
    page = template(PAGE.name)

    controls: Any = weakref.WeakKeyDictionary()  # read once for each catalog served, let go with it

    def columns(catalog: Catalog) -> list[dict[str, Any]]:
        if catalog not in controls:
            controls[catalog] = filter_controls(catalog)
        return controls[catalog]

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        catalog = service.current()
        return {
            **service.store_json(catalog),  # items, version, generation
            "store": str(cfg.store_dir),
            "model": catalog.embedder.identity.model or "",
            "backend": catalog.embedder.identity.backend,
            "runtime": catalog.embedder.identity.runtime,  # an ONNX file's: onnxruntime or openvino; torch: None
            "k": cfg.top_k,
            "search": catalog.searcher.describe(),
            "report": (cfg.plots_dir / "report.html").is_file(),
            "segment": service.can_segment,
            "columns": columns(catalog),
            "group_by": catalog.searcher.grouped_by,  # the page's default; a query may choose another
            "not_served": service.refused,  # a store on disk this server cannot serve, and why
            "max_upload_bytes": MAX_UPLOAD_BYTES,  # the page refuses a larger picture before sending it
        }


def _add_query_endpoints(app, service: SearchService) -> None:
    """/api/text, /api/image and /api/similar (a result's look-alikes): a query's top-k, its latency
    recorded; bad requests get a 4xx."""
    import anyio
    from fastapi import File, Form, HTTPException, UploadFile
    from pydantic import BaseModel, StrictInt

    cfg = service.cfg

    class TextQuery(BaseModel):
        text: str
        k: StrictInt = cfg.top_k  # a number: `true` is not k = 1
        filter: str | None = None
        group_by: str | None = None  # None: the server's --group-by; "" or EACH_PHOTO: each photo; else a column

    def timed(fn):  # an answer's latency: a refused query is counted apart (service.declined, by _BodyLimit)
        t = time.perf_counter()
        found = fn()
        service.latencies.append(time.perf_counter() - t)
        return found

    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be between 1 and {MAX_K}, got {k}")
        return k

    @app.post("/api/text")
    def text(query: TextQuery) -> dict[str, Any]:
        words = query.text.strip()
        if not words:
            raise HTTPException(422, "type something to search for")
        if len(words) > MAX_TEXT_CHARS:
            raise HTTPException(413, f"the text is {len(words)} characters; at most {MAX_TEXT_CHARS}")
        k = check_k(query.k)
        try:
            catalog = service.current()  # one store for the request: its filter checked against the one that answers
            asked = both_filters(cfg.filter, query.filter, service.schema(catalog))
            grouping = each_photo(query.group_by)
            return {"query": words, **timed(lambda: service.text(words, k, asked, grouping, catalog))}
        except UsageError as e:  # the filter is parsed, checked and never run as code; an unknown column
            raise HTTPException(422, str(e)) from None
        except PipelineError as e:  # e.g. an ONNX file without its text tower beside it
            raise HTTPException(503, str(e)) from None

    class SimilarQuery(BaseModel):
        row: StrictInt  # a result's row, in the store of version `v`
        v: str  # the version of the store that gave it (an update gives rows other photos)
        k: StrictInt = cfg.top_k
        filter: str | None = None
        group_by: str | None = None

    @app.post("/api/similar")
    def similar(query: SimilarQuery) -> dict[str, Any]:
        k = check_k(query.k)
        catalog = service.current()
        if service.version(catalog) != query.v:
            raise HTTPException(409, "the gallery was updated since these results were given: search again")
        if not 0 <= query.row < len(catalog):
            raise HTTPException(404, f"no gallery item {query.row}")
        try:
            asked = both_filters(cfg.filter, query.filter, service.schema(catalog))
            grouping = each_photo(query.group_by)
            return timed(lambda: service.similar(query.row, k, asked, grouping, catalog))
        except UsageError as e:  # a bad filter or group-by column
            raise HTTPException(422, str(e)) from None

    limiters: list[Any] = []  # one, made in the event loop on the first upload

    @app.post("/api/image")
    async def image(file: UploadFile = File(...), segment: bool = Form(False), k: int = Form(cfg.top_k),
                    filter: str = Form(""), text: str = Form(""),
                    group_by: str | None = Form(None)) -> dict[str, Any]:
        check_k(k)
        if segment and not service.can_segment:
            raise HTTPException(422, NO_SEGMENTER)
        words = text.strip()
        if len(words) > MAX_TEXT_CHARS:  # as /api/text: said, not cut
            raise HTTPException(413, f"the text is {len(words)} characters; at most {MAX_TEXT_CHARS}")
        if not limiters:
            limiters.append(anyio.CapacityLimiter(DECODING))
        t = time.perf_counter()  # the answer's latency includes its wait for a turn
        try:
            # at most DECODING uploads read into memory, decoded and embedded at once: the others wait
            # here, in the event loop, holding neither a worker thread nor their bytes (the form parser
            # keeps an upload on disk past 1 MB); text queries and thumbnails go on meanwhile
            async with limiters[0]:
                data = await file.read(MAX_UPLOAD_BYTES + 1)
                if len(data) > MAX_UPLOAD_BYTES:
                    raise HTTPException(413, UPLOAD_TOO_LARGE)
                if not data:
                    raise HTTPException(422, f"{file.filename or 'the upload'}: the file is empty")
                catalog = service.current()
                asked = both_filters(cfg.filter, filter, service.schema(catalog))
                found = await anyio.to_thread.run_sync(
                    lambda: service.image(data, file.filename or "upload", k, segment, asked, words,
                                          each_photo(group_by), catalog))
                service.latencies.append(time.perf_counter() - t)  # answered: a refusal is counted apart
            return found
        except UsageError as e:  # a bad filter or group-by column (segment was checked above)
            raise HTTPException(422, str(e)) from None
        except ImageDecodeError as e:
            status = 413 if ("refused" in str(e) or "bomb" in str(e)) else 415
            raise HTTPException(status, f"{file.filename or 'the upload'}: {e}") from None
        except PipelineError as e:  # e.g. the segmentation model cannot be loaded
            raise HTTPException(503, str(e)) from None


def _add_file_endpoints(app, service: SearchService) -> None:
    """/thumb/<row>.jpg (a gallery item's thumbnail) and /report (the run's HTML report)."""
    from fastapi import HTTPException, Request
    from fastapi.responses import RedirectResponse, Response

    cfg = service.cfg

    @app.get("/thumb/{row}.jpg")
    def thumb(row: int, request: Request, v: str | None = None) -> Response:
        found = service.thumbnails_of(v)  # v: the store's version the result was given by
        if found is None:
            raise HTTPException(404, "the gallery was updated since these results were given: search again")
        version, thumbnails = found
        if not 0 <= row < len(thumbnails):
            raise HTTPException(404, f"no gallery item {row}")
        # a row holds another photo after an update: the browser asks again each time, and gets the
        # picture only when the store changed (304 otherwise)
        headers = {"Cache-Control": "no-cache", "ETag": service.thumbnail_etag(row, version)}
        asked = {t.strip().removeprefix("W/") for t in request.headers.get("if-none-match", "").split(",")}
        if headers["ETag"] in asked or "*" in asked:
            return Response(status_code=304, headers=headers)
        try:
            return Response(service.thumbnail_jpeg(row, thumbnails), media_type="image/jpeg", headers=headers)
        except PipelineError:  # that version closed meanwhile (two updates since the results)
            raise HTTPException(404, "the gallery was updated since these results were given: search again") from None

    @app.get("/report")
    def report() -> RedirectResponse:
        return RedirectResponse(f"/files/{cfg.plots_dir.relative_to(cfg.output_dir).as_posix()}/report.html")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now, so that a port in use is one clear line, not uvicorn's error
    after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PipelineError(f"port {port} is in use; choose another with --port") from e
        why = e.strerror or e
        raise PipelineError(f"cannot listen on {host}:{port}: {why}; choose another --host or --port") from e
    sock.listen(2048)  # connections wait in the backlog from the moment the address is announced
    return sock


def run_serve(cfg: RunConfig) -> RunSummary:
    """--serve: load once, then answer until interrupted; the summary counts what was answered."""
    try:
        import uvicorn
    except ImportError as e:
        raise UsageError("--serve needs uvicorn: pip install fastapi uvicorn python-multipart") from e
    if cfg.top_k > MAX_K:  # the page asks with the server's k: every query would be refused
        raise UsageError(f"--serve answers at most {MAX_K} results a query; --top-k {cfg.top_k} is over it")
    summary = RunSummary(mode="serve")
    token = required_token(cfg)  # beyond loopback without a token: refused before anything binds
    sock = bind(cfg.serve.host, cfg.serve.port)  # before the model loads: a busy port is said at once
    if fallback := store_embedder_note(cfg, onnx_fallback(cfg)):
        log.info(fallback)
    try:
        service = SearchService.load(cfg, summary)
        server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host  # an IPv6 address: in brackets
        url = f"http://{host}:{cfg.serve.port}/"
        print(terminal_text(f"serving {len(service.catalog):,} items from {cfg.store_dir} at {url} (Ctrl-C to stop)"),
              flush=True)
        if token is not None:
            print(f"the page and its API need the token in ${TOKEN_ENV}: the page asks for it once", flush=True)
        elif cfg.serve.host not in LOOPBACK:
            log.warning("serving on %s without a token (--no-auth): anyone who reaches it can search", cfg.serve.host)
        # SIGTERM and Ctrl-C: uvicorn shuts down cleanly, then raises the signal again for the handler
        # it found; ours takes SIGTERM as the end asked for, so the run ends with its summary, exit 0.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    lat = np.array(service.latencies) * 1000
    summary.count("queries answered", len(lat))
    if service.declined:
        summary.count("queries refused (answered with an error)", len(service.declined))
    if service.updates:
        summary.count("updated stores swapped in", service.updates)
    if service.refused:
        summary.notes.append(service.refused)
    if len(lat):
        summary.notes.append(f"latency p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms")
    return summary
