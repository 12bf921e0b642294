"""CLIP preprocessing on the CPU equals transformers' processors: its default resizer (Pillow's)
CLIPImageProcessorPil, and torch's (--decode cpu-simd) their default CLIPImageProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.preprocess import (
    CPU_PIXELS,
    PIL_PIXELS,
    TORCH_RESIZE_PIXELS,
    PreprocessConfig,
    preprocess,
    preprocess_batch,
    resize_for_model,
)
from tests.assets import rgb_image

SIZES = [(224, 224), (300, 400), (768, 1024), (1000, 333), (225, 223), (57, 91), (4000, 30), (640, 480), (224, 500)]


def _processor(pixels: str, **kwargs):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    return (CLIPImageProcessorPil if pixels == PIL_PIXELS else CLIPImageProcessor)(**kwargs)


@pytest.mark.parametrize("pixels", CPU_PIXELS)
@pytest.mark.parametrize("w,h", SIZES)
def test_equals_the_clip_processor_of_its_resizer(w, h, pixels):
    """Pillow's resize (the default) gives CLIPImageProcessorPil's pixels; torch's (--decode cpu-simd)
    transformers 5's default CLIPImageProcessor's, which resizes with torchvision."""
    im = rgb_image(w, h, seed=w + h)
    ours = preprocess(im, PreprocessConfig(), pixels)
    ref = _processor(pixels)(images=im, return_tensors="np")["pixel_values"][0]
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    if max(w, h) / min(w, h) <= 8:
        assert np.abs(ours - ref).max() < 1e-5
    else:  # beyond 8:1 we pre-crop the long side; the centre crop still agrees almost everywhere
        assert np.mean(np.abs(ours - ref) < 1e-5) > 0.95


@pytest.mark.parametrize("w,h", SIZES[:6])
def test_the_two_resizers_are_within_two_8bit_steps(w, h):
    """Pillow's and torch's antialiased bicubic kernels are the same filter, rounded otherwise; on
    noise (the worst case) a pixel differs by at most two 8-bit steps, and few do."""
    im = rgb_image(w, h, seed=w * h)
    fast, pil = preprocess(im, PreprocessConfig(), TORCH_RESIZE_PIXELS), preprocess(im, PreprocessConfig())
    one_step = 1 / 255 / min(PreprocessConfig().image_std)
    assert np.abs(fast - pil).max() <= 2 * one_step * 1.01
    assert np.abs(fast - pil).mean() < 1e-3
    prep = PreprocessConfig()
    assert resize_for_model(im, prep, TORCH_RESIZE_PIXELS).size == resize_for_model(im, prep).size


def test_bilinear_is_torchs_too_and_other_filters_are_pillows():
    """A processor that asks for bilinear gets torch's antialiased bilinear (the default processor's);
    a filter torch has no antialiased kernel for (Lanczos) is Pillow's under either name."""
    im = rgb_image(300, 400, seed=3)
    bilinear = PreprocessConfig(resample=2)
    ref = _processor(TORCH_RESIZE_PIXELS, resample=2)(images=im, return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess(im, bilinear, TORCH_RESIZE_PIXELS) - ref).max() < 1e-5
    lanczos = PreprocessConfig(resample=1)
    assert np.array_equal(preprocess(im, lanczos, TORCH_RESIZE_PIXELS), preprocess(im, lanczos, PIL_PIXELS))
    with pytest.raises(ValueError, match="pixels must be one of"):
        preprocess(im, PreprocessConfig(), "torchvision")


def test_config_read_from_preprocessor_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 64},
                "crop_size": {"height": 48, "width": 56},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
                "resample": 2,
            }
        )
    )
    cfg = PreprocessConfig.from_model_dir(tmp_path)
    assert (cfg.shortest_edge, cfg.crop_height, cfg.crop_width, cfg.resample) == (64, 48, 56, 2)
    out = preprocess(rgb_image(100, 80), cfg)
    assert out.shape == (3, 48, 56)
    assert PreprocessConfig.from_json(cfg.to_json()) == cfg
    assert PreprocessConfig.from_model_dir(tmp_path / "absent") == PreprocessConfig()


def test_extreme_aspect_is_cheap():
    from PIL import Image

    # What made it cheap, not a stopwatch: the strip is cut to 8:1 before the resize, so it becomes
    # 224 x 1792 rather than 224 x 896000.
    strip = Image.new("RGB", (1, 4000), (10, 200, 30))
    assert resize_for_model(strip, PreprocessConfig()).size == (224, 1792)
    assert resize_for_model(strip.transpose(Image.Transpose.TRANSPOSE), PreprocessConfig()).size == (1792, 224)
    out = preprocess(strip, PreprocessConfig())
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()


def test_batch_shape_and_rejects_non_rgb():
    b = preprocess_batch([rgb_image(50, 60), rgb_image(70, 40)], PreprocessConfig())
    assert b.shape == (2, 3, 224, 224)
    assert preprocess_batch([], PreprocessConfig()).shape == (0, 3, 224, 224)
    with pytest.raises(ValueError, match="RGB"):
        preprocess(rgb_image(10, 10).convert("L"), PreprocessConfig())


def test_processor_config_keys_are_read():
    """Every key a preprocessor_config.json may set is taken, in each of its spellings."""
    c = PreprocessConfig.from_processor_dict(
        {"size": {"height": 300, "width": 200}, "crop_size": 192, "do_normalize": False, "do_center_crop": False}
    )
    assert (c.shortest_edge, c.crop_height, c.crop_width, c.do_normalize, c.do_center_crop) == (
        200,
        192,
        192,
        False,
        False,
    )
    assert PreprocessConfig.from_processor_dict({"size": {"height": 180, "width": 260}}).shortest_edge == 180
    assert PreprocessConfig.from_processor_dict({"size": 256}).shortest_edge == 256
    assert PreprocessConfig.from_processor_dict({}) == PreprocessConfig()


@pytest.mark.parametrize("pixels", CPU_PIXELS)
def test_a_crop_larger_than_the_resize_is_padded_as_transformers_pads(pixels):
    im = rgb_image(300, 400, seed=5)
    prep = PreprocessConfig.from_processor_dict({"size": {"shortest_edge": 200}, "crop_size": 224})
    ours = preprocess(im, prep, pixels)
    ref = _processor(pixels, size={"shortest_edge": 200}, crop_size={"height": 224, "width": 224})(
        images=im, return_tensors="np"
    )["pixel_values"][0]
    assert ours.shape == ref.shape == (3, 224, 224)
    assert np.abs(ours - ref).max() < 1e-5  # 12 columns of zeros (padding) each side, then normalized
