"""Run configuration: the parsed command line as one typed value, with the output layout.

Every default is written once, here or in the stage that owns the setting (DatasetSpec,
EmbedderSpec, SegmentSpec); the command line takes its defaults from these dataclasses through
FLAGS, and every mode reads the same RunConfig.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .backends import model_by_name
from .dataset import DatasetSpec
from .embedders import EmbedderSpec
from .remote import default_work_dir, is_url
from .store import PARTIAL_DIR
from .yolo import SegmentSpec

# the containers --video_clip finds by a name without its suffix (a file named whole plays whatever its suffix)
CLIP_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mts", ".m2ts", ".ts", ".mpg", ".mpeg", ".3gp",
                 ".wmv", ".flv", ".ogv")


@dataclass(frozen=True)
class VideoSpec:
    """--video_clip: which clip, how often a frame is analysed, and the person detector."""

    clip: str | None = None
    folder: Path = Path("videos")
    frame_stride: int = 30
    det_model: str = "yolov8n.pt"
    det_conf: float = 0.25
    det_backend: str = "auto"  # auto (ONNX export of .pt weights on the CPU) | onnx | torch
    track_gap: int = 2  # analysed frames a person may go unseen before their track ends
    no_annotated_video: bool = False

    @property
    def clip_name(self) -> str | None:
        """What the clip's outputs are named by: --video_clip without a folder or a video file's
        suffix (`videos/clip_1.mp4` is clip_1: its outputs stay in the output folder)."""
        if not self.clip:
            return None
        p = Path(self.clip)
        return p.stem if p.suffix.lower() in CLIP_SUFFIXES else p.name


@dataclass(frozen=True)
class QuerySpec:
    """--query-image / --query-text."""

    images: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()  # --negative-text: subtracted from a picture-plus-text query
    fusion: str = "sum"  # sum (weighted sum of the normalized vectors) | rrf (reciprocal-rank fusion)
    text_weight: float = 0.5  # the texts' weight against the picture's 1 in a sum

    @property
    def active(self) -> bool:
        return bool(self.images or self.texts)

    @property
    def weight_of_texts(self) -> float | None:
        """The text weight Catalog.search_combined takes: a sum's; none for a rank fusion (refused there)."""
        return self.text_weight if self.fusion == "sum" else None


@dataclass(frozen=True)
class EvalSpec:
    """--evaluate: which backends, and where the ground truth is."""

    enabled: bool = False
    backends: tuple[str, ...] = ()  # empty: the backend in use
    models: tuple[str, ...] = ()  # --eval-models: backends.MODELS names, ids, folders, .onnx
    id_column: str | None = None  # same-product evaluation (e.g. item_ID)
    cloth_column: str = "cloth"  # person -> garment evaluation


@dataclass(frozen=True)
class ExportSpec:
    """--export-onnx."""

    enabled: bool = False
    quantization: str = "static"  # static (calibrated, saved for onnxruntime's CPU) | static-qdq | dynamic
    per_tensor: bool = False
    int8_profile: str = "auto"  # the static CPU graph's CPU kind: auto (this CPU's) | vnni | amx


