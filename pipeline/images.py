"""Image decoding: bytes in, one normalized 8-bit RGB PIL image out, or a recorded reason why not.

Every place that loads a picture (dataset rows, cached files, query images, crops) goes through
`decode_image`, so EXIF orientation, transparency, CMYK, 16-bit and grayscale are handled once.
"""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dataset import arrow_numpy
from .errors import PipelineError

# A header may claim any size; we refuse before allocating. 100 Mpx is ~4x a 50 Mpx camera frame.
MAX_PIXELS = 100_000_000

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(PipelineError, ValueError):
    """One image could not be turned into RGB pixels; the message says why. A PipelineError, as every
    error the API raises for what it was given (a service catching that answers 4xx for a bad upload)."""


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image plus facts about its source.

    Attributes:
        image: 8-bit RGB PIL image, EXIF orientation applied. May be a reduced-size decode when
            `min_side` was given (JPEG draft mode); `width`/`height` are always the source size.
        width, height: size of the source picture after EXIF rotation, in pixels.
        note: anything the caller should record (e.g. "animated: frame 1 of 12 used"), else "".
    """

    image: Image.Image
    width: int
    height: int
    note: str = ""


def rgb_array(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels: uint8 (H, W, 3), a new array; the same values as np.asarray(image).

    Pillow keeps RGB as 4 bytes a pixel; np.asarray packs them through tobytes (0.7 ms for a
    384x512 photo). Its Arrow export lends the 4-byte rows without a copy and OpenCV drops the
    fourth byte (0.06 ms). An image whose rows are not in one block (large ones) or are padded
    (Pillow's row alignment set), an empty one, or a Pillow without the export, goes the long way.
    """
    if image.mode != "RGB":
        raise ValueError(f"rgb_array expects an RGB image, got mode {image.mode!r}")
    import cv2
    import pyarrow as pa

    w, h = image.size
    if w * h == 0 or getattr(Image.core, "get_alignment", lambda: 1)() != 1:  # padded rows: not one packed block
        return np.array(image)
    try:
        rgbx = arrow_numpy(pa.array(image).flatten())
    except (AttributeError, TypeError, ValueError, pa.ArrowException):
        return np.array(image)
    if rgbx.size != w * h * 4:
        return np.array(image)
    return cv2.cvtColor(rgbx.reshape(h, w, 4), cv2.COLOR_RGBA2RGB)


def sniff_format(data: bytes) -> str | None:
    """Return "jpg" or "png" when the bytes carry that signature, else None."""
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels are composited onto white.

    Args:
        image: a loaded PIL image of any mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, YCbCr, ...).
    Returns:
        An RGB image of the same size.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # Palette images may carry transparency through the tRNS chunk.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit greyscale: scale to 8 bits by the value range of the type, not clipping.
        arr = np.asarray(image)
        if arr.dtype.kind in "ui" and arr.dtype.itemsize >= 2:
            top = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        else:
            top = max(float(arr.max(initial=0)), 1.0) if arr.dtype.kind == "f" else 255.0
        return Image.fromarray(_scaled_to_bytes(arr, 255.0 / top), mode="L").convert("RGB")
    return image.convert("RGB")


SCALE_BLOCK_VALUES = 1 << 18  # values scaled at a time: 2 MiB of float64 whatever the picture's size


def _scaled_to_bytes(arr: np.ndarray, factor: float) -> np.ndarray:
    """uint8 of arr x factor, clipped to 0..255 and rounded half to even, a block of rows at a time
    (scaled whole, a 40-megapixel 16-bit picture took three float64 copies of itself: 1.4 GB)."""
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, SCALE_BLOCK_VALUES // max(1, arr[0].size if len(arr) else 1))
    for y in range(0, len(arr), rows):
        block = arr[y:y + rows].astype(np.float64)
        block *= factor
        np.clip(block, 0, 255, out=block)
        out[y:y + rows] = np.rint(block, out=block)
    return out


