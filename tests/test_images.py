"""decode_image: every odd input becomes 8-bit RGB or a clear ImageDecodeError."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageDecodeError, decode_image, encode_png, rgb_array, sniff_format, to_rgb
from tests import assets


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (wrong) data stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


def test_cmyk_becomes_rgb():
    d = decode_image(assets.cmyk_jpeg(60, 80))
    assert d.image.mode == "RGB" and d.image.size == (60, 80) and (d.width, d.height) == (60, 80)


def test_rgba_transparent_area_is_white_and_opaque_area_kept():
    data = assets.rgba_png(64, 48, seed=2)
    d = decode_image(data)
    arr = np.asarray(d.image)
    assert d.image.mode == "RGB"
    assert (arr[:, 40:] == 255).all()
    src = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
    assert np.array_equal(arr[:, :30], src[:, :30])


def test_grey_with_alpha_composited_on_white():
    arr = np.zeros((6, 10, 2), np.uint8)  # black, left half transparent
    arr[:, 5:, 1] = 255
    out = np.asarray(decode_image(assets.encode(Image.fromarray(arr, "LA"), "PNG")).image)
    assert (out[:, :5] == 255).all() and (out[:, 5:] == 0).all()


def test_palette_with_transparency_composited_on_white():
    im = Image.new("P", (10, 10), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.paste(1, (5, 0, 10, 10))
    im.info["transparency"] = 0
    data = assets.encode(im, "PNG", transparency=0)
    arr = np.asarray(decode_image(data).image)
    assert (arr[:, :5] == 255).all()  # transparent red -> white
    assert (arr[:, 5:] == [0, 0, 255]).all()


def test_exif_orientation_applied():
    d = decode_image(assets.exif_rotated_jpeg(80, 40, orientation=6))
    assert d.image.size == (40, 80)
    assert (d.width, d.height) == (40, 80)


def test_exif_orientation_applied_with_reduced_decode():
    d = decode_image(assets.exif_rotated_jpeg(800, 400, orientation=6), min_side=100)
    assert d.image.width < d.image.height and min(d.image.size) >= 100
    assert (d.width, d.height) == (400, 800)


def test_grayscale_and_16bit_become_8bit_rgb():
    g = np.asarray(decode_image(assets.grayscale_png()).image)
    assert g.dtype == np.uint8 and g.shape[2] == 3 and (g[..., 0] == g[..., 1]).all()
    d16 = np.asarray(decode_image(assets.gray16_png(40, 40)).image)
    assert d16.dtype == np.uint8 and d16.min() == 0 and d16.max() == 255  # scaled, not clipped


def test_16bit_mid_grey_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, np.uint16)
    got = np.asarray(decode_image(assets.encode(Image.fromarray(arr), "PNG")).image)
    assert (got == 128).all()  # 32768 / 65535 * 255 = 127.5 -> 128; clipping would give 255
    low = np.asarray(decode_image(assets.encode(Image.fromarray(np.full((8, 8), 200, np.uint16)), "PNG")).image)
    assert (low == 1).all()  # 200 of 65535 is nearly black, not 200 of 255


def test_big_endian_16bit_is_scaled_too():
    # TIFFs from scanners and microscopes are often 16-bit big-endian ("I;16B")
    arr = np.full((8, 8), 32768, np.uint16)
    tiff = assets.encode(Image.frombytes("I;16B", (8, 8), arr.astype(">u2").tobytes()), "TIFF")
    assert (np.asarray(decode_image(tiff).image) == 128).all()


def test_a_16bit_picture_is_scaled_in_blocks_to_the_same_bytes_within_a_bounded_memory():
    """Scaled whole, a 16-bit picture took three float64 copies of itself: a 40-megapixel upload
    (the search page's limit) held 1.4 GB of the server's memory, five times an RGB one's."""
    import tracemalloc

    from pipeline.images import to_rgb

    rs = np.random.default_rng(3)
    arr = rs.integers(0, 65536, (1500, 1400), dtype=np.uint16)  # 2.1 megapixels: 16.8 MB as float64
    arr[0, :4] = [0, 128, 257, 65535]  # 0, 0.4998 -> 0, 0.99996 -> 1, 255
    image = Image.fromarray(arr)
    tracemalloc.start()
    rgb = to_rgb(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    got = np.asarray(rgb)
    whole = np.clip(arr.astype(np.float64) * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
    assert got.shape == (1500, 1400, 3) and (got[..., 0] == whole).all() and (got[..., 2] == whole).all()
    assert list(got[0, :4, 0]) == [0, 0, 1, 255]
    assert peak < 8 * arr.size  # the uint16 pixels, the uint8 result and one block: not a float64 copy (8 x size)


@pytest.mark.parametrize("size", [(1600, 2400), (2400, 1000), (900, 230)])
def test_draft_decode_never_goes_below_the_model_side_and_embeds_like_a_full_decode(size, tiny_onnx):
    """Tolerance: the draft decode's embedding is within cosine 0.999 of the full decode's."""
    from pipeline.embedders import OnnxEmbedder
    from pipeline.preprocess import preprocess

    e = OnnxEmbedder(tiny_onnx)
    side = e.preprocess_cfg.decode_min_side
    data = assets.encode(assets.rgb_image(*size, seed=7), "JPEG", quality=92)
    draft, full = decode_image(data, min_side=side), decode_image(data)
    assert min(draft.image.size) >= side and full.image.size == size
    if min(size) >= 2 * side:  # room for at least a 1/2 reduction
        assert draft.image.size[0] <= size[0] // 2
    a, b = (e.embed(preprocess(d.image, e.preprocess_cfg)[None])[0] for d in (draft, full))
    assert float(a @ b) >= 0.999


def test_draft_decode_keeps_short_side_at_least_requested():
    d = decode_image(assets.jpeg_bytes(768, 1024), min_side=224)
    assert min(d.image.size) >= 224 and d.image.size[0] < 768
    assert (d.width, d.height) == (768, 1024)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"^empty file \(0 bytes\)$"),
        (b"just some text pretending to be a jpg", "not a recognized image format"),
        (assets.jpeg_bytes(200, 200)[:1500], "cannot decode pixels"),
        (png_header_only(50_000, 50_000), "decompression bomb|over the limit"),
    ],
    ids=["zero-bytes", "text", "truncated-jpeg", "bomb"],
)
def test_bad_inputs_raise_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