@dataclass(frozen=True)
class ServeSpec:
    """--serve: the local search page."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    no_auth: bool = False  # --no-auth: beyond loopback, serve without the token (serve.TOKEN_ENV)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. `explicit` names the options the user typed (not defaults)."""

    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    embedder: EmbedderSpec = field(default_factory=EmbedderSpec)
    segment: SegmentSpec = field(default_factory=SegmentSpec)
    video: VideoSpec = field(default_factory=VideoSpec)
    query: QuerySpec = field(default_factory=QuerySpec)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    output_dir: Path = Path(".")  # with a URL output: its local working copy
    output_url: str | None = None  # --output-dir as an fsspec URL (remote.py)
    work_dir: Path | None = None  # --work-dir: the working copy of output_url
    batch_size: int = 32
    top_k: int = 5
    max_matrix: int = 20000
    max_result_images: int = 10_000  # result pictures are for looking at: the neighbour table covers everyone
    dedup: bool = False  # one photo per duplicate group in search results and neighbours (duplicates.py)
    filter: str | None = None  # --filter: a metadata filter applied inside every search (filters.py)
    group_by: str | None = None  # --group-by: one result per value of this metadata column (a product id)
    exports: tuple[str, ...] = ()  # --export KIND:DIR: the store exported to LanceDB / Qdrant / parquet (vectordb.py)
    meta_columns: tuple[str, ...] | None = None  # the dataset columns kept as metadata (None: every plain one)
    shard_rows: int = 512
    index: str = "auto"  # auto | flat | hnsw | ivfpq | none (index.py)
    engine: str = "local"  # local | ray (ray_engine.py)
    ray_address: str | None = None  # an existing Ray cluster (default: RAY_ADDRESS, else a local Ray)
    use_embeddings: bool = False
    use_segmentation: bool = False
    use_embedded_segment: bool = False
    update: bool = False  # --update: bring the store up to date with the dataset (update.py)
    fresh: bool = False
    progress: bool = True
    explicit: frozenset[str] = frozenset()
    gallery_flags: tuple[str, ...] = ()  # the gallery-making options typed, as words: a search's "build it first"

    @property
    def segmented(self) -> bool:
        """Work on person crops (images_segment/, embeddings_segment/) rather than whole images."""
        return self.use_segmentation or self.use_embedded_segment

    @property
    def from_cache(self) -> bool:
        return self.use_embeddings or self.use_embedded_segment

    @property
    def searches_only(self) -> bool:
        """A mode that reads a store and never builds one (--query-*, --serve, --export)."""
        return self.query.active or self.serve.enabled or bool(self.exports)

    @property
    def images_dir(self) -> Path:
        return self.output_dir / ("images_segment" if self.segmented else "images")

    @property
    def images_url(self) -> str | None:
        """Where the images are kept with a URL --output-dir (they stay there: remote.py); else None."""
        if not self.output_url:
            return None
        return f"{self.output_url.rstrip('/')}/{self.images_dir.relative_to(self.output_dir).as_posix()}"

    @property
    def store_dir(self) -> Path:
        return self.output_dir / ("embeddings_segment" if self.segmented else "embeddings")

    @property
    def results_dir(self) -> Path:
        base = self.output_dir / "retrieval_results"
        return base / "segment" if self.segmented else base

    @property
    def suffix(self) -> str:
        """Appended to file names in outputs/ so the standard and segmented runs do not collide."""
        return "_segment" if self.segmented else ""

    @property
    def plots_dir(self) -> Path:
        return self.output_dir / "outputs"

    @property
    def queries_dir(self) -> Path:
        return self.results_dir / "queries"

    @property
    def video_results_dir(self) -> Path:
        """video_results/<clip>/ (video_results/ itself when no clip is set)."""
        base = self.output_dir / "video_results"
        return base / self.video.clip_name if self.video.clip_name else base

    def owned_folders(self) -> list[Path]:
        """Every folder of the output layout, standard and segmented, that exists now."""
        folders = [self.output_dir]
        for segmented in (False, True):
            c = replace(self, use_segmentation=segmented, use_embedded_segment=False)
            folders += [c.images_dir, c.store_dir, c.store_dir / PARTIAL_DIR, c.results_dir, c.queries_dir]
        folders.append(self.plots_dir)
        videos = replace(self, video=replace(self.video, clip=None)).video_results_dir
        if videos.is_dir():
            folders += [p for p in videos.iterdir() if p.is_dir() and not p.is_symlink()]
        return [p for p in folders if p.is_dir()]