def decode_image(data: bytes, min_side: int | None = None, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode encoded image bytes into a normalized RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF, TIFF, BMP, ...).
        min_side: when set, a JPEG may be decoded at a reduced scale (1/2, 1/4, 1/8) as long as
            both sides stay >= min_side; this is what makes 768x1024 sources cheap to embed.
        max_pixels: refuse pictures whose header claims more pixels than this, before decoding.
    Returns:
        DecodedImage.
    Raises:
        ImageDecodeError: empty, unreadable, truncated, too large, or not an image.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; PIL still raises past twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = pil_open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"not a recognized image format ({what_it_looks_like(data)})") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"refused as a decompression bomb: {short_reason(e)}") from e
    except Exception as e:  # noqa: BLE001 - a damaged file makes Pillow's parsers raise many types
        # (OSError, SyntaxError, ValueError, and from damaged GIFs and TIFFs struct.error, IndexError,
        # TypeError): each is this item's failure, never the run's
        raise ImageDecodeError(f"cannot read image header: {_reason(e)}") from e
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"refused: header claims {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
        )
    note = ""
    try:
        frames = getattr(image, "n_frames", 1)  # counting frames reads the whole file: it may be damaged
        if getattr(image, "is_animated", False) and frames > 1:
            image.seek(0)
            note = f"animated {image.format}: frame 1 of {frames} used"
        if min_side and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
            # draft() picks the largest DCT reduction that keeps both sides >= the requested box,
            # so the short side stays >= min_side whatever the EXIF rotation.
            image.draft(image.mode, (min_side, min_side))
        image.load()
        # In place: without it Pillow returns a copy of every upright image.
        ImageOps.exif_transpose(image, in_place=True)
        image = to_rgb(image)
    except Exception as e:  # noqa: BLE001 - as above: any decoder error is this item's failure
        raise ImageDecodeError(f"cannot decode pixels: {_reason(e)}") from e
    w, h = _oriented_size(width, height, image)
    return DecodedImage(image=image, width=w, height=h, note=note)


def what_it_looks_like(data: bytes) -> str:
    """What a file that is no image seems to be, in words a person reads in a failure list (not its
    bytes): "it starts like a text file", "it is a PDF document", ..."""
    head = data[:512]
    stripped = head.lstrip().lower()
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "it is a HEIC/HEIF photo, which this install cannot read: pip install pillow-heif"
        if brand in (b"avif", b"avis"):
            return "it is an AVIF picture, which this Pillow cannot read"
        return "it is a video or other MP4/MOV file"
    for magic, what in _NOT_IMAGES:
        if head.startswith(magic):
            return what
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "it is an HTML page, e.g. an error page saved in place of the picture"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped):
        return "it is an SVG drawing; convert it to PNG"
    if _looks_like_text(head):
        return "it starts like a text file"
    return "unknown binary data"


_NOT_IMAGES = (
    (b"%PDF", "it is a PDF document"),
    (b"PK\x03\x04", "it is a ZIP archive"),
    (b"\x1f\x8b", "it is gzip-compressed data"),
    (b"\x1a\x45\xdf\xa3", "it is a WebM/Matroska video"),
)


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 (a character cut by the 512-byte sample allowed) without control characters."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f" for c in text)


def pil_open(fp) -> Image.Image:
    """PIL's own Image.open. Importing ultralytics replaces PIL.Image.open process-wide with a wrapper
    that, on any unidentified file, tries to pip-install pi-heif and retries; a corrupt catalogue
    image must be a recorded failure here, not an install attempt."""
    opener = Image.open
    module = getattr(opener, "__module__", "") or ""
    if module.startswith("ultralytics"):
        opener = getattr(sys.modules.get(module), "_image_open", opener)
    return opener(fp)


def _oriented_size(width: int, height: int, image: Image.Image) -> tuple[int, int]:
    """Source size after EXIF rotation, judged from the decoded image's aspect."""
    iw, ih = image.size
    if (iw >= ih) == (width >= height) or width == height:
        return width, height
    return height, width


def _reason(e: BaseException) -> str:
    """A decoder's error in a failure list: the errors Pillow means for bad files as they are, any
    other (its parsers' IndexError, struct.error, ... on a damaged file) said to be damage. Memory
    running out is the run's problem, not the file's: raised again."""
    if isinstance(e, MemoryError):
        raise e
    if isinstance(e, Image.DecompressionBombError):
        return f"refused as a decompression bomb: {short_reason(e)}"
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
        return short_reason(e)
    return f"damaged or unsupported file ({type(e).__name__}: {short_reason(e)})"


def short_reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def encode_png(image: Image.Image) -> bytes:
    """Encode an RGB image as PNG (lossless): person crops, and sources that are neither JPEG nor PNG.

    OpenCV's encoder with the SUB filter and zlib's RLE strategy: several times faster than Pillow
    at its fastest level, for files no larger, and the same pixels back.
    """
    import cv2

    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    params = [
        cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_SUB,
    ]
    ok, data = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - OpenCV reports no reason
        raise ValueError(f"PNG encoding of a {image.size} image failed")
    return data.tobytes()


def encode_jpeg(image: Image.Image, quality: int = 92, full_colour: bool = False) -> bytes:
    """Encode an RGB image as JPEG, for derived pictures (crops, composites). full_colour: colour
    at every pixel (4:4:4), for a sheet of small pictures side by side, where halved colour
    (4:2:0, the default) bleeds a line of each picture's colour into its neighbour's edge."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, **({"subsampling": 0} if full_colour else {}))
    return buf.getvalue()
