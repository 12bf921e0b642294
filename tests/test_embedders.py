"""Both backends return the same thing; the ONNX one stands alone (no torch, no hub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.embedders import EmbedderSpec, OnnxEmbedder, TorchEmbedder, make_embedder, requested_identity
from pipeline.errors import PipelineError
from pipeline.export import fp32_path_for
from pipeline.preprocess import preprocess_batch
from tests.assets import rgb_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pixels():
    return preprocess_batch(
        [rgb_image(100 + 20 * i, 150, seed=i) for i in range(6)],
        __import__("pipeline.preprocess").preprocess.PreprocessConfig(),
    )


def test_backends_agree(tiny_clip, tiny_onnx, pixels):
    torch_e = TorchEmbedder(str(tiny_clip), device="cpu")
    fp32 = OnnxEmbedder(fp32_path_for(tiny_onnx))
    int8 = OnnxEmbedder(tiny_onnx)
    a, b, c = torch_e.embed(pixels), fp32.embed(pixels), int8.embed(pixels)
    for x in (a, b, c):
        assert x.shape == (6, 16) and x.dtype == np.float32
        assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) > 0.9999
    assert np.min(np.sum(a * c, axis=1)) > 0.99
    assert torch_e.preprocess_cfg == fp32.preprocess_cfg
    assert int8.identity.precision.startswith("onnx-int8-static")


def test_int8_vector_does_not_depend_on_batch_mates(tiny_onnx, pixels):
    e = OnnxEmbedder(tiny_onnx)
    together = e.embed(pixels)
    alone = np.concatenate([e.embed(pixels[i : i + 1]) for i in range(len(pixels))])
    assert np.allclose(together, alone, atol=1e-6)


@pytest.mark.subprocess
def test_onnx_path_never_imports_torch_or_transformers(tiny_onnx):
    code = f"""
import sys, numpy as np
from pipeline.embedders import EmbedderSpec, make_embedder
e = make_embedder(EmbedderSpec(onnx={str(tiny_onnx)!r}, backend="auto", model="not/used"))
x = np.zeros((2, 3, 224, 224), np.float32)
assert e.embed(x).shape == (2, 16)
bad = [m for m in ("torch", "transformers") if m in sys.modules]
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_preprocessing_comes_from_onnx_metadata_without_model(tiny_onnx):
    e = make_embedder(EmbedderSpec(onnx=str(tiny_onnx), model="does/not-exist"))
    assert e.identity.model.endswith("tiny-clip")
    assert e.preprocess_cfg.crop_height == 224


def test_wrong_input_shape_and_dtype_messages(tiny_onnx):
    e = OnnxEmbedder(tiny_onnx)
    with pytest.raises(PipelineError, match=r"takes \(batch, 3, 224, 224\), got \(1, 3, 200, 224\)"):
        e.embed(np.zeros((1, 3, 200, 224), np.float32))
    with pytest.raises(PipelineError, match="takes float32, got float64"):
        e.embed(np.zeros((1, 3, 224, 224)))


