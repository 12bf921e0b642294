"""open_clip models beside transformers' (issue 28, point 1 and 2): a tiny open_clip ViT registered
here from a config (random weights), named as open_clip:ARCH:FILE or as a folder laid out like the
hub's open_clip repositories (Marqo-FashionSigLIP's form). Pictures are prepared as open_clip's own
eval transform prepares them, vectors equal encode_image / encode_text, --export-onnx makes a
verified int8 image tower (and says why there is no torch-free text tower), the family is in every
identity, and the default path never imports open_clip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.preprocess import preprocess_batch
from tests import assets
from tests.helpers import run

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return assets.save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def pictures() -> list:
    # odd margins too: (64, 67) and (71, 64) leave 3 and 7 pixels, where open_clip's torchvision crop
    # (round half to even) and transformers' (floor) start one pixel apart
    sizes = [(300, 400), (64, 64), (1000, 332), (96, 64), (64, 67), (71, 64), (64, 65)]
    return [assets.rgb_image(w, h, seed=w + h) for w, h in sizes]


@pytest.mark.parametrize("mode", ["squash", "shortest"])
def test_the_preprocessing_is_open_clips_own(mode, tmp_path):
    from pipeline.openclip import preprocess_config

    _, hub = assets.save_tiny_open_clip(tmp_path, resize_mode=mode)
    cfg = json.loads((hub / "open_clip_config.json").read_text())["preprocess_cfg"]
    prep = preprocess_config(cfg)
    assert prep.squash == (mode == "squash") and prep.do_center_crop == (mode == "shortest")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    theirs = torch.stack([transform(p) for p in pictures()]).numpy()
    # open_clip's transform resizes PIL images with Pillow, as the default does: its pixels exactly
    assert np.abs(preprocess_batch(pictures(), prep) - theirs).max() < 1e-5
    one_step = 1 / 255 / min(prep.image_std)  # torch's resize (--decode cpu-simd) rounds otherwise on a few pixels
    simd = preprocess_batch(pictures(), prep, "pil+torch")
    assert np.abs(simd - theirs).max() <= 2 * one_step * 1.01 and np.abs(simd - theirs).mean() < 2e-3


def test_vectors_equal_open_clips_and_the_two_namings_agree(tiny):
    from pipeline.embedders import TorchEmbedder

    weights, hub = tiny
    emb = TorchEmbedder(str(hub))
    assert emb.identity.family == "open_clip" and emb.dim == 24 and emb.text_context == 32
    assert emb.identity.model == str(hub.resolve()) and emb.identity.model_sha256
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{hub}")
    model.eval()
    pixels = torch.stack([transform(p) for p in pictures()])
    with torch.inference_mode():
        ref = model.encode_image(pixels).numpy()
        text_ref = model.encode_text(open_clip.get_tokenizer(f"local-dir:{hub}")(["red dress"])).numpy()[0]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert (emb.embed(preprocess_batch(pictures(), emb.preprocess_cfg)) * ref).sum(axis=1).min() >= 0.999
    assert float(emb.embed_text(["red dress"])[0] @ (text_ref / np.linalg.norm(text_ref))) >= 0.9999
    by_file = TorchEmbedder(f"open_clip:{assets.TINY_OPEN_CLIP}:{weights}")  # the same weights, by file
    assert by_file.identity.model == f"open_clip:{assets.TINY_OPEN_CLIP}:{weights.resolve()}"
    x = preprocess_batch(pictures(), emb.preprocess_cfg)
    assert np.allclose(by_file.embed(x), emb.embed(x), atol=1e-5)


def test_weights_named_by_file_are_preprocessed_as_their_architectures_published_ones(tiny, monkeypatch, caplog):
    """open_clip gives a weights file CLIP's preprocessing whatever the architecture: a SigLIP fine-tune
    named open_clip:ViT-B-16-SigLIP:FILE would be cropped and normalized as CLIP. The architecture's
    published weights say how when they all agree, as the folder's open_clip_config.json does;
    otherwise open_clip's default, said."""
    import logging

    from open_clip import pretrained

    from pipeline.embedders import TorchEmbedder
    from pipeline.openclip import architecture_preprocess

    siglip = architecture_preprocess(open_clip, "ViT-B-16-SigLIP", "m")
    assert siglip == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                      "resize_mode": "squash"}
    assert architecture_preprocess(open_clip, "ViT-B-32", "m")["resize_mode"] == "shortest"
    weights, hub = tiny
    folder = TorchEmbedder(str(hub))  # its open_clip_config.json: squash, mean/std 0.5
    with caplog.at_level(logging.WARNING):  # no published weights of the tiny architecture: said
        unknown = TorchEmbedder(f"open_clip:{assets.TINY_OPEN_CLIP}:{weights}")
    assert "open_clip knows no published weights of fashion-test-tiny" in caplog.text
    assert unknown.preprocess_cfg.image_mean != folder.preprocess_cfg.image_mean  # CLIP's, as said
    published = {"url": "", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    monkeypatch.setitem(pretrained._PRETRAINED, assets.TINY_OPEN_CLIP, {"a": published, "b": dict(published)})
    by_file = TorchEmbedder(f"open_clip:{assets.TINY_OPEN_CLIP}:{weights}")
    assert by_file.preprocess_cfg == folder.preprocess_cfg
    assert by_file.identity.preprocess == folder.identity.preprocess
    x = preprocess_batch(pictures(), by_file.preprocess_cfg)
    assert np.allclose(by_file.embed(x), folder.embed(x), atol=1e-5)
    monkeypatch.setitem(pretrained._PRETRAINED, assets.TINY_OPEN_CLIP, {"a": published, "b": {"url": ""}})
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # published weights that differ: open_clip's default, said
        mixed = TorchEmbedder(f"open_clip:{assets.TINY_OPEN_CLIP}:{weights}")
    assert "the published weights of fashion-test-tiny are preprocessed in different ways" in caplog.text
    assert mixed.preprocess_cfg == unknown.preprocess_cfg
    assert architecture_preprocess(open_clip, "ViT-L-14", "m") == {}  # eleven CLIP-like, one with mean 0.5


def test_a_missing_weights_file_or_bad_name_is_one_message(tmp_path, capsys):
    from pipeline.embedders import TorchEmbedder
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no weights file"):
        TorchEmbedder(f"open_clip:ViT-B-32:{tmp_path / 'none.bin'}")
    with pytest.raises(PipelineError, match=r"expected open_clip:ARCH:FILE"):
        TorchEmbedder("open_clip:ViT-B-32")


def test_onnx_export_verifies_the_image_tower_and_says_why_no_text_tower(tiny, tmp_path):
    import onnxruntime as ort

    from pipeline.embedders import OnnxEmbedder, TorchEmbedder, text_onnx_path_for
    from pipeline.export import export_onnx

    _, hub = tiny
    path = tmp_path / "marqo_image_int8_matmul.onnx"
    report = export_onnx(str(hub), path)
    assert any("open_clip tokenizes with its own Python code" in line for line in report.text_lines)
    assert not text_onnx_path_for(path).exists()
    meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert meta["fashion_pipeline.family"] == "open_clip"
    torch_emb, onnx_emb = TorchEmbedder(str(hub)), OnnxEmbedder(path)
    assert onnx_emb.identity.family == "open_clip" and onnx_emb.preprocess_cfg == torch_emb.preprocess_cfg
    x = preprocess_batch(pictures(), torch_emb.preprocess_cfg)
    assert (torch_emb.embed(x) * onnx_emb.embed(x)).sum(axis=1).min() >= 0.99
    assert np.allclose(onnx_emb.embed(x[:1])[0], onnx_emb.embed(x)[0], atol=1e-6)  # batch-independent
    # a text search says why there is no text tower and the ways on: "make them with --export-onnx" made
    # the same file again, and the README's --backend torch is refused by a store this file made
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as said:
        onnx_emb.embed_text(["red dress"])
    assert str(said.value).startswith(f"{path.name} was exported without a text tower: open_clip tokenizes with its "
                                      "own Python code")
    assert "build it with --backend torch (and --model) for text search" in str(said.value)
    assert "make them with --export-onnx" not in str(said.value)


def test_a_store_of_open_clip_vectors_is_refused_for_another_family(tiny, tiny_clip, tmp_path, capsys):
    _, hub = tiny
    data = assets.write_parquet_dataset(tmp_path / "shop", [assets.jpeg_bytes(40 + i, 56, seed=i) for i in range(5)])
    common = ["--dataset", str(data), "--limit", "0", "--output-dir", str(tmp_path / "out"),
              "--max-result-images", "0", "--backend", "torch"]
    assert run(*common, "--model", str(hub)) == 0
    sidecar = json.loads((tmp_path / "out" / "embeddings" / "embeddings.json").read_text())
    assert sidecar["identity"]["family"] == "open_clip"
    assert run(*common, "--model", str(hub), "--query-text", "red dress", "--top-k", "2") == 0
    capsys.readouterr()
    assert cli.main([*common, "--model", str(tiny_clip), "--use-embeddings", "-q"]) == 1
    assert "family: cache has 'open_clip', asked for 'clip'" in capsys.readouterr().err


def test_the_default_path_never_imports_open_clip(tiny_clip):
    code = ("import sys; from pipeline.embedders import TorchEmbedder; from pipeline.backends import family_of; "
            f"TorchEmbedder({str(tiny_clip)!r}).embed_text(['red']); family_of('patrickjohncyh/fashion-clip'); "
            "print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_short_names_name_the_hub_models_unless_a_folder_has_that_name(tmp_path, monkeypatch):
    from pipeline.backends import MODELS
    from pipeline.config import config_from_flags

    assert config_from_flags({"model": "marqo-fashionsiglip"}).embedder.model == "hf-hub:Marqo/marqo-fashionSigLIP"
    assert MODELS["fashion-clip"] == "patrickjohncyh/fashion-clip"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion-clip").mkdir()
    assert config_from_flags({"model": "fashion-clip"}).embedder.model == "fashion-clip"


def test_a_siglip_like_tokenizer_gets_a_torch_free_text_tower_equal_to_open_clips(tmp_path):
    """Marqo-FashionSigLIP's case: open_clip tokenizes with a Hugging Face tokenizer after its
    "canonicalize" cleaning. The export writes the text tower with tokenizer.json and the cleaning
    mode; the ONNX backend's ids equal open_clip's and its vectors equal encode_text's, in a process
    that never imports torch."""
    import onnxruntime as ort

    from pipeline.embedders import text_onnx_path_for
    from pipeline.export import export_onnx

    _, hub = assets.save_tiny_open_clip(tmp_path / "m", hf_tokenizer=True)
    path = tmp_path / "onnx" / "siglip_like_image_int8_matmul.onnx"
    path.parent.mkdir()
    report = export_onnx(str(hub), path)
    assert not any("not exported" in line for line in report.text_lines), report.text_lines
    text = text_onnx_path_for(path)
    meta = ort.InferenceSession(str(text)).get_modelmeta().custom_metadata_map
    assert meta["fashion_pipeline.text_clean"] == "canonicalize" and meta["fashion_pipeline.text_context"] == "32"
    texts = ["A RED dress, with buttons!", "blue_jeans   (slim)", "&amp; hat"]
    model = open_clip.create_model(f"local-dir:{hub}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{hub}")
    with torch.inference_mode():
        ref = model.encode_text(tokenizer(texts)).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    code = (
        "import json, sys; from pipeline.embedders import OnnxEmbedder; "
        f"e = OnnxEmbedder({str(path)!r}); texts = {texts!r}; "
        "v = e.embed_text(texts); t = e._text; "
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': t.tokenize(texts)[0].tolist(), "
        "'vectors': v.tolist()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert got["ids"] == tokenizer(texts).tolist()
    assert (np.array(got["vectors"]) * ref).sum(axis=1).min() >= 0.9999


def test_a_hub_id_whose_config_names_open_clip_is_loaded_through_open_clip():
    """Marqo's repositories carry a config.json with model_type "siglip" (for transformers' remote
    code) and open_clip_model_name: read as SigLIP it would fail on its weights."""
    from pipeline.backends import family_of
    from pipeline.openclip import open_clip_source

    config = {"model_type": "siglip", "open_clip_model_name": "hf-hub:Marqo/marqo-fashionSigLIP"}
    assert family_of("Marqo/marqo-fashionSigLIP", read_config=lambda _: config).name == "open_clip"
    assert open_clip_source("Marqo/marqo-fashionSigLIP") == ("hf-hub:Marqo/marqo-fashionSigLIP", None)
    assert family_of("google/siglip-base-patch16-224", read_config=lambda _: {"model_type": "siglip"}).name == "siglip"


def test_files_exported_from_an_open_clip_hub_models_plain_id_keep_their_text_search(tiny_onnx, tmp_path):
    """Files exported before from `Org/name` (an open_clip model by its plain hub id) record that name:
    the image file's identity now reads it as `hf-hub:Org/name`, and its text tower, recording the
    same, is still its own (text search was refused as another model's)."""
    import shutil

    import onnx
    from pipeline.embedders import OnnxEmbedder, text_onnx_path_for, tokenizer_path_for

    image = tmp_path / "tiny_int8_matmul.onnx"
    for src, dst in ((tiny_onnx, image), (text_onnx_path_for(tiny_onnx), text_onnx_path_for(image))):
        model = onnx.load(str(src))
        meta = {p.key: p.value for p in model.metadata_props}
        meta.update({"fashion_pipeline.source_model": "Org/tiny-openclip", "fashion_pipeline.family": "open_clip"})
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(dst))
    shutil.copy(tokenizer_path_for(text_onnx_path_for(tiny_onnx)), tokenizer_path_for(text_onnx_path_for(image)))
    emb = OnnxEmbedder(image, device="cpu", threads=1)
    assert emb.identity.model == "hf-hub:Org/tiny-openclip"
    assert emb.embed_text(["red dress"]).shape == (1, emb.dim)
    same = OnnxEmbedder(tiny_onnx, device="cpu", threads=1).embed_text(["red dress"])  # the same tower
    assert np.array_equal(emb.embed_text(["red dress"]), same)


def test_open_clips_info_lines_on_the_root_logger_stay_out_of_the_runs_log(tiny, tmp_path):
    """open_clip logs what it loads with logging.info on the root logger ("INFO root: Loaded ..."):
    left out of the run's log unless -v; its warnings, and the pipeline's own lines, stay."""
    import logging
    import os

    _, hub = tiny
    code = f"""
import logging, main
main.configure_logging(verbose=False, quiet=False)
from pipeline.embedders import make_embedder, EmbedderSpec
make_embedder(EmbedderSpec(model={str(hub)!r}, backend="torch"))
logging.getLogger("pipeline.x").info("the pipeline's own line")
"""
    run_ = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run_.returncode == 0, run_.stderr
    assert "INFO root:" not in run_.stderr and "INFO pipeline.x: the pipeline's own line" in run_.stderr
    at = str(Path(open_clip.__file__).parent / "factory.py")
    record = logging.LogRecord("root", logging.INFO, at, 1, "Loaded ViT-B-32 model config.", None, None)
    assert not cli._not_a_librarys_root_info(record)
    record.levelno = logging.WARNING
    assert cli._not_a_librarys_root_info(record)


def test_an_open_clip_hub_model_not_downloaded_offline_is_said_as_such_not_damaged(monkeypatch):
    """Offline, hf-hub:Marqo/marqo-fashionSigLIP not in the hub cache was "its weights cannot be read
    (...): a file damaged or cut short"; the transformers models say what to pass."""
    from pipeline.embedders import EmbedderSpec, make_embedder
    from pipeline.errors import PipelineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError) as e:
        make_embedder(EmbedderSpec(model="hf-hub:someone/not-downloaded-model", backend="torch", device="cpu"))
    said = str(e.value)
    assert "Without network access pass a local folder with --model DIR" in said and "damaged" not in said, said
