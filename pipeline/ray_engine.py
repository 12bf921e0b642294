"""Ray Data engine for the gallery builds (--engine ray): the same store as the local loop, built on
one machine or a cluster.

Rows are read in parallel tasks (parquet row groups, local or on the hub, or runs of image files),
made into items (decoded, segmented, written, preprocessed) in CPU tasks, and embedded in an actor
pool. Ray Data does not keep order, so every item carries its dataset row; the driver collects them
into the local engine's shards (by row id: a shard is closed when all its rows are in) and writes
them with the same ShardStore, so a killed run resumes from every shard already written and the
final store equals the local engine's.

Test seams (tests replace them; nothing else does): `plan_pieces` (the order pieces are handed over),
`split_layout` (the GPU layout on CPUs), `Collector.add` (the order rows come back in).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DatasetSpec, Piece, dataset_stamp, plan_pieces, read_piece
from .embedders import Embedder, EmbedderSpec, available_cores, make_embedder, on_cuda
from .errors import PipelineError, UsageError, first_line
from .gallery import RESUMED_COUNT, ShardAssembler, ShardMark, UnitResult
from .identity import GallerySource, VectorIdentity
from .items import ItemPipeline, image_reader, make_segment_items, make_standard_items, sign_resumed, write_image
from .plots import THUMB_SIZE
from .preprocess import PIL_PIXELS, PreprocessConfig, normalize_crop
from .remote import is_url, url_writer
from .report import RunSummary
from .store import ManifestRow, Shard, ShardStore, StoreBuild, run_params
from .yolo import SegmentSpec, make_segmenter

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


SHUTDOWN_THREAD = "ray shutdown"


@dataclass(frozen=True)
class RayBuild:
    """What a Ray gallery build needs (galleries.py makes it from the run's configuration).

    images: the folder every node writes the images to, or a URL (--output-dir s3://...).
    segment: the segmenter's settings for a segmented gallery; None for whole images.
    address: a Ray cluster to join (None: $RAY_ADDRESS, else a local Ray with `cpus` CPUs, 0: all).
    """

    dataset: DatasetSpec
    embedder: EmbedderSpec
    segment: SegmentSpec | None
    images: str
    store_dir: Path
    batch_size: int
    shard_rows: int
    fresh: bool = False
    progress: bool = True
    address: str | None = None
    cpus: int = 0
    rows: frozenset[int] | None = None  # only these dataset rows (--update's new photos); None: every row
    segmenter_weights: str | None = None  # the sha256 of the segmenter's local weights file (store.run_params)
    pixels: str = PIL_PIXELS  # the workers' resizer (preprocess.CPU_PIXELS)


class RaySession:
    """The Ray a build runs on: one this process started or joined (`ours`: stopped again by
    `release`, in a thread named SHUTDOWN_THREAD, so that it overlaps the driver's later stages), or
    one the caller had initialized (left running). A new session waits for an earlier one's stop."""

    def __init__(self, address: str | None, cpus: int) -> None:
        ray = import_ray()
        for thread in threading.enumerate():  # an earlier run's Ray, still stopping
            if thread.name == SHUTDOWN_THREAD:
                thread.join()
        self.ray, self.ours = ray, not ray.is_initialized()
        self.started = False  # a Ray this run started on this machine (not a cluster it joined)
        # ray.init puts its own SIGTERM handler in (sys.exit): the run's own (main.py: taken as Ctrl-C, the
        # work kept and said, exit 143) is put back after it
        on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        if self.ours:
            env = {
                "env_vars": {
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
                    )
                }
            }
            named = "--ray-address" if address else "RAY_ADDRESS"
            address = address or os.environ.get("RAY_ADDRESS")
            quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
            # A Ray this run starts keeps Ray's default token authentication; its notice that it did so
            # is not printed on every run.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            if address:
                # token mode with no token here (Ray 2.52 on; ConnectionError stands in before it)
                auth_error = getattr(ray.exceptions, "AuthenticationError", ConnectionError)
                probe_cluster(address, named)  # Ray itself retries an address nothing answers for ~14 minutes
                try:
                    ray.init(address=address, runtime_env=env, **quiet)
                except (ConnectionError, auth_error) as e:
                    raise PipelineError(cannot_join(address, e)) from e
                except ValueError as e:  # an address of no form Ray reads
                    raise UsageError(f"{named} {address!r}: {first_line(e)}; {ADDRESS_FORMS}") from e
            else:  # "local": not the cluster a `ray start` left on this machine, which Ray would join
                # and then refuse num_cpus for (`--ray-address auto` joins that one)
                self.started = True
                ray.init(
                    address="local",
                    num_cpus=cpus or available_cores(),
                    include_dashboard=False,
                    runtime_env=env,
                    **quiet,
                )
        if on_term is not None and signal.getsignal(signal.SIGTERM) is not on_term:
            signal.signal(signal.SIGTERM, on_term)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar: the run's own, which counts rows
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if not log.isEnabledFor(logging.DEBUG):  # a dead worker's traceback: the run's one line says it (-v shows it)
            logging.getLogger("ray.data._internal.execution.streaming_executor_state").setLevel(logging.CRITICAL)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        # A dataset of fewer pieces than actors (a small catalogue) is not a problem worth a warning.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        # max_restarts (an own Ray's, _layout) has no argument of its own yet (Ray 2.60): passed as a remote
        # arg, which Ray says on every run is deprecated (until 2.64)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")

    def release(self) -> None:
        """Stop the Ray this session started (or leave the cluster it joined); a local instance
        takes 1-2 s to stop. The interpreter waits for the thread before it exits."""
        if not self.ours:
            return
        self.ours = False
        gc.collect()  # no object references of the build left to be freed while Ray stops
        threading.Thread(target=self.ray.shutdown, name=SHUTDOWN_THREAD).start()


ADDRESS_FORMS = "give the head's host:port (its GCS port, e.g. 10.0.0.5:6379) or auto"
PROBE_SECONDS = 5.0
# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (a Ray head's GCS) answers with a
# SETTINGS frame of its own (frame type 4 in the header's fourth byte); anything else is not a Ray head
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_cluster(address: str, named: str) -> None:
    """A host:port that no process answers is refused at once, and so is one where something other
    than a Ray head answers (a dashboard's 8265, a mistyped port): Ray's own join retries either for
    many minutes. A Ray Client address (ray://) is refused: Ray Data does not run over it (Ray's
    maintainers, ray-project/ray#48682). `auto` and `local` are left to Ray."""
    import socket

    if address in ("auto", "local"):
        return
    if address.lower().startswith("ray://"):
        raise UsageError(f"{named} {address!r}: Ray Data does not run through Ray Client (ray://); run the command "
                         "on a node of the cluster with --ray-address auto, or give the head's GCS address, "
                         "host:6379")
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"{named} {address!r} is no cluster address: {ADDRESS_FORMS}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "", "false"):  # TLS: no plain preface to send
                conn.sendall(HTTP2_PREFACE)
                answer = _read_some(conn, 9)
                if len(answer) < 4 or answer[3] != 4:
                    raise PipelineError(
                        f"cannot join the Ray cluster at {address}: something answers there, but not a Ray head (it "
                        f"does not speak gRPC{_shown(answer)}); the head's GCS port is 6379 unless `ray start "
                        "--port` chose another (8265 is its dashboard, 10001 its Ray Client server)")
    except OSError as e:
        raise PipelineError(cannot_join(address, e)) from e


def _read_some(conn, n: int) -> bytes:
    """Up to n bytes, as they come within the connection's timeout; what came when it closes or times out."""
    got = b""
    try:
        while len(got) < n and (chunk := conn.recv(n - len(got))):
            got += chunk
    except OSError:
        pass
    return got


def _shown(answer: bytes) -> str:
    """What a non-gRPC service answered, in a few printable characters (an HTTP server's status line)."""
    text = answer.decode("latin-1")
    return f": it answered {text!r}" if text.isprintable() and text.strip() else ""


def cannot_join(address: str, e: BaseException) -> str:
    """Why a run could not join the cluster at `address`, and the two usual remedies: Ray sends the
    token of a cluster with token authentication (its default where ~/.ray/auth_token exists) to an
    address named explicitly only when asked to."""
    asked = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    auth = (
        "with RAY_AUTH_MODE=token set, the token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) "
        "must be the cluster's"
        if asked
        else "a cluster with token authentication (Ray's default) is joined only with RAY_AUTH_MODE=token "
        "and its token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    )
    return (
        f"cannot join the Ray cluster at {address} ({first_line(e)}): check that it runs "
        f"(`ray status` on its head); {auth}"
    )


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

        checks = {  # by node: two nodes on one host share an address, and each is checked
            f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})": sees.options(
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
    """What every task needs, picklable: the build and the model's device and preprocessing (pixels:
    the CPU's resizer, preprocess.CPU_PIXELS)."""

    build: RayBuild
    device: str
    prep: PreprocessConfig
    pixels: str
    # the driver's working folder: a dataset cell that names its picture by a relative path (rel/a.jpg)
    # is read from there, as the local engine reads it, not from a joined cluster's worker's own folder
    cwd: str = ""


class _ItemMaker:
    """Ray task body (an actor for segmentation, whose model loads once): a piece's records go
    through the item pipeline (items.ItemPipeline, as in the local engine); one output row per item,
    its pixels still the uint8 crop (a quarter of the bytes through the object store)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan, self.prep = plan, plan.prep
        if plan.cwd and Path(plan.cwd).is_dir() and Path.cwd() != Path(plan.cwd):
            os.chdir(plan.cwd)  # this job's worker process: its pieces' relative cell paths are the driver's
        segment = plan.build.segment
        if segment is not None:
            make = make_segment_items(make_segmenter(segment, device=plan.device), segment)
        else:
            make = make_standard_items(plan.prep.decode_min_side)
        images = plan.build.images
        write = url_writer(images) if is_url(images) else partial(write_image, Path(images))
        self.pipeline = ItemPipeline(make, write, plan.prep, plan.pixels, crop_only=True)

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
        prep = self.prep
        blank_pixels = np.zeros((prep.crop_height, prep.crop_width, 3), np.uint8)
        blank_thumb = np.zeros((THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
        for piece in pieces:
            build = self.plan.build
            records = [r for r in read_piece(build.dataset, piece) if wanted_row(build, r.source_row)]
            for k in range(0, len(records), 8):
                group = records[k : k + 8]
                for rec, items in zip(group, self.pipeline(group).items):
                    for item in items:
                        embed = item.pixels is not None
                        out["row"].append(json.dumps(asdict(item.row)))
                        out["source_row"].append(rec.source_row)
                        out["items_in_row"].append(len(items))
                        out["pixels"].append(item.pixels if embed else blank_pixels)
                        out["thumb"].append(item.thumb if embed else blank_thumb)
                        out["has_pixels"].append(embed)
        return {
            "row": np.array(out["row"], dtype=object),
            "source_row": np.array(out["source_row"], dtype=np.int64),
            "items_in_row": np.array(out["items_in_row"], dtype=np.int64),
            "pixels": np.stack(out["pixels"]) if out["pixels"] else blank_pixels[None][:0],
            "thumb": np.stack(out["thumb"]) if out["thumb"] else blank_thumb[None][:0],
            "has_pixels": np.array(out["has_pixels"], dtype=bool),
        }


def _make_items(batch: dict[str, np.ndarray], plan: _Plan) -> dict[str, np.ndarray]:
    """Ray task body for standard builds (no model to load): _ItemMaker made per task."""
    return _ItemMaker(plan)(batch)


class _EmbedActor:
    """Ray actor: one embedder (single-threaded on the CPU), vectors for the items that have pixels."""

    def __init__(self, plan: _Plan) -> None:
        spec = plan.build.embedder
        if spec.device != "cuda":
            spec = replace(spec, threads=1)
        self.embedder: Embedder = make_embedder(spec)
        self.prep, self.batch_size = plan.prep, plan.build.batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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

    def __init__(self, plan: _Plan) -> None:
        self.items, self.vectors = _ItemMaker(plan), _EmbedActor(plan)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.vectors(self.items(batch))


def split_layout(gpus: int) -> bool:
    """Whether item tasks feed a separate embedding actor pool (the GPU layout) rather than one actor
    a core making and embedding its own items. The tests replace this to run the GPU layout on CPUs."""
    return gpus > 0


def _no_embedding(inputs: list) -> Any:
    raise AssertionError("the Ray engine's items arrive embedded")


def wanted_row(build: RayBuild, row: int) -> bool:
    return build.rows is None or row in build.rows


def _wanted_in(build: RayBuild, rows: tuple[int, int]) -> int:
    """How many rows of [start, stop) the build asks for."""
    start, stop = rows
    return stop - start if build.rows is None else sum(1 for row in build.rows if start <= row < stop)


class Collector:
    """The driver's side: items arrive in any order; a shard is closed (rows in order, numbered by the
    same ShardAssembler as the local loop) once every row of its range is in, and written at once."""

    def __init__(self, shards: ShardStore, plan_rows: dict[int, tuple[int, int]], batch_size: int, dim: int,
                 expected: dict[int, int] | None = None) -> None:
        self.shards, self.plan_rows, self.dim = shards, plan_rows, dim
        # rows each shard waits for: its whole range, or the rows of it a partial build asks for
        self.expected = expected or {n: stop - start for n, (start, stop) in plan_rows.items()}
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
                if len(self.items[number]) == self.expected[number] and all(
                    len(v) == v[0][4] for v in self.items[number].values()
                ):
                    self.close(number)
        return finished

    def close(self, number: int) -> None:
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
    build: RayBuild,
    summary: RunSummary,
    load_embedder: Callable[[], Embedder],
    source: GallerySource,
) -> tuple[np.ndarray, list[ManifestRow], Embedder]:
    """Build (or resume) a gallery store on Ray Data; the same store as gallery.build_gallery.
    The driver's model (for the store's identity, and the run's later stages) loads while Ray starts."""
    session: RaySession | None = None
    try:
        with summary.stage("ray start + load model"), ThreadPoolExecutor(1, thread_name_prefix="model") as pool:
            loading = pool.submit(load_embedder)
            session = RaySession(build.address, build.cpus)
            if not is_url(build.images):  # a URL output: the workers write the images there, the driver the rest
                check_shared_folder(session.ray, build.store_dir.parent)
            embedder = loading.result()
    except BaseException:
        if session is not None:  # the model that failed to load, or a folder the nodes do not share: Ray stopped
            session.release()
        raise
    try:
        emb, rows = _build(session, build, summary, embedder, embedder.identity.asks(pixels=build.pixels), source)
    except BaseException:
        session.release()  # a Ray this run started is stopped after a failure too (the next run starts its own)
        raise
    return emb, rows, embedder


def _build(
    session: RaySession,
    build: RayBuild,
    summary: RunSummary,
    embedder: Embedder,
    identity: VectorIdentity,
    source: GallerySource,
) -> tuple[np.ndarray, list[ManifestRow]]:
    ray = session.ray
    if not is_url(build.images):
        Path(build.images).mkdir(parents=True, exist_ok=True)
    params = run_params(source, identity, build.batch_size, build.shard_rows, build.rows, dataset_stamp(build.dataset),
                        build.segmenter_weights)
    store = StoreBuild(build.store_dir, params, build.fresh)
    shards = store.shards
    done = shards.all_complete()
    pieces = plan_pieces(build.dataset)
    total = sum(p.rows for p in pieces)
    size = build.shard_rows
    ranges = {n: (n * size, min(total, (n + 1) * size)) for n in range(-(-total // size))}
    todo = {n: r for n, r in ranges.items() if n not in done}
    expected = {n: _wanted_in(build, r) for n, r in todo.items()}
    initial = sum(_wanted_in(build, r) for n, r in ranges.items() if n in done)  # rows asked for, already done
    asked = total if build.rows is None else len(build.rows)
    if done:  # counted in rows: an update's shards without new rows in them are complete but hold none
        summary.notes.append(f"resumed: {initial:,} of {asked:,} row(s) already done ({len(done)} of {len(ranges)} "
                             "shard(s) complete)")
        # the stopped run's items counted apart, as the local engine counts them: "embedded" is this run's
        summary.count(RESUMED_COUNT, sum(len(shard.embeddings) for shard in done.values()))
    # Pieces that touch a shard still to do (a piece crossing into a done shard is cut: rows by id).
    wanted = [p for p in split_at_shards(pieces, build.shard_rows) if p.first_row // build.shard_rows in todo
              and any(wanted_row(build, row) for row in range(p.first_row, p.first_row + p.rows))]
    plan = _Plan(build, "cuda" if on_cuda(embedder) else "cpu", embedder.preprocess_cfg, build.pixels,
                 cwd=str(Path.cwd()))
    resources = ray.cluster_resources()
    cores = int(resources.get("CPU", 0))
    if cores < 1:  # its actors would wait for a CPU forever (Ray says "may hang forever" after a minute)
        raise PipelineError(f"the Ray cluster has no CPU to run the build's workers on ({resources}): start its "
                            "nodes with CPUs (ray start --num-cpus N), or build without --engine ray")
    gpus = int(resources.get("GPU", 0)) if plan.device == "cuda" else 0
    wanted = smaller_at_the_end(wanted, workers=cores)
    collector = Collector(shards, todo, build.batch_size, embedder.dim, expected)
    for n in [n for n in todo if expected[n] == 0]:  # nothing asked for in its rows: an empty shard
        collector.close(n)
    t0 = time.perf_counter()
    if wanted:
        _gather(_layout(ray, wanted, plan, cores, gpus, own_ray=session.started), collector, build, (asked, initial),
                summary)
    missing = [n for n in todo if n not in collector.done]
    if missing:
        raise PipelineError(
            f"the Ray run ended without rows of shard(s) {missing[:5]}: rerun the same command to resume"
        )
    session.release()  # the rest is the driver's, and no views of Ray's object store are left
    summary.timed("embed", time.perf_counter() - t0, "embed stage (wall, ray)")
    summary.notes.append(
        f"engine: Ray Data on {cores} CPU(s){f' and {gpus} GPU(s)' if gpus else ''}, {len(wanted)} piece(s)"
    )
    all_shards = [(done | collector.done)[n] for n in sorted(ranges)]
    # shards of an earlier run: signed by an earlier signature version, maybe
    sign_resumed([r for shard in done.values() for r in shard.rows], image_reader(build.images),
                 embedder.preprocess_cfg.decode_min_side, summary, threads=available_cores(), progress=build.progress)
    with summary.stage("finalize store"):
        emb, rows = store.finalize(all_shards, identity, source, embedder.dim, THUMB_SIZE,
                                    onnx_file=embedder.source_file)
    return emb, rows


def _layout(ray, wanted: list[Piece], plan: _Plan, cores: int, gpus: int, own_ray: bool = False):
    """The Ray Data pipeline over the pieces: items made (and embedded) in actors or tasks.

    own_ray: the Ray this run started on this machine. Its actors are not restarted (Ray Data's
    default restarts them forever): no node is lost there, an actor that dies fails the run, which
    resumes from its shards, and Ray no longer says at error level on every run (-q too) that a
    restartable actor has constructor arguments in its object store. On a cluster it joined, Ray's
    fault tolerance is kept (and so is that line)."""
    restarts: dict[str, Any] = {"max_restarts": 0} if own_ray else {}
    ds = ray.data.from_items([{"piece": json.dumps(asdict(p))} for p in wanted], override_num_blocks=len(wanted))
    segmented, split = plan.build.segment is not None, split_layout(gpus)
    embed_args = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}
    if segmented:  # the segmenter loads once per actor
        ds = ds.map_batches(
            _ItemMaker,
            fn_constructor_args=(plan,),
            **restarts,
            compute=ray.data.ActorPoolStrategy(size=max(1, cores // 2)),
            batch_size=1,
            num_cpus=0.5,
        )
    elif split:  # items in CPU tasks feed the GPU actors
        ds = ds.map_batches(_make_items, fn_kwargs={"plan": plan}, batch_size=1, num_cpus=1)
    else:
        # Embedding on the CPU: one actor a core makes a piece's items and embeds them, as a
        # lane of the local engine does; the pixels never cross processes. Measured on 2 cores,
        # 2,000 images: Ray's overhead against local was +40% with item actors feeding
        # embedding actors, +35% with Ray Data fusing item tasks into them, and the README's
        # figure this way.
        return ds.map_batches(
            _ItemsAndVectors,
            fn_constructor_args=(plan,),
            **restarts,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, cores)),
            num_cpus=1,
        )
    return ds.map_batches(
        _EmbedActor,
        fn_constructor_args=(plan,),
        **restarts,
        batch_size=plan.build.batch_size,
        compute=ray.data.ActorPoolStrategy(size=max(1, gpus or cores)),
        **embed_args,
    )


def _gather(ds, collector: Collector, build: RayBuild, rows: tuple[int, int], summary: RunSummary) -> None:
    """Take the batches as they come back into the collector (rows: the total, and those already done)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(
        total=rows[0], initial=rows[1], unit="row", desc=f"ray -> {build.store_dir.name}", disable=not build.progress
    )
    first = None
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            first = first or time.perf_counter() - t0
            bar.update(collector.add(batch, build.shard_rows))
    except Exception as e:  # noqa: BLE001 - Ray's and Ray Data's errors of a worker have many types
        said = worker_error(e)
        if said is None or said is e:  # not Ray's, or the driver's own error: as it is
            raise
        raise said from e
    finally:
        bar.close()
    summary.notes.append(f"ray: first rows back {first or 0:.1f} s after the start")
    log.debug("Ray Data stats:\n%s", ds.stats())


def worker_error(e: BaseException) -> PipelineError | None:
    """A worker's failure as the run's one line: the project's own error raised in a worker (found
    through Ray's wrappers, as its own type), or for a worker that died (killed for memory, say) what
    is kept and how to go on; None for an error that is not Ray's (a bug of this process)."""
    seen: set[int] = set()
    chain: list[BaseException | None] = [e]
    while chain:
        x = chain.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, PipelineError) and not type(x).__module__.startswith("ray"):  # not Ray's dual class
            return x  # itself, its attributes too
        chain += [getattr(x, "cause", None), x.__cause__, x.__context__]
    if not type(e).__module__.startswith("ray"):
        return None
    return PipelineError(f"a Ray worker stopped before its work was done ({type(e).__name__}: {first_line(e)}); "
                         "the shards it completed are kept: run the same command again to resume (a worker killed for "
                         "its memory: a smaller --batch-size)")


def split_at_shards(pieces: list[Piece], shard_rows: int) -> list[Piece]:
    """Cut pieces where shards start, so every piece belongs to one shard."""
    out = []
    for p in pieces:
        start = p.first_row
        while start < p.first_row + p.rows:
            end = min(p.first_row + p.rows, (start // shard_rows + 1) * shard_rows)
            out.append(p.cut(start, end))
            start = end
    return out


def smaller_at_the_end(pieces: list[Piece], workers: int, min_rows: int = 8) -> list[Piece]:
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
