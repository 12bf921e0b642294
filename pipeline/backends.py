"""Embedding backends and model families, each declared once.

A backend (torch, onnx) says how its embedder is built from an `EmbedderSpec` and which precisions
and devices it takes; the command line's choices, the flag checks, `make_embedder` and the
evaluation's backend names are all read from `BACKENDS` and `EVAL_BACKENDS`. A model family says how
a model folder or hub id is recognised and loaded; adding one (SigLIP, open_clip, ...) is one entry
in `FAMILIES` and its loader. Nothing heavy is imported here: `main.py --help` reads this module.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PipelineError


@dataclass(frozen=True)
class Backend:
    """One embedding backend.

    embedder: "module:Class" whose `from_spec(EmbedderSpec)` builds it (imported only when built).
    precisions: the --precision values it takes ("auto" first); cpu_precisions: those it runs on a CPU.
    """

    name: str
    embedder: str
    precisions: tuple[str, ...]
    cpu_precisions: tuple[str, ...]
    devices: tuple[str, ...] = ("auto", "cpu", "cuda")

    def build(self, spec: Any) -> Any:
        module, _, cls = self.embedder.partition(":")
        return getattr(importlib.import_module(module), cls).from_spec(spec)


BACKENDS: dict[str, Backend] = {
    # On CUDA: fp16 by default, bitsandbytes 8-bit with --precision int8 (embedders.resolve_torch_precision).
    "torch": Backend("torch", "pipeline.embedders:TorchEmbedder", ("auto", "fp32", "fp16", "int8"), ("auto", "fp32")),
    # The file's precision is fixed when it is exported (--export-onnx): no --precision.
    "onnx": Backend("onnx", "pipeline.embedders:OnnxEmbedder", ("auto",), ("auto",)),
}
# --onnx-runtime: what runs an ONNX file (pipeline/ovruntime.py: OpenVINO, on the CPU)
ONNXRUNTIME = "onnxruntime"
ONNX_RUNTIMES = (ONNXRUNTIME, "openvino")
BACKEND_CHOICES = ("auto", *sorted(BACKENDS))  # auto: the ONNX file when it exists, else torch
PRECISIONS = tuple(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))
DEVICES = tuple(dict.fromkeys(d for b in BACKENDS.values() for d in b.devices))
# --int8-profile: which static CPU graph the int8 export writes (pipeline/export.py says what each is)
INT8_PROFILES = ("auto", "vnni", "amx")


@dataclass(frozen=True)
class EvalBackend:
    """A name --eval-backends takes: a backend, and for ONNX which exported file (int8 or its fp32 twin)."""

    name: str
    backend: str
    onnx_file: str | None = None  # "int8": --onnx itself; "fp32": the fp32 file beside it


EVAL_BACKENDS: dict[str, EvalBackend] = {
    "torch": EvalBackend("torch", "torch"),
    "onnx-fp32": EvalBackend("onnx-fp32", "onnx", "fp32"),
    "onnx-int8": EvalBackend("onnx-int8", "onnx", "int8"),
}


# Short names --eval-models (and --model) take for the models worth comparing (README, "Choosing the model").
MODELS: dict[str, str] = {
    "fashion-clip": "patrickjohncyh/fashion-clip",
    "marqo-fashionsiglip": "hf-hub:Marqo/marqo-fashionSigLIP",
    "marqo-fashionclip": "hf-hub:Marqo/marqo-fashionCLIP",
    "siglip-base": "google/siglip-base-patch16-224",
    "clip-vit-b32": "openai/clip-vit-base-patch32",
}


def model_by_name(model: str) -> str:
    """--model / --eval-models as given: a short name of MODELS names its model, unless a folder of
    that name exists here."""
    return MODELS[model] if model in MODELS and not Path(model).exists() else model


@dataclass(frozen=True)
class ModelFamily:
    """A kind of image-text model: the config.json model_types that name it, its transformers
    class, and how its text tower is fed: text_mask, whether it reads an attention mask (CLIP) or
    was trained on texts padded to its full context and attends to the padding too (SigLIP)."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # "module:Class" with from_pretrained
    text_mask: bool = True

    def load(self, model: str, **kwargs: Any) -> Any:
        module, _, cls = self.model_class.partition(":")
        return getattr(importlib.import_module(module), cls).from_pretrained(model, **kwargs)


FAMILIES: dict[str, ModelFamily] = {
    "clip": ModelFamily("clip", ("clip",), "transformers:CLIPModel"),
    # SigLIP: pictures squashed to a square (no crop), mean/std 0.5, texts padded to 64 tokens, unmasked
    "siglip": ModelFamily("siglip", ("siglip",), "transformers:SiglipModel", text_mask=False),
    # open_clip (Marqo-FashionSigLIP, ...): named by its form, not a config.json (pipeline/openclip.py)
    "open_clip": ModelFamily("open_clip", (), "pipeline.openclip:OpenClipModel", text_mask=False),
}
NOT_YET = {  # model types known by name, refused with the reason rather than a size mismatch
    "siglip2": "SigLIP 2 takes pictures as variable-resolution patches (NaFlex), which this version does not feed",
}


