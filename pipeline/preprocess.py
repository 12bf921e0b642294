"""CLIP image preprocessing on the CPU: RGB image in, float32 (3, H, W) tensor out.

Both embedding backends use this. Two resizers, recorded in a store's identity as its "pixels":

- "pil" (the default): Pillow's resize: the pixels of `transformers.CLIPImageProcessorPil` (the
  processor OpenAI CLIP trained with) and of open_clip's own transform, to 1e-6.
- "pil+torch" (--decode cpu-simd): torch's uint8 antialiased resize, which runs in SIMD (0.3 ms
  for a 384x512 photo to 224 px, against Pillow's 2.1 ms): the pixels of transformers 5's default
  `CLIPImageProcessor`, which resizes so, to 1e-6. Importing torch takes about 1.5 s of a core
  and 480 MiB of memory, which a run of the ONNX file otherwise does without: so it is asked for.

The two differ by at most two 8-bit steps on a few pixels in a thousand (tests/test_preprocess.py).
Either way Pillow decodes. Resample filters torch has no antialiased kernel for (nearest, Lanczos,
box, Hamming) resize with Pillow under both names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import rgb_array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Beyond this aspect ratio the long side is cut down around the centre before resizing, so a
# 1x4000 strip is never resized to 224x896000. Below it the result is exactly the processor's.
MAX_ASPECT_BEFORE_PRECROP = 8.0

# Which code makes a CPU store's pixels (identity "pixels"; "torchvision" is the device path's, gpu.py)
PIL_PIXELS = "pil"
TORCH_RESIZE_PIXELS = "pil+torch"
CPU_PIXELS = (TORCH_RESIZE_PIXELS, PIL_PIXELS)
DEVICE_PIXELS = "torchvision"
# --decode -> pixels
PIXELS_OF_DECODE = {"cpu": PIL_PIXELS, "cpu-simd": TORCH_RESIZE_PIXELS, "device": DEVICE_PIXELS}
CPU_DECODES = tuple(d for d, p in PIXELS_OF_DECODE.items() if p in CPU_PIXELS)  # --decode values of the CPU path


def cpu_pixels(decode: str) -> str:
    """The CPU's resizer (CPU_PIXELS) for a --decode choice: torch's with cpu-simd, else Pillow's."""
    return PIXELS_OF_DECODE[decode] if decode in CPU_DECODES else PIL_PIXELS


_TORCH_MODES = {2: "bilinear", 3: "bicubic"}  # PIL's numbering -> torch's antialiased uint8 kernels

_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """The parameters of a CLIP or SigLIP image processor that matter for pixels.

    shortest_edge: CLIP's resize, the short side to this size, the aspect kept. resize_height and
    resize_width (when set): SigLIP's, the picture squashed to exactly this size, the aspect not
    kept (its processor's `size: {height, width}`); then usually no crop.
    """

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3  # PIL's numbering: 3 = bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    # Per channel in RGB order; any length that broadcasts over the channels, as the processor allows.
    image_mean: tuple[float, ...] = field(default=CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=CLIP_STD)
    resize_height: int = 0  # 0: not squashed (CLIP); left out of the JSON then, as stores made before it lack it
    resize_width: int = 0
    # The crop's offset when the margin is odd: transformers' floor (False), or torchvision's round half to
    # even (True: open_clip's "shortest" transform), which differ when the margin is 3 mod 4. Left out of the
    # JSON when False.
    crop_round: bool = False

    @classmethod
    def from_processor_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Read a Hugging Face `preprocessor_config.json` dict (CLIPImageProcessor keys)."""
        size = d.get("size", {"shortest_edge": 224})
        squash = isinstance(size, dict) and "shortest_edge" not in size and "height" in size and "width" in size
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            shortest = int(min(size.get("height", 224), size.get("width", 224)))
        crop = d.get("crop_size", size if squash else {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        # SigLIP's processor has no crop at all; CLIP's crops unless told not to
        center_crop = d.get("do_center_crop", "crop_size" in d or not squash)
        return cls(
            resize_height=int(size["height"]) if squash else 0,
            resize_width=int(size["width"]) if squash else 0,
            shortest_edge=shortest,
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            resample=int(d.get("resample", 3)),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(center_crop),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=tuple(float(x) for x in d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", CLIP_STD)),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> PreprocessConfig:
        """Read `preprocessor_config.json` from a model folder; CLIP defaults when it is absent."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        return cls.from_processor_dict(json.loads(path.read_text()))

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        d = json.loads(text)
        d["image_mean"] = tuple(d["image_mean"])
        d["image_std"] = tuple(d["image_std"])
        return cls(**d)

    def to_json(self) -> str:
        d = asdict(self)
        if not self.resize_height:  # CLIP's: the JSON of stores made before SigLIP, unchanged
            del d["resize_height"], d["resize_width"]
        if not self.crop_round:
            del d["crop_round"]
        return json.dumps(d, sort_keys=True)

    def crop_offset(self, margin: int) -> int:
        """Where the centre crop starts in a side `margin` pixels longer than it."""
        return round(margin / 2) if self.crop_round else margin // 2

    @property
    def squash(self) -> bool:
        return self.resize_height > 0

    @property
    def decode_min_side(self) -> int:
        """Smallest short side a reduced-scale decode may have without changing the resize input much."""
        if self.do_resize and self.squash:  # both sides must stay at least the target's
            return max(self.resize_height, self.resize_width)
        return self.shortest_edge if self.do_resize else max(self.crop_height, self.crop_width)


