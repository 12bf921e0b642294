"""Run configuration: the parsed command line as one typed value, with the output layout."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .dataset import DatasetSpec
from .embedders import EmbedderSpec
from .store import PARTIAL_DIR

DEFAULT_DATASET = "lirus18/deepfashion"
DEFAULT_MODEL = "patrickjohncyh/fashion-clip"
DEFAULT_ONNX = "onnx/fashion_clip_image_int8_matmul.onnx"
DEFAULT_SEG_MODEL = "yolov8l-seg.pt"
DEFAULT_DET_MODEL = "yolov8n.pt"


@dataclass(frozen=True)
class SegmentSpec:
    """Ultralytics segmentation settings (the person class only)."""

    model: str = DEFAULT_SEG_MODEL
    conf: float = 0.25
    imgsz: int = 640
    keep_unsegmented: bool = False
    backend: str = "auto"  # auto (ONNX export of .pt weights on the CPU) | onnx | torch


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. `explicit` names the options the user typed (not defaults)."""

    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(DEFAULT_DATASET))
    embedder: EmbedderSpec = field(default_factory=EmbedderSpec)
    segment: SegmentSpec = field(default_factory=SegmentSpec)
    output_dir: Path = Path(".")
    batch_size: int = 32
    top_k: int = 5
    max_matrix: int = 20000
    max_result_images: int | None = None
    shard_rows: int = 512
    use_embeddings: bool = False
    use_segmentation: bool = False
    use_embedded_segment: bool = False
    fresh: bool = False
    progress: bool = True
    explicit: frozenset[str] = frozenset()
    # video
    video_clip: str | None = None
    video_dir: Path = Path("videos")
    frame_stride: int = 30
    det_model: str = DEFAULT_DET_MODEL
    det_conf: float = 0.25
    det_backend: str = "auto"  # auto (ONNX export of .pt weights on the CPU) | onnx | torch

    @property
    def segmented(self) -> bool:
        """Work on person crops (images_segment/, embeddings_segment/) rather than whole images."""
        return self.use_segmentation or self.use_embedded_segment

    @property
    def from_cache(self) -> bool:
        return self.use_embeddings or self.use_embedded_segment

    @property
    def images_dir(self) -> Path:
        return self.output_dir / ("images_segment" if self.segmented else "images")

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
        return base / self.video_clip if self.video_clip else base

    def owned_folders(self) -> list[Path]:
        """Every folder of the output layout, standard and segmented, that exists now."""
        folders = [self.output_dir]
        for segmented in (False, True):
            c = replace(self, use_segmentation=segmented, use_embedded_segment=False)
            folders += [c.images_dir, c.store_dir, c.store_dir / PARTIAL_DIR, c.results_dir, c.queries_dir]
        folders.append(self.plots_dir)
        videos = replace(self, video_clip=None).video_results_dir
        if videos.is_dir():
            folders += [p for p in videos.iterdir() if p.is_dir() and not p.is_symlink()]
        return [p for p in folders if p.is_dir()]
