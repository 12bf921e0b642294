"""Embedding backends and model families, each declared once.

A backend (torch, onnx) says how its embedder is built from an `EmbedderSpec` and which precisions
and devices it takes; the command line's choices, the flag checks, `make_embedder` and the
evaluation's backend names are all read from `BACKENDS` and `EVAL_BACKENDS`. A model family says how
a model folder or hub id is recognised and loaded; adding one (SigLIP, open_clip, ...) is one entry
in `FAMILIES` and its loader. Nothing heavy is imported here: `main.py --help` reads this module.
"""

from __future__ import annotations

import importlib
import json
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
BACKEND_CHOICES = ("auto", *sorted(BACKENDS))  # auto: the ONNX file when it exists, else torch
PRECISIONS = tuple(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))
DEVICES = tuple(dict.fromkeys(d for b in BACKENDS.values() for d in b.devices))


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


@dataclass(frozen=True)
class ModelFamily:
    """A kind of image-text model: the config.json model_types that name it, and its transformers class."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # "module:Class" with from_pretrained

    def load(self, model: str, **kwargs: Any) -> Any:
        module, _, cls = self.model_class.partition(":")
        return getattr(importlib.import_module(module), cls).from_pretrained(model, **kwargs)


FAMILIES: dict[str, ModelFamily] = {
    "clip": ModelFamily("clip", ("clip",), "transformers:CLIPModel"),
}


def family_of(model: str, read_config: Callable[[str], dict[str, Any] | None] | None = None) -> ModelFamily:
    """The family of a model folder, from its config.json's model_type; a hub id, whose config is not
    fetched here, is taken as CLIP. A folder of a family this version does not know is refused by
    name, rather than failing later with a size mismatch."""
    config = (read_config or _local_config)(model)
    model_type = (config or {}).get("model_type", "clip")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise PipelineError(f"{model}: model type {model_type!r} is not supported (this version embeds with: {known})")


def _local_config(model: str) -> dict[str, Any] | None:
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: unreadable model config ({e})") from e