# Command-line option (argparse dest) -> (RunConfig section, field); section None: RunConfig itself.
FLAGS: dict[str, tuple[str | None, str]] = {
    "dataset": ("dataset", "name"),
    "split": ("dataset", "split"),
    "config": ("dataset", "config"),
    "limit": ("dataset", "limit"),
    "image_column": ("dataset", "image_column"),
    "id_column": ("dataset", "id_column"),
    "model": ("embedder", "model"),
    "onnx": ("embedder", "onnx"),
    "backend": ("embedder", "backend"),
    "onnx_runtime": ("embedder", "runtime"),
    "device": ("embedder", "device"),
    "precision": ("embedder", "precision"),
    "threads": ("embedder", "threads"),
    "decode": ("embedder", "decode"),
    "seg_model": ("segment", "model"),
    "seg_conf": ("segment", "conf"),
    "seg_imgsz": ("segment", "imgsz"),
    "seg_backend": ("segment", "backend"),
    "keep_unsegmented": ("segment", "keep_unsegmented"),
    "max_persons": ("segment", "max_persons"),
    "video_clip": ("video", "clip"),
    "video_dir": ("video", "folder"),
    "frame_stride": ("video", "frame_stride"),
    "det_model": ("video", "det_model"),
    "det_conf": ("video", "det_conf"),
    "det_backend": ("video", "det_backend"),
    "track_gap": ("video", "track_gap"),
    "no_annotated_video": ("video", "no_annotated_video"),
    "query_image": ("query", "images"),
    "query_text": ("query", "texts"),
    "negative_text": ("query", "negative"),
    "fusion": ("query", "fusion"),
    "text_weight": ("query", "text_weight"),
    "evaluate": ("evaluate", "enabled"),
    "eval_backends": ("evaluate", "backends"),
    "eval_models": ("evaluate", "models"),
    "eval_id_column": ("evaluate", "id_column"),
    "eval_cloth_column": ("evaluate", "cloth_column"),
    "export_onnx": ("export", "enabled"),
    "quantization": ("export", "quantization"),
    "per_tensor": ("export", "per_tensor"),
    "int8_profile": ("export", "int8_profile"),
    "serve": ("serve", "enabled"),
    "host": ("serve", "host"),
    "port": ("serve", "port"),
    "no_auth": ("serve", "no_auth"),
    **{
        name: (None, name)
        for name in (
            "output_dir",
            "batch_size",
            "top_k",
            "max_matrix",
            "max_result_images",
            "dedup",
            "filter",
            "group_by",
            "exports",
            "meta_columns",
            "shard_rows",
            "use_embeddings",
            "use_segmentation",
            "use_embedded_segment",
            "update",
            "fresh",
            "index",
            "engine",
            "ray_address",
            "work_dir",
        )
    },
}


def _spec_class(section: str | None) -> type:
    if section is None:
        return RunConfig
    factory = next(f for f in fields(RunConfig) if f.name == section).default_factory
    assert isinstance(factory, type)  # every section is a dataclass made by its own class
    return factory


def flag_default(dest: str) -> Any:
    """The default of a command-line option: its dataclass field's default."""
    section, name = FLAGS[dest]
    f = next(f for f in fields(_spec_class(section)) if f.name == name)
    if f.default is not MISSING:
        return f.default
    assert callable(f.default_factory)  # no default: then a default_factory
    return f.default_factory()


def onnx_of_another_model(spec: EmbedderSpec) -> str | None:
    """The model the file at --onnx was exported from, when there is a file and it is not of
    --model (None otherwise, a file without that record included: it is taken as asked)."""
    from .embedders import (
        META_SOURCE_WEIGHTS,
        exported_from,
        known_file_metadata,
        model_reference,
        model_weights_sha256,
    )

    made_from = exported_from(spec.onnx)
    if not made_from or made_from == model_reference(spec.model):
        return None
    # another name: the same weights (a folder moved or copied since the export) are the same model
    weights = known_file_metadata(spec.onnx).get(META_SOURCE_WEIGHTS) or (
        model_weights_sha256(made_from) if Path(made_from).exists() else "")
    return None if weights and weights == model_weights_sha256(spec.model) else made_from


def onnx_of_another_model_named(cfg: RunConfig) -> str | None:
    """--model and --onnx both typed, the file exported from another model: the file makes the
    vectors (and the store records its model), so the --model typed goes unused; what to say."""
    spec = cfg.embedder
    if ("model" not in cfg.explicit or not {"onnx", "backend"} & cfg.explicit or cfg.export.enabled
            or cfg.evaluate.models or spec.resolve_backend() != "onnx"):
        return None
    made_from = onnx_of_another_model(spec)
    if made_from is None:
        return None
    if "onnx" not in cfg.explicit:  # --backend onnx --model X: the default file, which another model made
        return (f"--model {spec.model} is not the model the default --onnx {spec.onnx} was exported from "
                f"({made_from}): with --backend onnx the file makes the vectors, so {made_from} is what this run "
                f"uses and records; run {spec.model} itself with --backend torch, or export it with --export-onnx "
                f"--model {spec.model} --onnx FILE and pass that file")
    return (f"--model {spec.model} is not the model --onnx {spec.onnx} was exported from ({made_from}): the file "
            f"makes the vectors, so {made_from} is what this run uses and records; drop --model, or export "
            f"{spec.model} with --export-onnx --model {spec.model} --onnx FILE and pass that file")


