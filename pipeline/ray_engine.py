"""Ray Data engine for the gallery builds (--engine ray): the same store as the local loop, built on
one machine or a cluster.

Rows are read in parallel tasks (parquet row groups, local or on the hub, or runs of image files),
made into items (decoded, segmented, written, preprocessed) in CPU tasks, and embedded in an actor
pool. Ray Data does not keep order, so every item carries its dataset row; the driver collects them
into the local engine's shards (by row id: a shard is closed when all its rows are in) and writes
them with the same ShardStore, so a killed run resumes from every shard already written and the
final store equals the local engine's.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .dataset import Piece, plan_pieces, read_piece
from .embedders import Embedder, EmbedderSpec, make_embedder
from .errors import PipelineError, UsageError
from .fileio import atomic_write_bytes
from .gallery import ShardAssembler, ShardMark, UnitResult
from .identity import GallerySource, VectorIdentity
from .items import make_segment_items, make_standard_items
from .plots import THUMB_SIZE, make_thumbnail
from .preprocess import model_crop, normalize_crop, resize_for_model
from .remote import is_url, url_writer
from .report import RunSummary
from .store import ManifestRow, Shard, ShardStore, finalize_store, invalidate_store, run_params

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ray[data]'"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--engine ray needs Ray Data: {INSTALL_HINT}") from e
    return ray


_ours = threading.Event()  # set while this process holds a Ray it started (or joined) itself
_stopping: list[threading.Thread] = []


def init_ray(cfg: RunConfig):
    """Join the cluster at --ray-address (or RAY_ADDRESS), or start a local Ray instance with
    --threads CPUs (all cores by default); a Ray already initialized in this process is used as it is."""
    ray = import_ray()
    for thread in _stopping:  # an earlier run's Ray, still stopping
        thread.join()
    _stopping.clear()
    if not ray.is_initialized():
        env = {
            "env_vars": {
                "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
            }
        }
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            ray.init(address=address, runtime_env=env, **quiet)
        else:
            from .embedders import available_cores

            ray.init(
                num_cpus=cfg.embedder.threads or available_cores(), include_dashboard=False, runtime_env=env, **quiet
            )
        _ours.set()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar: the run's own, which counts rows
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours shows
    return ray


def release_ray() -> None:
    """Stop the Ray that init_ray started (or disconnect from the cluster it joined), in a thread:
    a local instance takes 1-2 s to stop, which then overlaps the driver's own stages after the
    build instead of adding to the run. A Ray the caller initialized is left running. The
    interpreter waits for the thread before it exits; the next init_ray waits for it too."""
    if not _ours.is_set():
        return
    _ours.clear()
    import ray

    gc.collect()  # no object references of the build left to be freed while Ray stops
    thread = threading.Thread(target=ray.shutdown, name="ray shutdown")
    thread.start()
    _stopping.append(thread)


def check_shared_folder(ray, folder: Path) -> None:
    """Refuse an output folder that some node of the cluster cannot see (every node must write the
    images and read nothing else, so a node-local path would scatter the gallery)."""
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = folder / f".ray-shared-check.{token}"
    probe.write_text(token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) <= 1:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        def sees(path: str, expected: str) -> bool:
            try:
                return Path(path).read_text() == expected
            except OSError:
                return False

        checks = {
            n["NodeManagerAddress"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe), token)
            for n in nodes
        }
        blind = [addr for addr, ref in checks.items() if not ray.get(ref)]
        if blind:
            raise PipelineError(
                f"--output-dir {folder} is not shared with every node of the Ray cluster "
                f"({', '.join(blind)} cannot see it): use a folder on a filesystem all nodes mount"
            )
    finally:
        probe.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Plan:
    """What every task needs, picklable: the dataset and the output layout."""

    cfg_dataset: Any
    images_dir: str  # a folder every node sees, or a URL (--output-dir s3://...)
    segmented: bool
    segment: Any
    embedder: dict  # EmbedderSpec fields
    device: str
    prep: Any  # the model's PreprocessConfig


class _ItemMaker:
    """Ray task body (an actor for segmentation, whose model loads once): a piece's records become
    their items, files written, pixels preprocessed; one output row per item."""

    def __init__(self, plan: _Plan) -> None:
        self.plan, self.prep = plan, plan.prep
        if plan.segmented:
            from .yolo import make_segmenter

            self.make = make_segment_items(make_segmenter(plan.segment, device=plan.device), plan.segment)
        else:
            self.make = make_standard_items(plan.prep.decode_min_side)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pieces = [Piece(**json.loads(p)) for p in batch["piece"]]
        out: dict[str, list] = {
            "row": [],
            "source_row": [],
            "items_in_row": [],
            "pixels": [],
            "thumb": [],
            "has_pixels": [],
        }
        prep, images = self.prep, self.plan.images_dir
        write = (
            url_writer(images) if is_url(images) else lambda name, data: atomic_write_bytes(Path(images, name), data)
        )
        for piece in pieces:
            records = list(read_piece(self.plan.cfg_dataset, piece))
            for k in range(0, len(records), 8):
                group = records[k : k + 8]
                for rec, items in zip(group, self.make(group)):
                    for item in items:
                        if item.data is not None:
                            write(item.row.file, item.data)
                        embed = item.to_embed
                        if embed:  # uint8 through the object store; the embedder normalizes
                            resized = resize_for_model(item.image, prep)
                            pixels, thumb = model_crop(resized, prep), make_thumbnail(resized)
                        else:
                            pixels = np.zeros((prep.crop_height, prep.crop_width, 3), np.uint8)
                            thumb = np.zeros((THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
                        out["row"].append(json.dumps(asdict(item.row)))
                        out["source_row"].append(rec.source_row)
                        out["items_in_row"].append(len(items))
                        out["pixels"].append(pixels)
                        out["thumb"].append(thumb)
                        out["has_pixels"].append(embed)
        return {
            "row": np.array(out["row"], dtype=object),
            "source_row": np.array(out["source_row"], dtype=np.int64),
            "items_in_row": np.array(out["items_in_row"], dtype=np.int64),
            "pixels": np.stack(out["pixels"])
            if out["pixels"]
            else np.zeros((0, prep.crop_height, prep.crop_width, 3), np.uint8),
            "thumb": np.stack(out["thumb"]) if out["thumb"] else np.zeros((0, THUMB_SIZE, THUMB_SIZE, 3), np.uint8),
            "has_pixels": np.array(out["has_pixels"], dtype=bool),
        }


def _make_items(batch: dict[str, np.ndarray], plan: _Plan) -> dict[str, np.ndarray]:
    """Ray task body for standard builds (no model to load): _ItemMaker made per task."""
    return _ItemMaker(plan)(batch)


class _EmbedActor:
    """Ray actor: one embedder (single-threaded on the CPU), vectors for the items that have pixels.
    jitter_s: sleep up to this long before each batch (tests: batches come back out of order)."""

    def __init__(self, plan: _Plan, jitter_s: float = 0.0, batch_size: int = 32) -> None:
        spec = make_embedder_spec(plan)
        if spec.device != "cuda":
            spec = EmbedderSpec(**{**asdict(spec), "threads": 1})
        self.embedder: Embedder = make_embedder(spec)
        self.prep, self.jitter, self.batch_size = plan.prep, jitter_s, batch_size
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.jitter:
            time.sleep(float(self.rng.uniform(0, self.jitter)))
        n = len(batch["row"])
        vectors = np.zeros((n, self.embedder.dim), np.float32)
        has = batch["has_pixels"]
        rows = np.flatnonzero(has)
        for k in range(0, len(rows), self.batch_size):  # --batch-size, whatever the block's size
            part = rows[k : k + self.batch_size]
            pixels = np.stack([normalize_crop(batch["pixels"][i], self.prep) for i in part])
            vectors[part] = self.embedder.embed_serial(pixels)
        return {
            "row": batch["row"],
            "source_row": batch["source_row"],
            "items_in_row": batch["items_in_row"],
            "thumb": batch["thumb"],
            "has_pixels": has,
            "vector": vectors,
        }


class _ItemsAndVectors:
    """Ray actor for CPU builds: a piece's items made and embedded in one process."""

    def __init__(self, plan: _Plan, jitter_s: float = 0.0, batch_size: int = 32) -> None:
        self.items, self.vectors = _ItemMaker(plan), _EmbedActor(plan, jitter_s, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.vectors(self.items(batch))


def make_embedder_spec(plan: _Plan) -> EmbedderSpec:
    return EmbedderSpec(**plan.embedder)


def _no_embedding(inputs: list) -> Any:
    raise AssertionError("the Ray engine's items arrive embedded")


class _Collector:
    """The driver's side: items arrive in any order; a shard is closed (rows in order, numbered by the
    same ShardAssembler as the local loop) once every row of its range is in, and written at once."""

    def __init__(self, shards: ShardStore, plan_rows: dict[int, tuple[int, int]], batch_size: int, dim: int) -> None:
        self.shards, self.plan_rows, self.dim = shards, plan_rows, dim
        self.assembler = ShardAssembler(_no_embedding, batch_size, dim)  # vectors arrive made
        self.items: dict[int, dict[int, list]] = {n: {} for n in plan_rows}
        self.shard_of: dict[int, int] = {}
        self.done: dict[int, Shard] = {}

    def add(self, batch: dict[str, np.ndarray], shard_rows: int) -> int:
        finished = 0
        for k in range(len(batch["row"])):
            row = int(batch["source_row"][k])
            number = row // shard_rows
            bucket = self.items[number].setdefault(row, [])
            bucket.append(
                (
                    ManifestRow(**json.loads(batch["row"][k])),
                    bool(batch["has_pixels"][k]),
                    batch["thumb"][k],
                    batch["vector"][k],
                    int(batch["items_in_row"][k]),
                )
            )
            if len(bucket) == bucket[0][4]:
                finished += 1
                start, stop = self.plan_rows[number]
                if len(self.items[number]) == stop - start and all(
                    len(v) == v[0][4] for v in self.items[number].values()
                ):
                    self._close(number)
        return finished

    def _close(self, number: int) -> None:
        start, stop = self.plan_rows[number]
        for row in sorted(self.items[number]):
            entries = sorted(self.items[number][row], key=lambda e: e[0].person)
            res = UnitResult(rows=[e[0] for e in entries], records=1)
            for pos, (_, has, thumb, _, _) in enumerate(entries):
                if has:
                    res.embedded.append(pos)
                    res.thumbs.append(np.asarray(thumb))
            res.vectors = np.array([e[3] for e in entries if e[1]], np.float32).reshape(-1, self.dim)
            self.assembler.add(res)
        shard = self.assembler.close(ShardMark(number, start, stop))
        self.shards.write(shard)
        shard.thumbnails = None
        self.done[number] = shard
        del self.items[number]


def build_gallery_ray(
    cfg: RunConfig,
    summary: RunSummary,
    load_embedder: Callable[[], Embedder],
    source: GallerySource,
) -> tuple[np.ndarray, list[ManifestRow], Embedder]:
    """Build (or resume) the run's gallery store on Ray Data; the same store as gallery.build_gallery.
    The driver's model (for the store's identity, and the run's later stages) loads while Ray starts.

    FASHION_RAY_EMBED_JITTER (seconds, tests only) makes each embedding batch wait up to that long,
    so that batches come back out of order. FASHION_RAY_SPLIT_STAGES=1 (tests) lays a CPU run out as
    a GPU run is: item tasks feeding a separate embedding actor pool.
    """
    with summary.stage("ray start + load model"), ThreadPoolExecutor(1, thread_name_prefix="model") as pool:
        loading = pool.submit(load_embedder)
        ray = init_ray(cfg)
        if not cfg.output_url:  # a URL output: the workers write the images there, the driver the rest
            check_shared_folder(ray, cfg.output_dir)
        embedder = loading.result()
    # A failed run leaves Ray to its exit handler, as the run's objects are released before it.
    emb, rows = _build(ray, cfg, summary, embedder, embedder.identity.asks(pixels="pil"), source)
    return emb, rows, embedder


def _build(
    ray, cfg: RunConfig, summary: RunSummary, embedder: Embedder, identity: VectorIdentity, source: GallerySource
) -> tuple[np.ndarray, list[ManifestRow]]:
    jitter_s = float(os.environ.get("FASHION_RAY_EMBED_JITTER", "0") or 0)
    split_stages = os.environ.get("FASHION_RAY_SPLIT_STAGES") == "1"
    if not cfg.output_url:
        cfg.images_dir.mkdir(parents=True, exist_ok=True)
    cfg.store_dir.mkdir(parents=True, exist_ok=True)
    invalidate_store(cfg.store_dir)
    shards = ShardStore(cfg.store_dir, run_params(source, identity, cfg.batch_size, cfg.shard_rows), fresh=cfg.fresh)
    done = shards.all_complete()
    pieces = plan_pieces(cfg.dataset)
    total = sum(p.rows for p in pieces)
    ranges = {n: (n * cfg.shard_rows, min(total, (n + 1) * cfg.shard_rows)) for n in range(-(-total // cfg.shard_rows))}
    todo = {n: r for n, r in ranges.items() if n not in done}
    if done:
        summary.notes.append(f"resumed: {len(done)} of {len(ranges)} shard(s) already complete")
    # Pieces that touch a shard still to do (a piece crossing into a done shard is cut: rows by id).
    wanted = [p for p in _split_at_shards(pieces, cfg.shard_rows) if p.first_row // cfg.shard_rows in todo]
    plan = _Plan(
        cfg.dataset,
        cfg.images_url or str(cfg.images_dir),
        cfg.segmented,
        cfg.segment,
        asdict(cfg.embedder),
        getattr(embedder, "device", "cpu"),
        embedder.preprocess_cfg,
    )
    cores = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0)) if plan.device == "cuda" else 0
    wanted = _smaller_at_the_end(wanted, workers=cores)
    collector = _Collector(shards, todo, cfg.batch_size, embedder.dim)
    split = bool(gpus) or split_stages
    t0 = time.perf_counter()
    if wanted:
        ds = ray.data.from_items([{"piece": json.dumps(asdict(p))} for p in wanted], override_num_blocks=len(wanted))
        if cfg.segmented:  # the segmenter loads once per actor
            ds = ds.map_batches(
                _ItemMaker,
                fn_constructor_args=(plan,),
                compute=ray.data.ActorPoolStrategy(size=max(1, cores // 2)),
                batch_size=1,
                num_cpus=0.5,
            )
            embed_args = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}
        elif split:  # items in CPU tasks feed the GPU actors
            ds = ds.map_batches(_make_items, fn_kwargs={"plan": plan}, batch_size=1, num_cpus=1)
            embed_args = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}
        else:
            # Embedding on the CPU: one actor a core makes a piece's items and embeds them, as a
            # lane of the local engine does; the pixels never cross processes. Measured on 2 cores,
            # 2,000 images: Ray's overhead against local was +40% with item actors feeding
            # embedding actors, +35% with Ray Data fusing item tasks into them, and the README's
            # figure this way.
            ds = ds.map_batches(
                _ItemsAndVectors,
                fn_constructor_args=(plan, jitter_s, cfg.batch_size),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=max(1, cores)),
                num_cpus=1,
            )
        if cfg.segmented or split:
            ds = ds.map_batches(
                _EmbedActor,
                fn_constructor_args=(plan, jitter_s, cfg.batch_size),
                batch_size=cfg.batch_size,
                compute=ray.data.ActorPoolStrategy(size=max(1, gpus or cores)),
                **embed_args,
            )
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=sum(r[1] - r[0] for n, r in ranges.items() if n in done),
            unit="row",
            desc=f"ray -> {cfg.store_dir.name}",
            disable=not cfg.progress,
        )
        first = None
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                first = first or time.perf_counter() - t0
                bar.update(collector.add(batch, cfg.shard_rows))
        finally:
            bar.close()
        summary.notes.append(f"ray: first rows back {first or 0:.1f} s after the start")
        log.debug("Ray Data stats:\n%s", ds.stats())
        batch = ds = None
    missing = [n for n in todo if n not in collector.done]
    if missing:
        raise PipelineError(
            f"the Ray run ended without rows of shard(s) {missing[:5]}: rerun the same command to resume"
        )
    release_ray()  # the rest is the driver's, and no views of Ray's object store are left
    summary.stages["embed stage (wall, ray)"] = time.perf_counter() - t0
    summary.notes.append(
        f"engine: Ray Data on {cores} CPU(s){f' and {gpus} GPU(s)' if gpus else ''}, {len(wanted)} piece(s)"
    )
    all_shards = [(done | collector.done)[n] for n in sorted(ranges)]
    with summary.stage("finalize store"):
        emb, rows = finalize_store(cfg.store_dir, shards, all_shards, identity, source, embedder.dim, THUMB_SIZE)
        shards.remove()
    return emb, rows


def _split_at_shards(pieces: list[Piece], shard_rows: int) -> list[Piece]:
    """Cut pieces where shards start, so every piece belongs to one shard."""
    out = []
    for p in pieces:
        start = p.first_row
        while start < p.first_row + p.rows:
            end = min(p.first_row + p.rows, (start // shard_rows + 1) * shard_rows)
            out.append(p.cut(start, end))
            start = end
    return out


def _smaller_at_the_end(pieces: list[Piece], workers: int, min_rows: int = 8) -> list[Piece]:
    """Cut the last pieces smaller, so that the workers run out of work together (guided
    self-scheduling): walking back from the end, a piece holds at most a (2 * workers - 1)th of the
    rows after it, and at least min_rows. On 2 cores, 2,000 rows in row groups of 50, one actor
    otherwise idled 1.6-2 s at the end. Pieces on the hub are left whole: each cut of a row group
    reads all of it again over the network."""
    out: list[Piece] = []
    tail = 0
    for p in reversed(pieces):
        stop = p.first_row + p.rows
        while stop > p.first_row:
            start = max(p.first_row, stop - max(min_rows, tail // (2 * workers - 1)))
            if start - p.first_row < min_rows or p.location.startswith("hf://"):
                start = p.first_row  # no sliver left over
            out.append(p.cut(start, stop))
            tail += stop - start
            stop = start
    return out[::-1]
