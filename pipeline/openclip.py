"""open_clip models (Marqo-FashionSigLIP, Marqo-FashionCLIP, LAION's and OpenAI's ViTs) behind the
interface the rest of the pipeline uses for transformers' CLIPModel and SiglipModel:
`get_image_features`, `get_text_features`, a `config` with the vector length and text context,
the preprocessing read from open_clip's own configuration, and open_clip's tokenizer.

A model is named three ways (`--model`):
- `hf-hub:Marqo/marqo-fashionSigLIP`: open_clip's hub form (its open_clip_config.json and weights);
- a folder holding `open_clip_config.json` and the weights (what that hub repository holds);
- `open_clip:ARCH:FILE`: an open_clip architecture name and a local weights file
  (`open_clip:ViT-B-32:/models/vit-b-32.bin`).

open_clip is imported only here, and only for such a model: the default path never needs it.
"""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig

PREFIX = "open_clip:"
HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
_RESAMPLE = {"bicubic": 3, "bilinear": 2}


def is_open_clip(model: str) -> bool:
    """Whether `--model` names an open_clip model (module docstring)."""
    return model.startswith((PREFIX, HUB_PREFIX)) or (Path(model) / CONFIG_FILE).is_file()


def open_clip_source(model: str) -> tuple[str, str | None]:
    """(model_name, pretrained) as open_clip.create_model takes them."""
    if model.startswith(HUB_PREFIX):
        return model, None
    if model.startswith(PREFIX):
        arch, sep, weights = model[len(PREFIX):].partition(":")
        if not arch or not sep or not weights:
            raise PipelineError(f"--model {model!r}: expected open_clip:ARCH:FILE (e.g. open_clip:ViT-B-32:./vit.bin)")
        if not Path(weights).is_file():
            raise PipelineError(f"--model {model!r}: no weights file {weights}")
        return arch, str(Path(weights).resolve())
    return "local-dir:" + str(Path(model).resolve()), None


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise PipelineError(f"open_clip models need open_clip_torch ({e}): pip install open_clip_torch") from e
    return open_clip


def preprocess_config(cfg: dict[str, Any]) -> PreprocessConfig:
    """open_clip's eval transform (its PreprocessCfg) as our PreprocessConfig: "shortest" resizes the
    short side and crops the centre (CLIP), "squash" resizes to the square (SigLIP); "longest"
    (pad to a square) is refused."""
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = cfg.get("resize_mode", "shortest")
    base = PreprocessConfig(
        shortest_edge=min(h, w),
        crop_height=h,
        crop_width=w,
        resample=_RESAMPLE.get(cfg.get("interpolation", "bicubic"), 3),
        image_mean=tuple(float(x) for x in cfg.get("mean", CLIP_MEAN)),
        image_std=tuple(float(x) for x in cfg.get("std", CLIP_STD)),
    )
    if mode == "squash":
        return replace(base, resize_height=h, resize_width=w, do_center_crop=False)
    if mode == "shortest" and h == w:
        return base
    raise PipelineError(f"open_clip resize_mode {mode!r} with size {size} is not supported (shortest or squash)")


class OpenClipModel(torch.nn.Module):
    """An open_clip model dressed as a transformers image-text model (module docstring); a torch
    module, so that the ONNX export traces its weights."""

    def __init__(self, model: Any, tokenizer: Any, preprocess: dict[str, Any], name: str) -> None:
        super().__init__()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._preprocess = preprocess
        embed_dim = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[-1])
        context = int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 77))
        self.config = types.SimpleNamespace(
            projection_dim=embed_dim, text_config=types.SimpleNamespace(max_position_embeddings=context)
        )

    @classmethod
    def from_pretrained(cls, model: str, dtype: Any = None, **_: Any) -> OpenClipModel:
        """Load as open_clip does (create_model and get_tokenizer); transformers' loading options
        (attn_implementation, ...) do not apply, dtype does."""
        open_clip = _open_clip()
        name, pretrained = open_clip_source(model)
        try:
            net = open_clip.create_model(name, pretrained=pretrained, load_weights=True, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, ValueError, OSError) as e:  # open_clip raises these for names, files and downloads
            raise PipelineError(f"cannot load open_clip model {model!r}: {type(e).__name__}: {e}") from e
        if dtype is not None:
            net = net.to(dtype)
        return cls(net.eval(), tokenizer, dict(open_clip.get_model_preprocess_cfg(net)), model)

    # ---------------------------------------------------------------- what transformers' models offer
    def get_image_features(self, pixel_values: Any) -> Any:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: Any, attention_mask: Any = None) -> Any:
        return self.model.encode_text(input_ids)

    # ---------------------------------------------------------------- open_clip's own
    def preprocess_config(self) -> PreprocessConfig:
        return preprocess_config(self._preprocess)

    def tokenize(self, texts: list[str]) -> Any:
        """int64 (B, context) token ids, as open_clip tokenizes (its cleaning included)."""
        return self.tokenizer(list(texts)).long()
