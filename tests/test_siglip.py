"""SigLIP beside CLIP (issue 28, point 1 and 2 for transformers' SiglipModel): a tiny SigLIP folder
with random weights, built here from a SiglipConfig. Its pictures are prepared as SiglipImageProcessor
prepares them (squashed to a square, no crop, mean/std 0.5) and embed as get_image_features does;
--export-onnx makes a verified int8 image tower and a 64-token, unmasked text tower; the family is in
every identity, and vectors of two families never meet in one store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as cli
from pipeline.preprocess import PreprocessConfig, preprocess_batch
from tests import assets
from tests.helpers import run


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> Path:
    return assets.save_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip")


@pytest.fixture(scope="module")
def siglip_onnx(tiny_siglip, tmp_path_factory) -> Path:
    from pipeline.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "siglip_image_int8_matmul.onnx"
    export_onnx(str(tiny_siglip), path)
    return path


def pictures(n: int = 6) -> list[Image.Image]:
    sizes = [(300, 400), (768, 1024), (1000, 333), (57, 91), (64, 64), (640, 480)]
    return [assets.rgb_image(w, h, seed=w + h) for w, h in sizes[:n]]



@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_a_folder_without_its_processor_file_gets_its_familys_preprocessing_and_says_so(family, tmp_path, caplog):
    """A model saved with save_pretrained alone has no preprocessor_config.json: a SigLIP then gets
    SigLIP's processor's defaults (squash, mean/std 0.5) at its config's size, not CLIP's crop and
    mean, and a CLIP at another size than 224 its own size (it crashed on 224-px pixels)."""
    import logging
    import shutil

    from pipeline.embedders import TorchEmbedder

    model = (assets.save_tiny_siglip(tmp_path / "with") if family == "siglip"
             else assets.save_tiny_clip(tmp_path / "with", image_size=64))
    with_file = TorchEmbedder(str(model)).preprocess_cfg
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "preprocessor_config.json").unlink()
    with caplog.at_level(logging.WARNING):
        emb = TorchEmbedder(str(bare))
    assert "no preprocessor_config.json" in caplog.text and "save_pretrained(folder)" in caplog.text
    assert emb.preprocess_cfg == with_file
    assert emb.embed(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, emb.dim)

def test_the_preprocessing_is_siglips_own(tiny_siglip):
    from transformers import SiglipImageProcessor, SiglipImageProcessorPil

    prep = PreprocessConfig.from_model_dir(tiny_siglip)
    assert prep.squash and (prep.resize_height, prep.resize_width) == (64, 64) and not prep.do_center_crop
    assert prep.image_mean == (0.5, 0.5, 0.5) and prep.decode_min_side == 64
    ours = preprocess_batch(pictures(), prep)
    pil = SiglipImageProcessorPil.from_pretrained(tiny_siglip)(images=pictures(), return_tensors="np")["pixel_values"]
    assert ours.shape == pil.shape == (6, 3, 64, 64)  # squashed whole, not cropped
    assert np.abs(ours - pil).max() < 1e-5  # the PIL processor (as SigLIP was trained), exactly
    simd = preprocess_batch(pictures(), prep, "pil+torch")
    theirs = SiglipImageProcessor.from_pretrained(tiny_siglip)(images=pictures(), return_tensors="np")["pixel_values"]
    assert np.abs(simd - theirs).max() < 1e-5  # --decode cpu-simd: transformers 5's default processor, exactly
    one_step = 1 / 255 / 0.5  # the two resizers round otherwise
    assert np.abs(simd - pil).max() <= 2 * one_step * 1.01 and np.abs(simd - pil).mean() < 2e-3
    # a CLIP processor's JSON is the one stores made before SigLIP recorded
    assert "resize_height" not in json.loads(PreprocessConfig().to_json())


def test_torch_vectors_are_transformers_own(tiny_siglip):
    import torch
    from transformers import SiglipImageProcessor, SiglipModel

    from pipeline.embedders import TorchEmbedder

    emb = TorchEmbedder(str(tiny_siglip))
    assert emb.identity.family == "siglip" and emb.dim == 32 and emb.text_context == 64
    ours = emb.embed(preprocess_batch(pictures(), emb.preprocess_cfg))
    model = SiglipModel.from_pretrained(tiny_siglip).eval()
    inputs = SiglipImageProcessor.from_pretrained(tiny_siglip)(images=pictures(), return_tensors="pt")
    with torch.inference_mode():
        out = model.get_image_features(**inputs)
        ref = (out if torch.is_tensor(out) else out.pooler_output).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert (ours * ref).sum(axis=1).min() >= 0.999
    # texts padded to 64 tokens and not masked, as SigLIP was trained
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_siglip)(["red dress"], padding="max_length", max_length=64,
                                                     return_tensors="pt")
    with torch.inference_mode():
        out = model.get_text_features(input_ids=tok["input_ids"])
        text_ref = (out if torch.is_tensor(out) else out.pooler_output).numpy()[0]
    assert float(emb.embed_text(["red dress"])[0] @ (text_ref / np.linalg.norm(text_ref))) >= 0.9999


def test_the_onnx_export_agrees_with_torch_and_names_the_family(tiny_siglip, siglip_onnx):
    import onnxruntime as ort

    from pipeline.embedders import OnnxEmbedder, TorchEmbedder, text_onnx_path_for

    meta = ort.InferenceSession(str(siglip_onnx)).get_modelmeta().custom_metadata_map
    assert meta["fashion_pipeline.family"] == "siglip" and meta["fashion_pipeline.kind"] == "siglip-image-tower"
    text = ort.InferenceSession(str(text_onnx_path_for(siglip_onnx)))
    assert [i.name for i in text.get_inputs()] == ["input_ids"]  # unmasked
    assert text.get_modelmeta().custom_metadata_map["fashion_pipeline.text_context"] == "64"
    torch_emb, onnx_emb = TorchEmbedder(str(tiny_siglip)), OnnxEmbedder(siglip_onnx)
    assert onnx_emb.identity.family == "siglip" and onnx_emb.preprocess_cfg == torch_emb.preprocess_cfg
    x = preprocess_batch(pictures(), torch_emb.preprocess_cfg)
    assert (torch_emb.embed(x) * onnx_emb.embed(x)).sum(axis=1).min() >= 0.99  # the int8 bar
    texts = ["red dress", "blue floral shirt", "tan shoes"]
    assert (torch_emb.embed_text(texts) * onnx_emb.embed_text(texts)).sum(axis=1).min() >= 0.9999
    # one picture alone is the same picture in a batch (static int8 is batch-independent)
    assert np.allclose(onnx_emb.embed(x[:1])[0], onnx_emb.embed(x)[0], atol=1e-6)


def test_a_store_records_its_family_and_never_mixes_two(tiny_siglip, siglip_onnx, tiny_clip, tmp_path, capsys):
    cells = [assets.jpeg_bytes(40 + i, 56, seed=40 + i) for i in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells)
    out = tmp_path / "out"
    common = ["--dataset", str(data), "--limit", "0", "--output-dir", str(out), "--max-result-images", "0"]
    assert run(*common, "--onnx", str(siglip_onnx)) == 0
    sidecar = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert sidecar["identity"]["family"] == "siglip" and sidecar["identity"]["dim"] == 32
    capsys.readouterr()
    code = cli.main([*common, "--use-embeddings", "--model", str(tiny_clip), "--backend", "torch", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "family: cache has 'siglip', asked for 'clip'" in err
    assert run(*common, "--query-text", "red dress", "--onnx", str(siglip_onnx), "--top-k", "3") == 0


def test_a_store_made_before_families_is_clips():
    from pipeline.identity import VectorIdentity

    old = VectorIdentity.from_json({"backend": "onnx", "model": "m", "dim": 512}, "old sidecar")
    assert old.family == "clip"


def test_a_hub_model_whose_config_cannot_be_read_asks_for_no_family(tiny_siglip, monkeypatch):
    """Offline, with the hub id's config.json not cached, the family is unknown before loading: the
    cache check leaves it out (the model id and weights still decide) rather than guessing CLIP and
    refusing a SigLIP store made online with the same id."""
    from pipeline import backends
    from pipeline.embedders import EmbedderSpec, requested_identity
    from pipeline.identity import VectorIdentity, differences

    monkeypatch.setattr(backends, "_hub_config_path", lambda model: None)
    asked = requested_identity(EmbedderSpec(model="google/siglip-base-patch16-224", backend="torch"))
    assert asked.family is None
    stored = VectorIdentity(backend="torch", family="siglip", model="google/siglip-base-patch16-224", dim=768)
    assert differences(asked, stored) == []
    assert requested_identity(EmbedderSpec(model=str(tiny_siglip), backend="torch")).family == "siglip"


def test_thumbnails_keep_the_photos_proportions_though_the_model_squashes(tiny_siglip, siglip_onnx, tmp_path):
    """SigLIP squashes a 40x80 photo to a square for the model; its thumbnail is the photo fitted
    into the tile (white bands left and right), as for CLIP, on the CPU path and on the device path."""
    from pipeline.gpu import DevicePreprocessor, inspect_jpeg
    from pipeline.plots import THUMB_SIZE

    cells = [assets.encode(Image.new("RGB", (40, 80), (200, 30, 30)), "JPEG", quality=95) for _ in range(2)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells)
    out = tmp_path / "out"
    assert run("--dataset", str(data), "--limit", "0", "--output-dir", str(out), "--max-result-images", "0",
               "--onnx", str(siglip_onnx)) == 0
    thumbs = np.load(out / "embeddings" / "thumbnails.npy")
    middle, edge = thumbs[0, THUMB_SIZE // 2, THUMB_SIZE // 2], thumbs[0, THUMB_SIZE // 2, 2]
    assert middle[0] > 150 and middle[1] < 80 and (edge > 240).all()  # red photo, white band at its side
    prep = PreprocessConfig.from_model_dir(tiny_siglip)
    assert prep.squash
    _, device_thumbs, _ = DevicePreprocessor(prep, "cpu").process([inspect_jpeg(cells[0])])
    t = device_thumbs[0].numpy()
    assert t[THUMB_SIZE // 2, THUMB_SIZE // 2, 0] > 150 and (t[THUMB_SIZE // 2, 2] > 240).all()


def test_the_text_tower_pads_on_its_tokenizers_side_and_refuses_another_tokenizer(tmp_path, tiny_onnx):
    """SigLIP 2's Gemma tokenizer pads on the left, and SigLIP's unmasked tower pools the last token:
    the ONNX text tower pads as the model's tokenizer does, so its vectors are torch's. A tokenizer
    file beside the tower that tokenizes its probe texts otherwise (another model's) is refused,
    not run."""
    import json
    import shutil

    from pipeline.embedders import OnnxEmbedder, TorchEmbedder, text_onnx_path_for, tokenizer_path_for
    from pipeline.errors import PipelineError
    from pipeline.export import export_onnx

    model = assets.save_tiny_siglip(tmp_path / "sig")
    config = model / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "left"}))
    path = tmp_path / "sig_image_int8.onnx"
    assert export_onnx(str(model), path).passed
    texts = ["red dress", "blue denim jacket with a long name"]
    torch_emb, onnx_emb = TorchEmbedder(str(model)), OnnxEmbedder(path)
    assert (torch_emb.embed_text(texts) * onnx_emb.embed_text(texts)).sum(axis=1).min() >= 0.9999
    # A tower exported before the sides were recorded: its probes say it pads on the left
    import onnx

    tower = text_onnx_path_for(path)
    graph = onnx.load(str(tower))
    kept = [p for p in graph.metadata_props if p.key != "fashion_pipeline.text_sides"]
    assert len(kept) == len(graph.metadata_props) - 1
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(tower))
    assert (torch_emb.embed_text(texts) * OnnxEmbedder(path).embed_text(texts)).sum(axis=1).min() >= 0.9999
    # another model's tokenizer put beside the tower
    shutil.copy(tokenizer_path_for(text_onnx_path_for(tiny_onnx)), tokenizer_path_for(text_onnx_path_for(path)))
    with pytest.raises(PipelineError, match="does not tokenize the probe texts as the tokenizer"):
        OnnxEmbedder(path).embed_text(["red dress"])
