"""--export-onnx: thresholds, metadata, and nothing left behind on failure."""
from __future__ import annotations

import onnx
import pytest

import main as cli
from pipeline import export
from pipeline.embedders import META_PREPROCESS, META_SOURCE_MODEL
from pipeline.errors import PipelineError


def test_export_writes_both_files_with_metadata(tiny_clip, tmp_path, capsys):
    target = tmp_path / "onnx" / "m_int8_matmul.onnx"
    assert cli.main(["--export-onnx", "--model", str(tiny_clip), "--onnx", str(target)]) == 0
    out = capsys.readouterr().out
    assert "fp32 ONNX: min" in out and "int8 ONNX: min" in out
    fp32 = tmp_path / "onnx" / "m_fp32.onnx"
    assert target.is_file() and fp32.is_file()
    for path in (target, fp32):
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta[META_SOURCE_MODEL] == str(tiny_clip)
        assert '"crop_height": 224' in meta[META_PREPROCESS]
    ops = {n.op_type for n in onnx.load(str(target)).graph.node}
    assert "QuantizeLinear" in ops and "Conv" in ops and "ConvInteger" not in ops
    assert sorted(p.name for p in target.parent.iterdir()) == ["m_fp32.onnx", "m_int8_matmul.onnx", "m_text_fp32.onnx", "m_text_tokenizer.json"]
    assert "text fp32 ONNX: min" in out


def test_dynamic_quantization_also_passes(tiny_clip, tmp_path):
    r = export.export_onnx(str(tiny_clip), tmp_path / "d_int8.onnx", quantization="dynamic")
    assert r.passed and r.fp32_cos_min >= 0.9999 and r.int8_cos_min >= 0.99 and r.int8_cos_mean >= 0.995


def test_failed_verification_leaves_no_file(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "INT8_MIN_COSINE", 1.01)  # impossible: must fail
    target = tmp_path / "x_int8_matmul.onnx"
    with pytest.raises(PipelineError, match="failed verification"):
        export.export_onnx(str(tiny_clip), target)
    assert list(tmp_path.iterdir()) == []


def test_export_of_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["--export-onnx", "--model", str(tmp_path / "nope"), "--onnx", str(tmp_path / "o.onnx"), "-q"]) == 1
    assert "cannot load model" in capsys.readouterr().err