@pytest.mark.parametrize(
    "data, said",
    [
        (b"hello\n", "it starts like a text file"),
        ("robe à fleurs 连衣裙\n".encode() * 40, "it starts like a text file"),  # UTF-8 cut mid-character at 512
        (b"  <!DOCTYPE html><html><body>404</body></html>", "it is an HTML page"),
        (b"%PDF-1.7\n%\xe2\xe3", "it is a PDF document"),
        (b"PK\x03\x04\x14\x00", "it is a ZIP archive"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "HEIC/HEIF photo, which this install cannot read: pip install"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00", "it is a video or other MP4/MOV file"),
        (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "it is an SVG drawing"),
        (b"\x00\x01\x02\x03\xfe\xff", "unknown binary data"),
    ],
    ids=["text", "utf8", "html", "pdf", "zip", "heic", "mp4", "svg", "binary"],
)
def test_a_file_that_is_no_image_is_described_in_words_not_bytes(data, said):
    """The failure list names what the file seems to be, never a Python bytes repr (b'hello\\n')."""
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data)
    message = str(e.value)
    assert message.startswith("not a recognized image format (") and said in message
    assert "b'" not in message and "\\x" not in message


def test_limit_checked_before_allocation():
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(png_header_only(2_000, 1_000), max_pixels=1_000_000)


def test_animated_gif_uses_first_frame_and_says_so():
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = assets.encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    d = decode_image(data)
    assert "frame 1 of 3" in d.note
    assert tuple(np.asarray(d.image)[10, 10]) == (255, 0, 0)