def test_cuda_required_means_required(tiny_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(PipelineError, match="no CUDA provider"):
        OnnxEmbedder(tiny_onnx, device="cuda")


def test_missing_and_broken_onnx_files(tmp_path):
    with pytest.raises(PipelineError, match="not found. Make it with"):
        make_embedder(EmbedderSpec(onnx=str(tmp_path / "absent.onnx"), backend="onnx"))
    # the model asked for is named: the command said exported the default model (refused later as another's)
    with pytest.raises(PipelineError, match=r"Make it with: python main\.py --export-onnx --model models/mine --onnx "):
        make_embedder(EmbedderSpec(model="models/mine", onnx=str(tmp_path / "absent.onnx"), backend="onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="cannot load ONNX file"):
        OnnxEmbedder(bad)
    with pytest.raises(PipelineError, match="not found"):
        requested_identity(EmbedderSpec(onnx=str(tmp_path / "absent.onnx"), backend="onnx"))


def test_auto_backend_follows_the_file(tmp_path, tiny_onnx):
    assert EmbedderSpec(onnx=str(tiny_onnx)).resolve_backend() == "onnx"
    assert EmbedderSpec(onnx=str(tmp_path / "none.onnx")).resolve_backend() == "torch"


def test_torch_precision_rules(tiny_clip):
    with pytest.raises(PipelineError, match="needs --device cuda|no CUDA device"):
        TorchEmbedder(str(tiny_clip), device="cpu", precision="fp16")


def test_sharded_or_oddly_named_weights_are_hashed_so_changed_weights_refuse_the_store(tmp_path, capsys):
    """A store records the local model's weights' sha256 and refuses other weights in the same
    folder. Sharded weights (model-0000x-of-0000y.safetensors with their index) and weights under
    another name recorded none, so fine-tuned weights saved over the folder reused, and an update
    extended, the old store."""
    import shutil

    from transformers import CLIPModel

    from pipeline.embedders import model_weights_sha256
    from tests import assets
    from tests.helpers import run

    folder = tmp_path / "model"

    def save(seed: int) -> None:
        src = assets.save_tiny_clip(tmp_path / f"src{seed}", seed=seed)
        shutil.rmtree(folder, ignore_errors=True)
        CLIPModel.from_pretrained(src).save_pretrained(folder, max_shard_size="100KB")
        for f in src.iterdir():
            if not f.name.startswith("model") and f.name != "config.json":
                shutil.copy(f, folder / f.name)

    save(0)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").is_file()
    first = model_weights_sha256(str(folder))
    assert len(first) == 64
    data = assets.write_parquet_dataset(tmp_path / "shop", [assets.jpeg_bytes(40 + i, 56, seed=i) for i in range(4)])
    flags = ["--dataset", data, "--limit", "0", "--output-dir", tmp_path / "out", "--max-result-images", "0",
             "--backend", "torch", "--model", folder]
    assert run(*flags) == 0
    save(1)  # other weights, the same folder
    assert model_weights_sha256(str(folder)) not in ("", first)
    capsys.readouterr()
    assert run(*flags, "--use-embeddings") == 1
    assert "model_sha256" in capsys.readouterr().err
    # Weights under a name of their own: every weights file there is hashed
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "weights.bin").write_bytes(b"one")
    sha = model_weights_sha256(str(odd))
    (odd / "weights.bin").write_bytes(b"two")
    assert sha and model_weights_sha256(str(odd)) not in ("", sha)


def test_a_folder_given_as_the_onnx_file_is_said_with_the_files_in_it(tiny_onnx, tmp_path):
    """--onnx FOLDER was told "not found. Make it with --export-onnx --onnx FOLDER", itself refused."""
    from pipeline.embedders import OnnxEmbedder

    with pytest.raises(PipelineError, match=f"--onnx {tiny_onnx.parent} is a folder: pass an ONNX file in it "
                                            f"\\(.*{tiny_onnx.name}"):
        OnnxEmbedder(tiny_onnx.parent)
    with pytest.raises(PipelineError, match="is a folder: pass an ONNX file; a model's folder is given as --model"):
        OnnxEmbedder(tmp_path)
    assert OnnxEmbedder(tiny_onnx).source_file == tiny_onnx  # what a run's summary names


def test_weights_of_another_architecture_are_not_called_damaged(tmp_path):
    """open_clip:ViT-B-32:FILE with a checkpoint of another size asserted 'text pos_embed width changed!',
    said as 'a file damaged or cut short; download it again'; a weights file given as --model was told
    to check its path."""
    from pipeline.backends import load_hint
    from pipeline.embedders import weights_unread

    for e in (AssertionError("text pos_embed width changed!"),
              RuntimeError("Error(s) in loading state_dict for CLIP:\n\tsize mismatch for visual.proj"),
              RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look at "
                           "the above part of this error message")):
        said = weights_unread("open_clip:ViT-B-32:/w/tiny.bin", e)
        assert "its weights do not fit its architecture" in said and "ARCH must be the checkpoint's own" in said
        assert "damaged" not in said
    said = weights_unread("/m", OSError("Error while deserializing header: HeaderTooLarge"))
    assert "cannot be read (OSError: Error while deserializing header" in said and "damaged or cut short" in said
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    assert load_hint(str(weights)).startswith(f"{weights} is a file: --model takes the model's folder ({tmp_path}")


def test_a_text_tower_given_as_the_image_file_is_named_as_such(tiny_onnx):
    from pipeline.embedders import OnnxEmbedder, text_onnx_path_for

    with pytest.raises(PipelineError, match=r"expected one image input, found \['input_ids', .*\(a text tower: "
                                            r"--onnx takes the image tower's file"):
        OnnxEmbedder(text_onnx_path_for(tiny_onnx))