def onnx_fallback(cfg: RunConfig) -> str | None:
    """Backend auto, no --model typed, and no file at the default --onnx: the run uses the transformers
    model, as the reference does. What to say about it: the file looked for (the default is relative
    to the current folder) and the project's own copy when there is one. None: no fallback."""
    spec = cfg.embedder
    if "model" in cfg.explicit and "backend" not in cfg.explicit and "onnx" not in cfg.explicit and (
            not cfg.export.enabled and (made_from := onnx_of_another_model(spec)) is not None):
        return (f"--model {spec.model}: the ONNX file at {spec.onnx} (the default --onnx) was exported from "
                f"{made_from}, so the run uses the model you named itself; pass --onnx FILE for an export of it")
    if (spec.backend != "auto" or "model" in cfg.explicit or cfg.export.enabled or spec.resolve_backend() != "torch"
            or cfg.evaluate.models):
        return None  # a --model the user typed is the model they want; --eval-models names its own
    looked = Path(spec.onnx).absolute()
    project = Path(__file__).resolve().parents[1] / spec.onnx
    if project.is_file() and project != looked.resolve():
        hint = f"the project's folder has one: pass --onnx {project}"
    else:
        hint = "make one with --export-onnx, or pass --onnx FILE"
    return (
        f"no ONNX file at {looked} (the default --onnx, from the current folder): using the transformers model "
        f"{spec.model} instead; {hint}"
    )


def config_from_flags(
    values: dict[str, Any], explicit: frozenset[str] = frozenset(), progress: bool = True,
    gallery_flags: tuple[str, ...] = (),
) -> RunConfig:
    """Build the RunConfig from parsed option values (argparse dests, as in FLAGS).

    --limit 0 means every row (limit None); list options become tuples; --eval-backends is a comma list.
    """
    sections: dict[str | None, dict[str, Any]] = {}
    for dest, value in values.items():
        if dest not in FLAGS:
            continue
        if dest == "limit":
            value = value or None
        elif dest in ("group_by", "filter") and isinstance(value, str) and not value.strip():
            # --group-by "": each photo, --filter "  ": every item, as "" means in the Catalog API and the page's JSON
            value = None
        elif dest in ("query_image", "query_text", "negative_text", "exports"):
            value = tuple(value or ())
        elif dest in ("eval_backends", "eval_models", "meta_columns") and isinstance(value, str):
            value = tuple(b.strip() for b in value.split(",") if b.strip())
        section, name = FLAGS[dest]
        sections.setdefault(section, {})[name] = value
    data = sections.setdefault("dataset", {})
    spelled = data.get("name")
    if isinstance(spelled, str) and len(spelled) > 1 and spelled.endswith(("/", os.sep)) and not is_url(spelled):
        bare = spelled.rstrip("/" + os.sep)  # ds/ is ds: its rows are named ds[3], not ds/[3]
        data["name"] = bare if bare and not bare.endswith(":") else spelled  # a drive's root stays one
    if data.get("config") == "default":  # the name the hub gives a dataset's default: what no --config reads
        data["config"] = None
    embedder = sections.setdefault("embedder", {})
    if embedder.get("model"):  # a short name of backends.MODELS
        embedder["model"] = model_by_name(embedder["model"])
    if (
        "onnx" in explicit
        and embedder.get("backend", "auto") == "auto"
        and not sections.get("export", {}).get("enabled")
    ):
        embedder["backend"] = "onnx"  # a file the user named is used, or its absence reported; not the hub model
    elif (
        "model" in explicit
        and embedder.get("backend", "auto") == "auto"
        and not sections.get("export", {}).get("enabled")
        and onnx_of_another_model(EmbedderSpec(**embedder)) is not None
    ):
        embedder["backend"] = "torch"  # the model typed, not the default file exported from another one
    top = sections.setdefault(None, {})
    if is_url(top.get("output_dir")):  # s3://...: the run works in a local copy (remote.py)
        top["output_url"] = str(top["output_dir"])
        top["output_dir"] = Path(top.get("work_dir") or default_work_dir(top["output_url"]))
    elif "output_dir" in top:
        top["output_dir"] = Path(top["output_dir"])
    specs = {s: _spec_class(s)(**kw) for s, kw in sections.items() if s is not None}
    return RunConfig(**specs, **sections.get(None, {}), progress=progress, explicit=explicit,
                     gallery_flags=gallery_flags)
