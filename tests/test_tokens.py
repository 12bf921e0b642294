"""Text search never degenerates silently: no tokenizer means no text tower, said once, and a
tokenizer that cannot tell texts apart is refused wherever it would be used."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.embedders import OnnxEmbedder, TorchEmbedder, text_onnx_path_for, tokenizer_path_for
from pipeline.errors import PipelineError
from pipeline.tokens import DISTINCT_TEXTS, TokenizerError, check_distinct, load_tokenizer

MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@pytest.fixture(scope="module")
def no_tokenizer(tiny_clip, tmp_path_factory) -> Path:
    """The tiny CLIP as save_pretrained leaves it: weights and configs, no tokenizer files."""
    folder = tmp_path_factory.mktemp("models") / "no-tokenizer"
    folder.mkdir()
    for name in MODEL_FILES:
        shutil.copy(tiny_clip / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def degenerate(no_tokenizer, tmp_path_factory) -> Path:
    """A folder whose tokenizer files are what transformers 5 makes up for a folder without any: an
    empty CLIP vocabulary (every word is the unknown token)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "empty-vocabulary"
    shutil.copytree(no_tokenizer, folder)
    AutoTokenizer.from_pretrained(str(no_tokenizer)).save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    return folder


def test_export_without_tokenizer_has_no_text_tower_and_says_so_once(no_tokenizer, tmp_path, capsys):
    target = tmp_path / "onnx" / "m_int8_matmul.onnx"
    target.parent.mkdir()
    # An earlier export's text tower beside the file belongs to other weights: it must go.
    for stale in (text_onnx_path_for(target), tokenizer_path_for(text_onnx_path_for(target))):
        stale.write_bytes(b"from an earlier export")
    assert cli.main(["--export-onnx", "--model", str(no_tokenizer), "--onnx", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.count("text tower not exported") == 1
    assert "has no tokenizer files" in out and "m_text_fp32.onnx, m_text_tokenizer.json removed" in out
    assert sorted(p.name for p in target.parent.iterdir()) == ["m_fp32.onnx", "m_int8_matmul.onnx"]
    # a text search against the file says why it has none and the ways on ("make them with --export-onnx"
    # made the same file again)
    with pytest.raises(PipelineError, match=r"m_int8_matmul.onnx was exported without a text tower: .*has no "
                                            r"tokenizer files.* or build it with --backend torch"):
        OnnxEmbedder(target).embed_text(["red dress"])


def test_a_tokenizer_whose_library_is_missing_is_said_so_and_the_export_goes_on(tiny_clip, tmp_path, monkeypatch,
                                                                                  capsys):
    """A slow tokenizer that needs a library not installed (SigLIP's SentencePiece without
    `sentencepiece`): text search is refused with the install to make, not an ImportError out of
    transformers, and the export writes the image files with the note that there is no text tower."""
    from transformers import AutoTokenizer

    def missing(*args, **kwargs):
        raise ImportError("SiglipTokenizer requires the SentencePiece library but it was not found")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", missing)
    with pytest.raises(TokenizerError, match=r"the tokenizer of .* cannot load: SiglipTokenizer requires the "
                                             r"SentencePiece library .*\(pip install -r requirements.txt installs"):
        load_tokenizer(str(tiny_clip))
    target = tmp_path / "onnx" / "m_int8_matmul.onnx"
    assert cli.main(["--export-onnx", "--model", str(tiny_clip), "--onnx", str(target)]) == 0
    assert "text tower not exported" in capsys.readouterr().out
    assert sorted(p.name for p in target.parent.iterdir()) == ["m_fp32.onnx", "m_int8_matmul.onnx"]


def test_torch_text_search_without_tokenizer_is_refused(no_tokenizer):
    embedder = TorchEmbedder(str(no_tokenizer))
    with pytest.raises(TokenizerError, match="has no tokenizer files .*save_pretrained"):
        embedder.embed_text(["red dress", "black leather ankle boots"])


def test_a_tokenizer_that_maps_texts_alike_is_refused(degenerate, no_tokenizer, tmp_path, capsys):
    with pytest.raises(TokenizerError, match="maps different texts to the same ids \\('red dress' and 'tan shoes'\\)"):
        load_tokenizer(str(degenerate))
    with pytest.raises(TokenizerError, match="same ids"):
        TorchEmbedder(str(degenerate)).embed_text(["red dress"])
    target = tmp_path / "d_int8_matmul.onnx"
    assert cli.main(["--export-onnx", "--model", str(degenerate), "--onnx", str(target)]) == 0
    assert "text tower not exported, so no text search with this file: the tokenizer of" in capsys.readouterr().out
    assert not text_onnx_path_for(target).exists()


def test_an_exported_tokenizer_that_maps_texts_alike_is_refused(tiny_onnx, degenerate, tmp_path):
    """A text tower exported before this check, beside a tokenizer.json with an empty vocabulary."""
    image = Path(shutil.copy(tiny_onnx, tmp_path / tiny_onnx.name))
    text = text_onnx_path_for(tiny_onnx)
    shutil.copy(text, tmp_path / text.name)
    shutil.copy(degenerate / "tokenizer.json", tmp_path / tokenizer_path_for(text).name)
    with pytest.raises(TokenizerError, match="maps different texts to the same ids.*export again with --export-onnx"):
        OnnxEmbedder(image).embed_text(["red dress"])


def test_the_models_own_tokenizer_tells_texts_apart(tiny_clip, tiny_onnx):
    assert load_tokenizer(str(tiny_clip)) is not None
    vectors = OnnxEmbedder(tiny_onnx).embed_text(["red dress", "black leather ankle boots"])
    assert vectors.shape == (2, 16) and not np.allclose(vectors[0], vectors[1])


def test_mostly_unknown_tokens_are_refused():
    def encode(texts):  # a vocabulary that knows one letter: everything else is token 9
        return [[0] + [ord(c) if c == "a" else 9 for c in t] + [1] for t in texts]

    with pytest.raises(TokenizerError, match=r"tokens of plain English texts to its unknown token"):
        check_distinct(encode, 9, "x")
    check_distinct(encode, None, "x")  # the texts alone still differ
    with pytest.raises(TokenizerError, match="same ids"):
        check_distinct(lambda texts: [[0, 9, 1]] * len(texts), None, "x")
    assert len(set(map(len, DISTINCT_TEXTS[:2]))) == 1  # two texts of one length: padding cannot tell them apart
