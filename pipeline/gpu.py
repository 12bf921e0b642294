"""Decode and preprocess on the GPU: JPEG bytes in, model inputs and thumbnails out, on the device.

JPEGs are decoded in batches by torchvision's decoder (nvJPEG on CUDA); their EXIF orientation is
read from the header on the CPU and applied to the tensor; resize (shortest side, bicubic with
antialias), the pre-crop of extreme aspects, centre crop, rescale and normalize follow the model's
PreprocessConfig with the same geometry and value table as preprocess.py; thumbnails are made from
the same resized tensors. Everything the decoder cannot take (PNG, WebP, GIF, CMYK, greyscale or
16-bit JPEGs, damaged bytes) is left to the CPU decoder by the caller: `inspect_jpeg` says which.

Runs on CPU tensors as well (torchvision decodes JPEGs on the CPU too), which is how it is tested.
Differences from the CPU path (PIL, with a reduced-size JPEG decode): README, "GPU preprocessing".
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from .images import JPEG_MAGIC, MAX_PIXELS, pil_open
from .plots import THUMB_SIZE
from .preprocess import PreprocessConfig, precrop_box, resize_size, value_table

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG the device decoder takes: its bytes, its EXIF orientation (1-8), and its size as stored
    (width, height before orientation)."""

    data: bytes
    orientation: int
    width: int
    height: int

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) as displayed: orientations 5-8 swap the sides."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def inspect_jpeg(data: bytes | None, max_pixels: int = MAX_PIXELS) -> EncodedJpeg | None:
    """Read a JPEG's header on the CPU (no pixels decoded). None when the device decoder should not
    take it: not a JPEG, not 8-bit colour (CMYK, greyscale), over the pixel limit, or unreadable;
    the CPU decoder then decodes it or records why it cannot."""
    if not data or not data.startswith(JPEG_MAGIC):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = pil_open(io.BytesIO(data))
            if im.format != "JPEG" or not isinstance(im, JpegImageFile) or im.mode != "RGB" or im.bits != 8:
                return None
            width, height = im.size
            if width * height > max_pixels or width < 1 or height < 1:
                return None
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return EncodedJpeg(data, orientation if 1 <= orientation <= 8 else 1, width, height)


def orient(image: Any, orientation: int) -> Any:
    """Apply an EXIF orientation to a (C, H, W) tensor, as PIL's exif_transpose does."""
    import torch

    if orientation == 2:
        return torch.flip(image, dims=(2,))
    if orientation == 3:
        return torch.rot90(image, 2, dims=(1, 2))
    if orientation == 4:
        return torch.flip(image, dims=(1,))
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(1, 2))
    if orientation == 7:
        return torch.rot90(image, 2, dims=(1, 2)).transpose(1, 2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(1, 2))
    return image


