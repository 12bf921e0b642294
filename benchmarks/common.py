"""Shared benchmark helpers: the command line every benchmark shares (--work, --tiny), generated
catalogues, the models, and main.py run in a fresh process with its summary parsed.

By default a benchmark measures the real FashionCLIP architecture with random weights (speed does
not depend on weight values) on 768x1024 pictures. With --tiny it takes the same steps on a tiny
random CLIP built from a config (tests/assets.py), small pictures and a few rows, in seconds: that
checks the script, not the speed (tests/test_benchmarks.py runs every benchmark so). Everything
lands under --work (default /tmp/fashion-bench) and is reused between runs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pipeline.report import RunSummary

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path("/tmp/fashion-bench")
PHOTO_WH = (768, 1024)
TINY_WH = (192, 256)  # still portrait, sides multiples of 32 (YOLO calibration pictures)
# Hugging Face's Image feature, so `datasets` reads the column as images.
HF_IMAGE_META = {b"huggingface": b'{"info": {"features": {"image": {"_type": "Image"}}}}'}


def make_parser(doc: str | None, work: Path | None = DEFAULT_WORK, model: bool = True) -> argparse.ArgumentParser:
    """The benchmark's parser with the flags every benchmark has: --work (where assets and runs go,
    when it has any), --model and --onnx (when it runs CLIP) and --tiny."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if work is not None:
        ap.add_argument("--work", type=Path, default=work, help="assets and runs, reused between runs")
    if model:
        ap.add_argument(
            "--model", type=Path, default=None, help="a transformers CLIP folder instead of the generated one"
        )
        ap.add_argument(
            "--onnx",
            type=Path,
            default=None,
            help="an int8 static export to use instead of exporting one here (of --model, where the benchmark "
            "runs the model too)",
        )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="the same steps on a tiny random model and a few small pictures, in seconds: checks the "
        "script (its figures mean nothing)",
    )
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, tiny: dict[str, Any]) -> argparse.Namespace:
    """Parse argv; with --tiny, `tiny` replaces the defaults (flags given on the command line still win)."""
    args = ap.parse_args(argv)
    if args.tiny:
        ap.set_defaults(**tiny)
        args = ap.parse_args(argv)
    return args


def machine_line() -> str:
    """The CPU this benchmark ran on (model and int8 instruction sets): figures are comparable only
    between runs on the same kind of CPU."""
    from pipeline.machine import cpu_info, cpu_label

    return f"machine: {cpu_label()}, {cpu_info()['cores']} cores"


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of every core since boot (psutil.cpu_times, /proc/stat on Linux):
    busy is user, nice, system, irq, softirq and steal (the last the time a hypervisor gave to other
    machines), all adds idle and iowait. None without psutil (Ray brings it)."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    return busy, busy + t.idle + getattr(t, "iowait", 0.0)


def own_cpu_seconds() -> float:
    """CPU seconds this process (every thread) and its waited-for children have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


_T = TypeVar("_T")


def has_openvino() -> bool:
    """Whether OpenVINO is installed (--onnx-runtime openvino; `pip install openvino`)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def alternating(items: Sequence[_T], rounds: int, start: int = 0) -> Iterator[tuple[int, _T]]:
    """(round, item) for the rounds start..rounds-1, the items in reverse order every other round,
    so that a VM's drift over the rounds falls on every item alike."""
    for r in range(start, rounds):
        for item in (items[::-1] if r % 2 else items):
            yield r, item