def resize_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False) for a shortest_edge."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def precrop_box(width: int, height: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) that cuts the long side of a very elongated image down to
    MAX_ASPECT_BEFORE_PRECROP x the short side, around the centre; None when no cut is needed."""
    short, long = min(width, height), max(width, height)
    if long <= short * MAX_ASPECT_BEFORE_PRECROP:
        return None
    keep = int(short * MAX_ASPECT_BEFORE_PRECROP)
    start = (long - keep) // 2
    return (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)


def _precrop_extreme(image: Image.Image) -> Image.Image:
    box = precrop_box(*image.size)
    return image if box is None else image.crop(box)


def preprocess(image: Image.Image, prep: PreprocessConfig, pixels: str = PIL_PIXELS) -> np.ndarray:
    """Turn one RGB image into the model's input.

    Args:
        image: 8-bit RGB PIL image of any size.
        prep: preprocessing parameters.
        pixels: the resizer, one of CPU_PIXELS (see the module docstring).
    Returns:
        float32 array (3, crop_height, crop_width), channels in RGB order.
    """
    return to_model_input(resize_for_model(image, prep, pixels), prep)


def resize_for_model(image: Image.Image, prep: PreprocessConfig, pixels: str = PIL_PIXELS) -> Image.Image:
    """The resize step alone (shortest side to prep.shortest_edge) with the resizer `pixels` names;
    callers may reuse its output, e.g. for a thumbnail, before `to_model_input`."""
    if image.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image, got mode {image.mode!r}")
    if pixels not in CPU_PIXELS:
        raise ValueError(f"pixels must be one of {CPU_PIXELS}, got {pixels!r}")
    if prep.do_resize and prep.squash:  # SigLIP: to exactly this size, as its processor does
        size = (prep.resize_width, prep.resize_height)
        return image if size == image.size else _resize(image, size, prep.resample, pixels)
    if prep.do_resize:
        image = _precrop_extreme(image)
        size = resize_size(image.width, image.height, prep.shortest_edge)
        if size != image.size:
            image = _resize(image, size, prep.resample, pixels)
    return image


def _resize(image: Image.Image, size: tuple[int, int], resample: int, pixels: str) -> Image.Image:
    """`image` resized to size (width, height) by Pillow or by torch's antialiased uint8 kernel."""
    mode = _TORCH_MODES.get(resample)
    if pixels == PIL_PIXELS or mode is None:
        return image.resize(size, _RESAMPLE.get(resample, Image.Resampling.BICUBIC))
    return Image.fromarray(torch_resize(rgb_array(image), size, mode))


def torch_resize(rgb: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) for size (width, height), antialiased, as
    torchvision's resize of a uint8 tensor (transformers' default image processors): torch's SIMD
    kernel reads the pixels where they lie (channels last), rounding each to its 8-bit level."""
    import torch

    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # a view: (1, 3, H, W) laid out channels last
    out = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode=mode, antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def to_model_input(resized: Image.Image, prep: PreprocessConfig) -> np.ndarray:
    """Centre crop, rescale and normalize a resized image: float32 (3, crop_height, crop_width)."""
    return normalize_crop(model_crop(resized, prep), prep)


def model_crop(resized: Image.Image, prep: PreprocessConfig) -> np.ndarray:
    """The pixels the model sees, still uint8 (H, W, 3): a quarter of the bytes of its input."""
    arr = rgb_array(resized)
    if prep.do_center_crop:
        arr = _center_crop(arr, prep.crop_height, prep.crop_width, prep)
    return arr


def normalize_crop(arr: np.ndarray, prep: PreprocessConfig) -> np.ndarray:
    """model_crop's pixels rescaled and normalized: float32 (3, H, W)."""
    # uint8 -> float through a 256-entry table per channel: the same float32 arithmetic as
    # rescale-then-normalize, done once per value instead of once per pixel. OpenCV's LUT maps
    # the three channels in one pass (~3x faster than numpy's take per channel, same values).
    import cv2

    hwc = cv2.LUT(np.ascontiguousarray(arr), _value_table_hwc(prep))
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


@lru_cache(maxsize=8)
def value_table(prep: PreprocessConfig) -> np.ndarray:
    """float32 (3, 256): the model input value of each 8-bit level, per channel."""
    v = np.arange(256, dtype=np.float32)[None, :].repeat(3, axis=0)
    if prep.do_rescale:
        v *= np.float32(prep.rescale_factor)
    if prep.do_normalize:
        v -= np.asarray(prep.image_mean, dtype=np.float32)[:, None]
        v /= np.asarray(prep.image_std, dtype=np.float32)[:, None]
    v.flags.writeable = False
    return v


@lru_cache(maxsize=8)
def _value_table_hwc(prep: PreprocessConfig) -> np.ndarray:
    """_value_table laid out as OpenCV's LUT wants it: float32 (1, 256, 3)."""
    return np.ascontiguousarray(value_table(prep).T.reshape(1, 256, 3))


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int, prep: PreprocessConfig) -> np.ndarray:
    """transformers' center_crop: pads with zeros when the image is smaller than the crop (the
    offset of an odd margin as `prep` says: torchvision's for open_clip)."""
    h, w = arr.shape[:2]
    if h < crop_h or w < crop_w:
        padded = np.zeros((max(h, crop_h), max(w, crop_w), arr.shape[2]), dtype=arr.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = prep.crop_offset(h - crop_h), prep.crop_offset(w - crop_w)
    return arr[top : top + crop_h, left : left + crop_w]


def preprocess_batch(images: Iterable[Image.Image], prep: PreprocessConfig,
                     pixels: str = PIL_PIXELS) -> np.ndarray:
    """Stack preprocessed images into float32 (B, 3, H, W) (pixels: the resizer, as `preprocess`)."""
    arrays = [preprocess(im, prep, pixels) for im in images]
    if not arrays:
        return np.zeros((0, 3, prep.crop_height, prep.crop_width), dtype=np.float32)
    return np.stack(arrays)