class DevicePreprocessor:
    """JPEG bytes -> model inputs (B, 3, H, W) and thumbnails (B, T, T, 3) on one torch device.

    Args:
        prep: the model's preprocessing.
        device: "cuda", "cuda:1" or "cpu".
        dtype: the model input's dtype (float16 for an fp16 model).
    """

    def __init__(self, prep: PreprocessConfig, device: str = "cuda", dtype: Any = None) -> None:
        import torch

        self.torch, self.prep, self.device = torch, prep, torch.device(device)
        self.dtype = dtype or torch.float32
        # uint8 level -> model input value, per channel: the table preprocess.py uses, so the values
        # after rescale and normalize are the CPU path's to the last bit.
        self.table = torch.from_numpy(value_table(prep).copy()).to(self.device)

    def decode(self, jpegs: Sequence[EncodedJpeg]) -> list[Any]:
        """Decode a batch, oriented: one uint8 (3, H, W) tensor on the device per JPEG, or None for
        one the decoder refused (the caller decodes it on the CPU)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        torch = self.torch
        if not jpegs:
            return []
        pinned = self.device.type == "cuda"
        inputs = []
        for j in jpegs:
            t = torch.frombuffer(bytearray(j.data), dtype=torch.uint8)
            inputs.append(t.pin_memory() if pinned else t)  # only compressed bytes cross to the GPU
        try:
            images: list[Any | None] = list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad JPEG fails the whole batch: decode one by one
            images = []
            for t in inputs:
                try:
                    images.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        out = []
        for j, im in zip(jpegs, images):
            if im is not None and tuple(im.shape[1:]) != (j.height, j.width):
                im = None  # the header lied: leave it to the CPU decoder
            out.append(None if im is None else orient(im, j.orientation))
        return out

    def resize(self, images: Any) -> Any:
        """Pre-crop extreme aspects, then resize the shortest side to prep.shortest_edge (bicubic,
        antialiased, rounded to 8-bit levels like PIL's): uint8 (N, 3, h, w) of one size in, the
        same out at the new size."""
        _, _, h, w = images.shape
        if not self.prep.do_resize:
            return images
        if self.prep.squash:  # SigLIP: to exactly this size, no pre-crop (as its processor)
            new_h, new_w = self.prep.resize_height, self.prep.resize_width
            if (new_w, new_h) == (w, h):
                return images
            return _interpolate(images, new_h, new_w, "bicubic" if self.prep.resample == 3 else "bilinear")
        box = precrop_box(w, h)
        if box is not None:
            left, top, right, bottom = box
            images, w, h = images[:, :, top:bottom, left:right], right - left, bottom - top
        new_w, new_h = resize_size(w, h, self.prep.shortest_edge)
        if (new_w, new_h) == (w, h):
            return images
        return _interpolate(images, new_h, new_w, "bicubic" if self.prep.resample == 3 else "bilinear")

    def to_model_input(self, resized: Any) -> Any:
        """Centre crop (zero padding when smaller, as transformers does), then rescale and normalize
        through the value table: (N, 3, crop_h, crop_w) in self.dtype."""
        torch = self.torch
        ch, cw = self.prep.crop_height, self.prep.crop_width
        x = resized
        if self.prep.do_center_crop:
            n, _, h, w = x.shape
            if h < ch or w < cw:
                padded = torch.zeros((n, 3, max(h, ch), max(w, cw)), dtype=x.dtype, device=x.device)
                top, left = (padded.shape[2] - h) // 2, (padded.shape[3] - w) // 2
                padded[:, :, top : top + h, left : left + w] = x
                x, h, w = padded, padded.shape[2], padded.shape[3]
            top, left = self.prep.crop_offset(h - ch), self.prep.crop_offset(w - cw)
            x = x[:, :, top : top + ch, left : left + cw]
        flat = x.permute(1, 0, 2, 3).reshape(3, -1).long()
        values = torch.gather(self.table, 1, flat).reshape(3, x.shape[0], *x.shape[2:]).permute(1, 0, 2, 3)
        return values.to(self.dtype)

    def thumbnail(self, resized: Any, size: int = THUMB_SIZE) -> Any:
        """Fit into a size x size white square, keeping the aspect (as plots.make_thumbnail does):
        uint8 (N, size, size, 3)."""
        torch = self.torch
        n, _, h, w = resized.shape
        scale = min(size / w, size / h, 1.0)
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        small = resized if (tw, th) == (w, h) else _interpolate(resized, th, tw, "bilinear")
        canvas = torch.full((n, 3, size, size), 255, dtype=torch.uint8, device=resized.device)
        top, left = (size - th) // 2, (size - tw) // 2
        canvas[:, :, top : top + th, left : left + tw] = small
        return canvas.permute(0, 2, 3, 1)

    def process(self, jpegs: Sequence[EncodedJpeg]) -> tuple[Any, Any, list[int]]:
        """Decode and preprocess a batch on the device; pictures of one size are resized together.

        Returns:
            (model inputs (B', 3, H, W) in self.dtype, thumbnails uint8 (B', T, T, 3), and the
            positions in `jpegs` those B' rows belong to; the others were refused by the decoder).
        """
        torch = self.torch
        groups: dict[tuple[int, int], list[tuple[int, Any]]] = {}
        for k, image in enumerate(self.decode(jpegs)):
            if image is not None:
                groups.setdefault(tuple(image.shape[1:]), []).append((k, image))
        if not groups:
            ch, cw = self.prep.crop_height, self.prep.crop_width
            empty = torch.zeros((0, 3, ch, cw), dtype=self.dtype, device=self.device)
            return empty, torch.zeros((0, THUMB_SIZE, THUMB_SIZE, 3), dtype=torch.uint8, device=self.device), []
        inputs, thumbs, kept = [], [], []
        for members in groups.values():
            decoded = torch.stack([im for _, im in members])
            resized = self.resize(decoded)
            inputs.append(self.to_model_input(resized))
            thumbs.append(self.thumbnail(decoded if self.prep.squash else resized))  # squashed: out of proportion
            kept += [k for k, _ in members]
        order = sorted(range(len(kept)), key=kept.__getitem__)  # back to the batch's order
        index = torch.tensor(order, device=self.device)
        return torch.cat(inputs)[index], torch.cat(thumbs)[index], sorted(kept)


def _interpolate(images: Any, height: int, width: int, mode: str) -> Any:
    """Resize uint8 (N, 3, h, w) with antialiasing, rounded to 8-bit levels as PIL's resize is."""
    import torch

    x = images.float()
    x = torch.nn.functional.interpolate(x, (height, width), mode=mode, antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def to_host(tensor: Any) -> np.ndarray:
    """A device tensor as a numpy array; the copy waits for the device, so call it off the thread
    that feeds the GPU."""
    return tensor.detach().cpu().numpy()