class OtherLoad:
    """How much of the machine's CPU other processes took while a block ran: the machine's busy
    time less this process's own, as a share of all the CPU time /proc/stat counted meanwhile (so a
    container that sees the host's CPUs is measured against them). A rate measured in the block is
    its code's alone only where that is small: a type checker run beside `benchmarks.embed` once
    took its end-to-end rate from 65% of the model's to 43% (2026-12-07). The kernel's own work for
    this process (writing back its files, their interrupts) counts as others'; blocks under a second
    are a few clock ticks either way. `share` and `cores` (others' CPU seconds a second) are None
    where the machine's time cannot be read."""

    SHARE, CORES = 0.05, 0.5  # above either, a figure is said to be shared: 5% of the machine, or half a core

    def __init__(self, machine: Callable[[], tuple[float, float] | None] = machine_cpu_seconds,
                 own: Callable[[], float] = own_cpu_seconds, clock: Callable[[], float] = time.perf_counter,
                 label: str = "") -> None:
        self._machine, self._own, self._clock = machine, own, clock
        self.label = label  # what was measured, for `worst`'s note
        self.share: float | None = None
        self.cores: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (self._machine(), self._own(), self._clock())
        return self

    def __exit__(self, *exc: object) -> None:
        machine, own, wall = self._machine(), self._own(), self._clock()
        machine0, own0, wall0 = self._start
        if machine is None or machine0 is None or machine[1] <= machine0[1] or wall <= wall0:
            return
        others = max(0.0, (machine[0] - machine0[0]) - (own - own0))
        self.share, self.cores = others / (machine[1] - machine0[1]), others / (wall - wall0)

    @property
    def shared(self) -> bool:
        return self.share is not None and (self.share >= self.SHARE or (self.cores or 0.0) >= self.CORES)

    def note(self, what: str) -> str | None:
        """A line saying that `what` shared the machine, or None where it had the machine to itself."""
        if not self.shared:
            return None
        return (f"note: other processes took {self.share:.0%} of the machine's CPU ({self.cores:.1f} core(s)) during "
                f"{what}: its figure is not this code's alone (measure again on a quiet machine)")

    @staticmethod
    def worst(loads: Iterable[OtherLoad]) -> OtherLoad | None:
        """The most shared of several measurements (by others' cores), or None where none could be read."""
        known = [load for load in loads if load.cores is not None]
        return max(known, key=lambda load: load.cores or 0.0) if known else None


def photo_like(i: int, w: int = PHOTO_WH[0], h: int = PHOTO_WH[1]) -> Image.Image:
    """A picture with smooth regions, edges and sensor-like noise, so JPEG sizes and decode costs
    resemble catalogue photos (~100-200 KB at 768x1024, quality 90)."""
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    y0, x0 = rng.integers(100, 500, 2)
    y0, x0 = y0 * h // PHOTO_WH[1], x0 * w // PHOTO_WH[0]
    bh, bw = 400 * h // PHOTO_WH[1], 220 * w // PHOTO_WH[0]
    base[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(0, 256, 3)  # a garment-like block
    noise = rng.normal(0, 9, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode_picture(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """JPEG at quality 90 (catalogue photos), or PNG at the fastest compression."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def write_image_parquet(target: Path, pictures: Iterable[bytes], chunk: int, row_group_size: int) -> Path:
    """A local parquet dataset at target (…/data/train-00000-of-00001.parquet) with one Image
    column, written in chunks so memory stays small; it appears whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.parent.mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image)], metadata=HF_IMAGE_META)
    tmp = target.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        rows: list[dict] = []
        for data in pictures:
            rows.append({"bytes": data, "path": None})
            if len(rows) == chunk:
                writer.write_table(pa.table({"image": rows}, schema=schema), row_group_size=row_group_size)
                rows = []
        if rows:
            writer.write_table(pa.table({"image": rows}, schema=schema), row_group_size=row_group_size)
    tmp.rename(target)
    return target