# How --model names an open_clip model (pipeline/openclip.py), told apart here without importing it.
OPEN_CLIP_PREFIX, OPEN_CLIP_HUB, OPEN_CLIP_CONFIG = "open_clip:", "hf-hub:", "open_clip_config.json"


def names_open_clip(model: str) -> bool:
    """`open_clip:ARCH:FILE`, `hf-hub:...`, or a folder holding open_clip_config.json."""
    return model.startswith((OPEN_CLIP_PREFIX, OPEN_CLIP_HUB)) or (Path(model) / OPEN_CLIP_CONFIG).is_file()


def hub_reference(model: str, family: str | None) -> str:
    """How a model is recorded (the model of an identity, the source of an ONNX file): an open_clip
    model named by its hub repository as open_clip's form `hf-hub:ORG/NAME`, whether it was named so
    or by the plain id (Marqo's repositories load either way: one model, one name); anything else
    as given. A plain id is only taken for open_clip's when its family says so (a LAION repository
    also holds a transformers CLIP, another family)."""
    named_otherwise = model.startswith((OPEN_CLIP_PREFIX, OPEN_CLIP_HUB)) or Path(model).is_absolute()
    return OPEN_CLIP_HUB + model if family == "open_clip" and "/" in model and not named_otherwise else model


def open_clip_weights(model: str) -> tuple[str, str] | None:
    """(architecture, weights file) of `open_clip:ARCH:FILE`; None for any other name."""
    if not model.startswith(OPEN_CLIP_PREFIX):
        return None
    arch, _, weights = model[len(OPEN_CLIP_PREFIX):].partition(":")
    return arch, weights


def family_of(model: str, read_config: Callable[[str], dict[str, Any] | None] | None = None) -> ModelFamily:
    """The family of a model folder or hub id, from its config.json's model_type (CLIP when there is
    none to read). A model of a family this version does not know is refused by name, rather than
    failing later with a size mismatch."""
    if names_open_clip(model):
        return FAMILIES["open_clip"]
    config = (read_config or _model_config)(model)
    if (config or {}).get("open_clip_model_name"):  # Marqo's repositories: a transformers shim over open_clip
        return FAMILIES["open_clip"]
    model_type = (config or {}).get("model_type", "clip")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type in NOT_YET:
        raise PipelineError(f"{model}: model type {model_type!r}: {NOT_YET[model_type]}")
    known = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise PipelineError(f"{model}: model type {model_type!r} is not supported (this version embeds with: {known})")


@functools.lru_cache(maxsize=32)
def _hub_config_path(model: str) -> str | None:
    """A hub id's config.json, downloaded or from the cache, once per process (each run asks for
    the family several times); None when it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(model, "config.json")
    except Exception:  # offline, gated, not a hub id: loading the model says why
        return None


def _model_config(model: str) -> dict[str, Any] | None:
    """A model's config.json: a folder's own, or a hub id's (from the hub's cache, or the hub when
    it can be reached); None when it cannot be had (the model's loading then says why)."""
    path = Path(model) / "config.json"
    if not path.is_file() and not Path(model).exists() and "/" in model:
        hub = _hub_config_path(model)
        if hub is None:
            return None
        path = Path(hub)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: unreadable model config ({e})") from e


def known_family(model: str) -> str | None:
    """The family's name when it can be told without loading the model; None when a hub id's
    config.json cannot be had (offline, not cached): a cache check then leaves the family to the
    loaded model's identity rather than guessing CLIP and refusing a SigLIP store."""
    if not names_open_clip(model) and not Path(model).exists() and _model_config(model) is None:
        return None
    return family_of(model).name


def is_onnx_file(model: str | Path | None) -> bool:
    """Whether a model named is an exported ONNX file (given where a model is asked for: --model, or
    Catalog.open's model=), which --onnx / onnx= take."""
    return model is not None and str(model).lower().endswith(".onnx") and Path(model).is_file()


def load_hint(model: str) -> str:
    """What to do when a model does not load: a folder given is not a model's (its files are
    named); a hub id needs the network or a local copy."""
    folder = Path(model)
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir())[:8]
        return (f"{model} is a folder but not a model's: a transformers model folder has config.json and its "
                f"weights (model.safetensors), an open_clip one open_clip_config.json; this one has "
                f"{', '.join(names) or 'nothing'}{' ...' if len(names) == 8 else ''}.")
    if folder.is_file() and not model.startswith("open_clip:"):  # a weights file: its folder is the model
        return (f"{model} is a file: --model takes the model's folder ({folder.parent}, if it holds config.json), "
                "or open_clip:ARCH:FILE for an open_clip checkpoint (e.g. open_clip:ViT-B-32:"
                f"{model}).")
    if not model.startswith("open_clip:") and (
            re.fullmatch(r"(hf-hub:)?[\w-][\w.-]*(/[\w.-]+)?", model) is None or ".." in model):
        return f"{model} is neither an existing folder nor a hub id like 'owner/name': check the path."
    return "Without network access pass a local folder with --model DIR."
