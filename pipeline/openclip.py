"""open_clip models (Marqo-FashionSigLIP, Marqo-FashionCLIP, LAION's and OpenAI's ViTs) behind the
interface the rest of the pipeline uses for transformers' CLIPModel and SiglipModel:
`get_image_features`, `get_text_features`, a `config` with the vector length and text context,
the preprocessing read from open_clip's own configuration, and open_clip's tokenizer.

A model is named three ways (`--model`):
- `hf-hub:Marqo/marqo-fashionSigLIP`: open_clip's hub form (its open_clip_config.json and weights);
- a folder holding `open_clip_config.json` and the weights (what that hub repository holds);
- `open_clip:ARCH:FILE`: an open_clip architecture name and a local weights file
  (`open_clip:ViT-B-32:/models/vit-b-32.bin`), preprocessed as the architecture's published weights;
- the plain hub id (`Marqo/marqo-fashionSigLIP`), whose config.json names its open_clip model
  (`open_clip_model_name`): loaded through open_clip, not transformers' remote code.

open_clip is imported only here, and only for such a model: the default path never needs it.
"""

from __future__ import annotations

import logging
import re
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .backends import OPEN_CLIP_HUB, open_clip_weights
from .errors import PipelineError, first_line
from .preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig

log = logging.getLogger(__name__)

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's numbering
# open_clip's words for a hub file it could not fetch (offline, or not in the hub cache)
_NOT_DOWNLOADED = re.compile(r"Failed to download|local cache|OfflineModeIsEnabled|LocalEntryNotFound|"
                             r"couldn't connect|Connection", re.IGNORECASE)


def open_clip_source(model: str) -> tuple[str, str | None]:
    """(model_name, pretrained) as open_clip.create_model takes them."""
    if model.startswith(OPEN_CLIP_HUB):
        return model, None
    named = open_clip_weights(model)
    if named is not None:
        arch, weights = named
        if not arch or not weights:
            raise PipelineError(f"--model {model!r}: expected open_clip:ARCH:FILE (e.g. open_clip:ViT-B-32:./vit.bin)")
        if not Path(weights).is_file():
            raise PipelineError(f"--model {model!r}: no weights file {weights}")
        return arch, str(Path(weights).resolve())
    if Path(model).is_dir():
        return "local-dir:" + str(Path(model).resolve()), None
    return OPEN_CLIP_HUB + model, None  # a hub id whose config.json names open_clip (Marqo/marqo-fashionSigLIP)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise PipelineError(f"open_clip models need open_clip_torch ({e}): pip install open_clip_torch") from e
    return open_clip


def _resample(name: str) -> int:
    if name not in _RESAMPLE:
        raise PipelineError(f"open_clip interpolation {name!r} is not supported ({', '.join(_RESAMPLE)})")
    return _RESAMPLE[name]


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
        resample=_resample(cfg.get("interpolation", "bicubic")),
        image_mean=tuple(float(x) for x in cfg.get("mean", CLIP_MEAN)),
        image_std=tuple(float(x) for x in cfg.get("std", CLIP_STD)),
    )
    if mode == "squash":
        return replace(base, resize_height=h, resize_width=w, do_center_crop=False)
    if mode == "shortest" and h == w:
        return replace(base, crop_round=True)  # torchvision's CenterCrop, which open_clip's transform uses
    raise PipelineError(f"open_clip resize_mode {mode!r} with size {size} is not supported (shortest or squash)")


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def architecture_preprocess(open_clip: Any, arch: str, model: str) -> dict[str, Any]:
    """The preprocessing of an architecture's published weights (open_clip's pretrained configs),
    for weights named by a file (open_clip:ARCH:FILE): a fine-tune keeps its base's (a SigLIP's
    squash and 0.5 mean/std, not CLIP's crop and mean that open_clip falls back to). Where the
    published weights differ among themselves, or there are none, open_clip's default (CLIP's),
    said once."""
    from open_clip.transform import PreprocessCfg

    default = PreprocessCfg()
    seen: dict[tuple, list[str]] = {}
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        key = tuple(tuple(v) if isinstance(v := cfg.get(k, getattr(default, k)), (list, tuple)) else v
                    for k in _PREPROCESS_KEYS)
        seen.setdefault(key, []).append(tag)
    if not seen:
        log.warning("--model %s: open_clip knows no published weights of %s, so their preprocessing is unknown: "
                    "CLIP's is used (a model folder with its open_clip_config.json names its own)", model, arch)
        return {}
    if len(seen) > 1:  # ViT-L-14: eleven with CLIP's mean/std, one with 0.5
        kinds = "; ".join(f"{', '.join(tags)}: {dict(zip(_PREPROCESS_KEYS, key))}" for key, tags in seen.items())
        log.warning(
            "--model %s: the published weights of %s are preprocessed in different ways (%s), so the file's is not "
            "known: open_clip's default (CLIP's) is used. If yours differs, name the model by a folder holding the "
            "weights and an open_clip_config.json whose preprocess_cfg says it", model, arch, kinds)
        return {}
    return dict(zip(_PREPROCESS_KEYS, next(iter(seen))))