def make_jpeg_dataset(folder: Path, n: int, w: int = PHOTO_WH[0], h: int = PHOTO_WH[1]) -> Path:
    """A parquet dataset of n distinct photo-like JPEGs (rows of 50)."""
    out = folder / f"jpeg{n}_{w}x{h}"
    target = out / "data" / "train-00000-of-00001.parquet"
    if not target.is_file():
        pictures = (encode_picture(photo_like(i % 500 + 1000 * (i // 500), w, h)) for i in range(n))
        write_image_parquet(target, pictures, chunk=250, row_group_size=50)
    return out


def real_arch_clip(work: Path) -> Path:
    """FashionCLIP's architecture with random weights, and a tokenizer, so that its ONNX export has
    a text tower (text search, --serve)."""
    from tests.assets import save_real_arch_clip, save_tiny_tokenizer

    path = work / "fashion-clip-arch"
    if not (path / "model.safetensors").is_file():
        save_real_arch_clip(path)
    if not (path / "tokenizer.json").is_file():
        save_tiny_tokenizer(path)  # a small vocabulary: text costs the same, 77 tokens a text
    return path


# Marqo-FashionSigLIP's preprocessing (its open_clip_config.json): squashed to 224, mean/std 0.5.
SIGLIP_PREPROCESS = {"size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}


def real_arch_fashion_siglip(work: Path) -> Path:
    """Marqo-FashionSigLIP's architecture (open_clip ViT-B-16-SigLIP: timm ViT-B/16 at 224 with
    attention pooling, SigLIP's text tower) with random weights, laid out as its hub repository
    (open_clip_config.json and open_clip_pytorch_model.bin)."""
    return real_arch_open_clip(work / "fashion-siglip-arch", "ViT-B-16-SigLIP", SIGLIP_PREPROCESS)


# OpenAI CLIP's preprocessing, as open_clip's RN50 configuration uses it
OPENAI_PREPROCESS = {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
                     "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}


def real_arch_rn50(work: Path) -> Path:
    """A convolutional tower: open_clip's RN50 (OpenAI CLIP's ResNet-50 with anti-aliased strided
    pools and an attention pool, 224 px) with random weights, laid out as a hub repository."""
    return real_arch_open_clip(work / "rn50-arch", "RN50", OPENAI_PREPROCESS)


def real_arch_convnext(work: Path) -> Path:
    """A convolutional tower of another kind: open_clip's convnext_tiny (timm's ConvNeXt-T: 7x7
    depthwise convolutions, LayerNorm, Linear MLPs, layer scales; 224 px) with random weights, its
    layer scales drawn from N(0, 0.5) (timm starts them all at 1e-6, where each block adds next to
    nothing and the int8 file's accuracy would say little about the blocks). Needs timm."""
    return real_arch_open_clip(work / "convnext_tiny-scaled-arch", "convnext_tiny", OPENAI_PREPROCESS,
                               layer_scale=0.5)


def real_arch_open_clip(path: Path, arch: str, preprocess: dict, layer_scale: float | None = None) -> Path:
    """open_clip's `arch` with random weights (seed 0) in the folder `path`, as an open_clip hub
    repository holds a model (open_clip_config.json and open_clip_pytorch_model.bin); made once.
    layer_scale: the image tower's layer scales (`*.gamma`) drawn from N(0, layer_scale)."""
    import open_clip
    import torch

    weights = path / "open_clip_pytorch_model.bin"
    if not weights.is_file():
        path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        if layer_scale is not None:
            with torch.no_grad():
                for key, param in model.visual.named_parameters():
                    if key.endswith(".gamma"):
                        param.copy_(torch.randn_like(param) * layer_scale)
        config = {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": preprocess}
        (path / "open_clip_config.json").write_text(json.dumps(config, indent=1))
        torch.save(model.state_dict(), weights.with_suffix(".tmp"))
        weights.with_suffix(".tmp").rename(weights)
    return path


def tiny_fashion_siglip(work: Path) -> Path:
    """A 2-layer open_clip ViT with SigLIP's preprocessing (tests/assets.py), for --tiny."""
    from tests.assets import save_tiny_open_clip

    path = work / "tiny-open-clip"
    if not (path / "repo" / "open_clip_config.json").is_file():
        return save_tiny_open_clip(path)[1]
    return path / "repo"


def tiny_rn50(work: Path) -> Path:
    """A one-block-per-stage open_clip ResNet (tests/assets.py), for --tiny."""
    from tests.assets import save_tiny_open_clip

    path = work / "tiny-open-clip-resnet"
    if not (path / "repo" / "open_clip_config.json").is_file():
        return save_tiny_open_clip(path, resnet=True)[1]
    return path / "repo"


def tiny_convnext(work: Path) -> Path:
    """A one-block-per-stage open_clip ConvNeXt (timm's test_convnext2; tests/assets.py), for --tiny."""
    from tests.assets import save_tiny_open_clip

    path = work / "tiny-open-clip-convnext"
    if not (path / "repo" / "open_clip_config.json").is_file():
        return save_tiny_open_clip(path, convnext=True)[1]
    return path / "repo"


def tiny_clip(work: Path) -> Path:
    """A 2-layer CLIP with random weights and a tokenizer (tests/assets.py), for --tiny."""
    from tests.assets import save_tiny_clip

    path = work / "tiny-clip"
    if not (path / "tokenizer.json").is_file():
        save_tiny_clip(path)
    return path


@dataclass(frozen=True)
class Assets:
    """A benchmark's model and pictures: the real architecture on 768x1024 pictures, --tiny's, or the
    CLIP folder (and its int8 static export) given with --model (and --onnx)."""

    work: Path
    tiny: bool = False
    model: Path | None = None
    static_onnx: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Assets:
        return cls(args.work, args.tiny, getattr(args, "model", None), getattr(args, "onnx", None))

    @property
    def size_wh(self) -> tuple[int, int]:
        return TINY_WH if self.tiny else PHOTO_WH

    def photo(self, i: int) -> Image.Image:
        return photo_like(i, *self.size_wh)

    def dataset(self, n: int) -> Path:
        return make_jpeg_dataset(self.work, n, *self.size_wh)

    def clip(self) -> Path:
        if self.model is not None:
            return self.model
        if self.static_onnx is not None:  # a generated model would not be the one the file was made from
            raise SystemExit(f"--onnx {self.static_onnx} needs the model it was exported from: give it with --model")
        return tiny_clip(self.work) if self.tiny else real_arch_clip(self.work)

    @property
    def model_tag(self) -> str:
        """The model's part of the names of the files made from it."""
        if self.model is not None:  # one --work may see several folders of the same name
            return f"{self.model.name}-{hashlib.sha1(str(self.model.resolve()).encode()).hexdigest()[:8]}"
        return "tiny_clip" if self.tiny else "fashion_clip"

    def onnx(self, quantization: str = "static") -> Path:
        """int8 ONNX (and fp32 beside it, and the text tower), made with the pipeline's own export."""
        from pipeline.embedders import text_onnx_path_for
        from pipeline.export import export_onnx

        if quantization == "static" and self.static_onnx is not None:
            return self.static_onnx
        path = self.work / "onnx" / f"{self.model_tag}_image_int8_{quantization}.onnx"
        # A file made before its model had a tokenizer has no text tower: made again.
        text = text_onnx_path_for(path).is_file() or not (self.clip() / "tokenizer.json").is_file()
        # the default export of this CPU: with its own profile (--int8-profile auto)
        if not (path.is_file() and text and recipe_of(path) == self._default_recipe(path, quantization)):
            export_onnx(str(self.clip()), path, quantization=quantization)
        return path

    def openvino_onnx(self) -> Path:
        """The static int8 file OpenVINO reads (--onnx-runtime openvino): the default export, unless
        this CPU's profile is the AMX one (its QGemm, QLinearSigmoid and QLinearMul OpenVINO does not
        read: pipeline/ovruntime.py), then the VNNI profile's export of the same model under --work
        (made again where an earlier export's recipe is not the VNNI profile's now)."""
        from pipeline.export import export_onnx
        from pipeline.ovruntime import UINT8_GELU

        static = self.onnx("static")
        if UINT8_GELU not in (recipe_of(static) or ""):
            return static
        path = self.work / "onnx" / f"{self.model_tag}_image_int8_static_vnni.onnx"
        if recipe_of(path) != self._default_recipe(path, "static", "vnni"):
            export_onnx(str(self.clip()), path, profile="vnni")
        return path

    @staticmethod
    def _default_recipe(path: Path, quantization: str, profile: str = "auto") -> str:
        """The recipe the export records for this file on this CPU (`--int8-profile auto`, or the
        profile named): the graph of this CPU's profile for the tower (int8graph.static_graph: the AMX
        graph for a tower with GELUs on an AMX or other Intel CPU, a ConvNeXt's float-depthwise graph
        elsewhere), read from the fp32 file beside it, so that a file is not made again on every call."""
        from pipeline.export import fp32_path_for, int8_profile, int8_recipe

        profile = int8_profile(profile)
        fp32 = fp32_path_for(path)
        graph = profile  # without the float file: the profile's own graph (the export's fallback)
        if quantization == "static" and fp32.is_file():
            stat = fp32.stat()
            graph = _static_graph(str(fp32), stat.st_mtime_ns, stat.st_size, profile)
        return int8_recipe(quantization, graph)


@functools.lru_cache(maxsize=16)
def _static_graph(fp32: str, mtime_ns: int, size: int, profile: str) -> str:
    """int8graph.static_graph of the float file at `fp32` under the resolved `profile`, once per
    version of it (by its time and size): a ViT's graph is a few hundred MB to parse, and a benchmark
    asks for it a few times."""
    import onnx
    from pipeline.int8graph import static_graph

    return static_graph(onnx.load(fp32, load_external_data=False), profile)


def recipe_of(path: Path) -> str | None:
    """The int8 recipe an export recorded in its file (pipeline/export.py), None before recipes were."""
    if not path.is_file():
        return None
    from pipeline.embedders import file_metadata
    from pipeline.export import META_INT8_RECIPE

    return file_metadata(path).get(META_INT8_RECIPE)


def stage_seconds(summary: RunSummary) -> dict[str, float]:
    """A run summary's stage times by the labels it prints (as main.py shows them), unrounded: for
    tables people read. Programs look stages up by name (summary.stages["embed"])."""
    return {label.strip(): seconds for _, label, _, seconds in summary.stage_rows()}


def section_stages(out: Path, section: str = "gallery") -> dict[str, float]:
    """The stage times, by name ("embed", "embed/infer", ...), that a main.py run into `out` wrote to
    its report section (outputs/report/sections/<section>.js)."""
    text = (out / "outputs" / "report" / "sections" / f"{section}.js").read_text()
    payload = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    return {st["name"]: st["s"] for st in payload["summary"]["stages"]}


@dataclass
class MainRun:
    """One main.py run: exit status, output, wall seconds, and the largest value a sampler saw."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    sampled_peak: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode in (0, 3)  # 3: finished, with failed items listed

    @property
    def stages(self) -> dict[str, float]:
        """The summary's `stages:` line: {stage name: seconds}."""
        line = next((x for x in self.stdout.splitlines() if x.startswith("stages:")), "")
        return {k.strip(): float(v) for k, v in re.findall(r"(.+?) ([\d.]+) s(?:, |$)", line.removeprefix("stages:"))}

    @property
    def peak_rss_mib(self) -> float | None:
        """The run's own peak RSS (ru_maxrss of that process alone), from its summary."""
        m = re.search(r"peak memory (\d+) MiB", self.stdout)
        return float(m.group(1)) if m else None

    def check(self, what: str) -> MainRun:
        """Self, or SystemExit with the end of its stderr if the run failed."""
        if not self.ok:
            raise SystemExit(f"{what} failed ({self.returncode}):\n{self.stderr[-3000:]}")
        return self


def run_main_py(args: list[str], sample: Callable[[int], int] | None = None, every_s: float = 0.2) -> MainRun:
    """main.py in a fresh process (what a user runs), its output captured; sample(pid) is called
    every every_s seconds while it runs (peak memory of its process tree, of the GPU) and the
    largest value kept."""
    cmd = [sys.executable, str(ROOT / "main.py"), *args]
    t = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        while proc.poll() is None:
            if sample is not None:
                peak = max(peak, sample(proc.pid))
            time.sleep(every_s)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return MainRun(proc.returncode, out.read(), err.read(), wall, peak)


def standard_run_args(dataset: Path, onnx: Path, out: Path, n: int) -> list[str]:
    """main.py's flags for the standard run on the first n rows of a dataset with an int8 ONNX file."""
    return ["--dataset", str(dataset), "--onnx", str(onnx), "--output-dir", str(out), "--limit", str(n)]