def test_damaged_gifs_and_tiffs_are_an_items_failure_never_another_error():
    """Pillow's GIF and TIFF parsers raise IndexError, TypeError, struct.error, ... on damaged files,
    some while counting frames: every cut and every changed byte of these files is decoded or an
    ImageDecodeError (recorded as the row's failure), never an error that stops the run."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8))
    frames = [base.rotate(90).convert("P"), base.convert("P")]
    files = {"gif": assets.encode(base.convert("P"), "GIF", save_all=True, append_images=frames),
             "tiff": assets.encode(base, "TIFF", save_all=True, append_images=[base.rotate(180)])}
    outcomes: dict[str, int] = {}
    for data in files.values():
        damaged = [data[:cut] for cut in range(1, len(data), 3)]
        damaged += [data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1 :] for k in range(0, min(len(data), 600))]
        for bad in damaged:
            try:
                decoded = decode_image(bad)
                assert decoded.image.mode == "RGB"
                outcomes["decoded"] = outcomes.get("decoded", 0) + 1
            except ImageDecodeError as e:
                kind = str(e).split(":")[0].split(" (")[0]
                outcomes[kind] = outcomes.get(kind, 0) + 1
    assert outcomes["decoded"] > 0 and sum(outcomes.values()) > 3000
    assert set(outcomes) <= {"decoded", "cannot read image header", "cannot decode pixels", "refused",
                             "refused as a decompression bomb", "not a recognized image format",
                             "empty file"}, outcomes


def test_memory_running_out_is_not_taken_for_a_damaged_file(monkeypatch):
    data = assets.jpeg_bytes(20, 20)

    def out_of_memory(self, *a, **k):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", out_of_memory)
    with pytest.raises(MemoryError):
        decode_image(data)


def test_sniff_format():
    assert sniff_format(assets.jpeg_bytes(10, 10)) == "jpg"
    assert sniff_format(assets.rgba_png()) == "png"
    assert sniff_format(assets.webp_bytes()) is None


def test_to_rgb_keeps_rgb_untouched():
    im = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(im) is im


def test_png_encoding_is_lossless_and_in_rgb_order():
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    arr[:, :10] = 255  # a white margin, as person crops have
    arr[0, 0] = (255, 0, 0)
    data = encode_png(Image.fromarray(arr))
    assert sniff_format(data) == "png"
    back = np.asarray(Image.open(__import__("io").BytesIO(data)))
    assert back.shape == arr.shape and np.array_equal(back, arr)
    grey = np.asarray(decode_image(encode_png(Image.fromarray(arr[..., 0], mode="L"))).image)
    assert np.array_equal(grey[..., 0], arr[..., 0]) and np.array_equal(grey[..., 2], arr[..., 0])


def test_error_messages_are_shortened_to_200_characters():
    from pipeline.images import short_reason

    assert short_reason(ValueError("x" * 200)) == "x" * 200
    long = short_reason(ValueError("y" * 201))
    assert len(long) == 200 and long.endswith("...") and long.startswith("y" * 197)
    assert short_reason(OSError("  spaced  ")) == "spaced"
    assert short_reason(KeyError()) == "KeyError"  # no message: the type names the problem


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (512, 384)])
def test_rgb_array_is_the_pixels_np_asarray_gives(hw):
    rng = np.random.default_rng(hw[0])
    pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    got = rgb_array(image)
    assert got.dtype == np.uint8 and got.shape == (*hw, 3) and got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, pixels)
    # a crop and a decoded JPEG (Pillow's own 4-byte rows, filled by its decoder)
    half = max(1, hw[1] // 2)
    np.testing.assert_array_equal(rgb_array(image.crop((0, 0, half, hw[0]))), pixels[:, :half])
    jpeg = decode_image(assets.jpeg_bytes(hw[1], hw[0], seed=hw[0])).image
    np.testing.assert_array_equal(rgb_array(jpeg), np.asarray(jpeg))


def test_rgb_array_of_an_image_in_several_memory_blocks_goes_the_long_way():
    """Pillow keeps a large image in blocks of rows that Arrow cannot lend as one: the same pixels
    come back through np.array."""
    old = Image.core.get_block_size()
    Image.core.set_block_size(4096)  # a 200x300 image in ~60 blocks, as a 100 Mpx one in 16 MiB blocks
    try:
        pixels = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        with pytest.raises(ValueError):  # Pillow 13: "Image rows are not contiguous in memory."
            import pyarrow as pa

            pa.array(image)
        np.testing.assert_array_equal(rgb_array(image), pixels)
    finally:
        Image.core.set_block_size(old)


@pytest.mark.parametrize("wh", [(5, 3), (0, 4)])
def test_rgb_array_of_padded_rows_or_no_pixels_is_still_the_pixels(wh):
    """With Pillow's row alignment set, rows are padded: not what Arrow's export lends as packed."""
    old = Image.core.get_alignment()
    Image.core.set_alignment(32)
    try:
        pixels = np.random.default_rng(2).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels) if wh[0] else Image.new("RGB", wh)
        got = rgb_array(image)
        assert got.shape == (wh[1], wh[0], 3)
        np.testing.assert_array_equal(got, pixels if wh[0] else np.zeros((wh[1], 0, 3), np.uint8))
    finally:
        Image.core.set_alignment(old)


def test_rgb_array_refuses_other_modes():
    with pytest.raises(ValueError, match="expects an RGB image, got mode 'L'"):
        rgb_array(Image.new("L", (4, 4)))
