"""--serve: a local search page over a cached gallery. Type a text or upload a picture (optionally
cut into its persons, each a query) and see the gallery's top-k; the run's HTML report is served too.

FastAPI on uvicorn, bound to 127.0.0.1 unless --host says otherwise. The model, the store and its
index are loaded once; a query is answered exactly as --query-text / --query-image answer it (same
embedder, same search). Uploads are checked before they are decoded: over MAX_UPLOAD_BYTES, not an
image, or a picture whose header claims too many pixels get a 4xx with the reason, and the app goes
on serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime,
# and those name classes imported inside create_app (FastAPI loads only for --serve).
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .catalog import load_gallery_cache, segmenter_factory
from .config import RunConfig
from .embedders import Embedder, make_embedder, on_cuda
from .errors import PipelineError, UsageError
from .images import ImageDecodeError, decode_image, encode_jpeg
from .index import GalleryIndex, load_index
from .persons import Segmenter, person_crop
from .preprocess import preprocess_batch
from .report import RunSummary
from .retrieval import topk_neighbours
from .store import GalleryCache

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 << 20
MAX_TEXT_CHARS = 500
MAX_K = 100
PAGE = Path(__file__).parent / "templates" / "search.html"


@dataclass
class SearchService:
    """What the app answers with: the model, the cached gallery and its index, loaded once."""

    cfg: RunConfig
    embedder: Embedder
    cache: GalleryCache
    index: GalleryIndex | None
    segmenter: Segmenter | None = None
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, cfg: RunConfig) -> "SearchService":
        embedder = make_embedder(cfg.embedder)
        cache = load_gallery_cache(cfg, identity=embedder.identity)
        index = (
            None
            if cfg.index == "none"
            else load_index(
                cfg.store_dir,
                cache.embeddings,
                cache.sidecar.embeddings_sha256,
                gpu=on_cuda(embedder),
            )
        )
        return cls(cfg, embedder, cache, index)

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Top-k for each query vector, as the query mode ranks them."""
        nb = (
            self.index.search(vectors, k)
            if self.index is not None
            else topk_neighbours(vectors, self.cache.embeddings, k)
        )
        embedded = self.cache.embedded_rows
        return [
            [
                {
                    "rank": r + 1,
                    "row": int(j),
                    "file": embedded[j].file,
                    "line": embedded[j].index,
                    "distance": round(float(d), 6),
                }
                for r, (j, d) in enumerate(zip(nb.indices[q], nb.distances[q]))
                if j >= 0
            ]
            for q in range(len(vectors))
        ]

    def text(self, text: str, k: int) -> list[dict[str, Any]]:
        return self.search(self.embedder.embed_text([text]), k)[0]

    def image(self, data: bytes, name: str, k: int, segment: bool) -> list[dict[str, Any]]:
        """An uploaded picture's queries: the picture, or each person in it. Raises ImageDecodeError."""
        image = decode_image(data).image
        crops = [(name, image)]
        if segment:
            with self.lock:  # one segmenter, loaded on first use; Ultralytics models are not thread-safe
                if self.segmenter is None:
                    self.segmenter = segmenter_factory(self.cfg)
                arr = np.asarray(image)
                persons = self.segmenter.segment([arr])[0]
            found = [(f"{name}#p{k_}", person_crop(arr, p)) for k_, p in enumerate(persons)]
            crops = [(label, Image.fromarray(c)) for label, c in found if c is not None] or crops
        vectors = self.embedder.embed(preprocess_batch([c for _, c in crops], self.embedder.preprocess_cfg))
        return [{"label": label, "results": res} for (label, _), res in zip(crops, self.search(vectors, k))]

    def thumbnail_jpeg(self, row: int) -> bytes:
        with self.lock:
            reader = self.cache.thumbnails()
            try:
                tile = reader[row].copy()
            finally:
                reader.close()
        return encode_jpeg(Image.fromarray(tile), quality=88)


def create_app(service: SearchService):
    """The FastAPI app over a loaded SearchService."""
    try:
        from fastapi import FastAPI, File, Form, HTTPException, UploadFile
        from fastapi.responses import HTMLResponse, RedirectResponse, Response
        from fastapi.staticfiles import StaticFiles
        from pydantic import BaseModel
    except ImportError as e:
        raise UsageError(
            f"--serve needs FastAPI and uvicorn ({e}): pip install fastapi uvicorn python-multipart"
        ) from e

    app = FastAPI(title="Fashion visual search", docs_url=None, redoc_url=None)
    cfg, embedded = service.cfg, service.cache.embedded_rows
    page = PAGE.read_text(encoding="utf-8")

    class TextQuery(BaseModel):
        text: str
        k: int = cfg.top_k

    def timed(fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            service.latencies.append(time.perf_counter() - t)

    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be between 1 and {MAX_K}, got {k}")
        return k

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "items": len(embedded),
            "store": str(cfg.store_dir),
            "model": service.embedder.identity.get("model", ""),
            "backend": service.embedder.identity.get("backend"),
            "k": cfg.top_k,
            "search": service.index.describe() if service.index else "exact",
            "report": (cfg.plots_dir / "report.html").is_file(),
        }

    @app.post("/api/text")
    def text(query: TextQuery) -> dict[str, Any]:
        words = query.text.strip()
        if not words:
            raise HTTPException(422, "type something to search for")
        if len(words) > MAX_TEXT_CHARS:
            raise HTTPException(413, f"the text is {len(words)} characters; at most {MAX_TEXT_CHARS}")
        k = check_k(query.k)
        return {"query": words, "results": timed(lambda: service.text(words, k))}

    @app.post("/api/image")
    def image(file: UploadFile = File(...), segment: bool = Form(False), k: int = Form(cfg.top_k)) -> dict[str, Any]:
        check_k(k)
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the upload is over {MAX_UPLOAD_BYTES >> 20} MB")
        if not data:
            raise HTTPException(422, "the upload is empty")
        try:
            return {"queries": timed(lambda: service.image(data, file.filename or "upload", k, segment))}
        except ImageDecodeError as e:
            status = 413 if ("refused" in str(e) or "bomb" in str(e)) else 415
            raise HTTPException(status, f"{file.filename or 'the upload'}: {e}") from None
        except PipelineError as e:  # e.g. the segmentation model cannot be loaded
            raise HTTPException(503, str(e)) from None

    @app.get("/thumb/{row}.jpg")
    def thumb(row: int) -> Response:
        if not 0 <= row < len(embedded):
            raise HTTPException(404, f"no gallery item {row}")
        return Response(service.thumbnail_jpeg(row), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/report")
    def report() -> RedirectResponse:
        return RedirectResponse(f"/files/{cfg.plots_dir.relative_to(cfg.output_dir).as_posix()}/report.html")

    app.mount("/files", StaticFiles(directory=str(cfg.output_dir)), name="files")
    return app


def run_serve(cfg: RunConfig) -> RunSummary:
    """--serve: load once, then answer until interrupted; the summary counts what was answered."""
    try:
        import uvicorn
    except ImportError as e:
        raise UsageError("--serve needs uvicorn: pip install fastapi uvicorn python-multipart") from e
    summary = RunSummary(mode="serve")
    with summary.stage("load model, gallery and index"):
        service = SearchService.load(cfg)
    app = create_app(service)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/"
    print(
        f"serving {len(service.cache.embedded_rows):,} items from {cfg.store_dir} at {url} (Ctrl-C to stop)", flush=True
    )
    try:
        uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    lat = np.array(service.latencies) * 1000
    summary.count("queries answered", len(lat))
    if len(lat):
        summary.notes.append(f"latency p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms")
    return summary