def _embed_dim(model: Any) -> int:
    """The length of the model's vectors: CLIP keeps it as its text projection's width, CustomTextCLIP
    (SigLIP's ViT-B-16-SigLIP) as its text tower's output_dim."""
    projection = getattr(model, "text_projection", None)
    if projection is not None and hasattr(projection, "shape"):
        return int(projection.shape[-1])
    for tower in (getattr(model, "text", None), getattr(model, "visual", None)):
        dim = getattr(tower, "output_dim", None)
        if dim:
            return int(dim)
    raise PipelineError(f"cannot tell the vector length of open_clip model {type(model).__name__}")


class OpenClipModel(torch.nn.Module):
    """An open_clip model dressed as a transformers image-text model (module docstring); a torch
    module, so that the ONNX export traces its weights."""

    def __init__(self, model: Any, tokenizer_name: str, preprocess: dict[str, Any], name: str) -> None:
        super().__init__()
        self.model, self.name = model, name
        self._tokenizer_name = tokenizer_name
        self._tokenizer: Any = None  # loaded by the first tokenize
        self._preprocess = preprocess
        embed_dim = _embed_dim(model)
        context = int(getattr(model, "context_length", 0) or 77)
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
        except (RuntimeError, ValueError, OSError) as e:  # open_clip raises these for names, files and downloads
            if isinstance(e, OSError) or _NOT_DOWNLOADED.search(str(e)):  # a hub model not here: not "damaged"
                raise OSError(first_line(e)) from e  # said with what to pass (embedders: load_hint)
            raise PipelineError(f"cannot load open_clip model {model!r}: {type(e).__name__}: {e}") from e
        if dtype is not None:
            net = net.to(dtype)
        preprocess = dict(open_clip.get_model_preprocess_cfg(net))
        if pretrained is not None:  # ARCH:FILE: open_clip knows no preprocessing of a file, and gives CLIP's
            preprocess.update(architecture_preprocess(open_clip, name, model))
        return cls(net.eval(), name, preprocess, model)

    # ---------------------------------------------------------------- what transformers' models offer
    def get_image_features(self, pixel_values: Any) -> Any:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: Any, attention_mask: Any = None) -> Any:
        return self.model.encode_text(input_ids)

    # ---------------------------------------------------------------- open_clip's own
    def preprocess_config(self) -> PreprocessConfig:
        return preprocess_config(self._preprocess)

    def text_export(self) -> tuple[Any, str] | str:
        """(the fast Hugging Face tokenizer, the cleaning mode) when open_clip tokenizes this model's
        texts with one (SigLIP's: HFTokenizer), which `tokenizers` can then repeat without torch;
        else why not (CLIP's BPE is open_clip's own Python)."""
        try:
            self.tokenize(["probe"])  # loads it
        except PipelineError as e:  # offline, say: the verified image files are still written
            return str(e)
        tok = self._tokenizer
        inner = getattr(tok, "tokenizer", None)
        if type(tok).__name__ != "HFTokenizer" or not getattr(inner, "is_fast", False):
            return (f"open_clip tokenizes with its own Python code ({type(tok).__name__}), which has no "
                    "torch-free equivalent here")
        if getattr(tok, "tokenizer_mode", "") or getattr(tok, "strip_sep_token", False):
            return "open_clip post-processes this tokenizer's ids (tokenizer_mode / strip_sep_token)"
        modes = {"_clean_whitespace": "whitespace", "_clean_lower": "lower", "_clean_canonicalize": "canonicalize"}
        mode = modes.get(getattr(tok.clean_fn, "__name__", ""))
        if mode is None:
            return f"open_clip cleans texts with {tok.clean_fn!r}, which textclean.py does not repeat"
        return inner, mode

    def tokenize(self, texts: list[str]) -> Any:
        """int64 (B, context) token ids, as open_clip tokenizes (its cleaning included). The tokenizer
        is loaded here, not with the model: a picture-only run or export never needs it (SigLIP's
        comes from the hub)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = _open_clip().get_tokenizer(self._tokenizer_name)
            except (RuntimeError, ValueError, OSError) as e:
                raise PipelineError(f"cannot load the tokenizer of open_clip model {self.name!r}: "
                                    f"{type(e).__name__}: {e}") from e
        return self._tokenizer(list(texts)).long()
