"""The ONNX self-check: one wrong probe, or a NaN, is enough to refuse a file."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.preprocess import PreprocessConfig
from pipeline.probes import META_PROBES, ProbeRecord, check_file, probe_pixels


@pytest.fixture
def probed():
    """A file's metadata with probes whose fp32 reference it matched at export, and that reference."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 16)).astype(np.float32)
    inputs = [probe_pixels(PreprocessConfig())]
    record = ProbeRecord.make("image", inputs, reference, reference, min_cosine=0.99)
    return {META_PROBES: record.to_json()}, inputs, reference


def test_the_file_that_matches_passes(probed):
    meta, inputs, reference = probed
    assert check_file("f.onnx", meta, inputs, lambda: reference * 3.0).startswith("self-check passed")


@pytest.mark.parametrize("probe", [0, 3])
def test_one_wrong_probe_fails_the_file(probed, probe):
    meta, inputs, reference = probed
    got = reference.copy()
    got[probe] = np.random.default_rng(1).normal(size=16)
    with pytest.raises(PipelineError, match="failed its self-check on this CPU") as e:
        check_file("f.onnx", meta, inputs, lambda: got)
    assert "needs >= 0.99" in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
def test_nan_inf_or_zero_outputs_fail_the_file(probed, bad):
    meta, inputs, reference = probed
    got = reference.copy()
    got[2] = bad
    with pytest.raises(PipelineError, match="failed its self-check"):
        check_file("f.onnx", meta, inputs, lambda: got)


def test_outputs_of_another_size_fail_the_file(probed):
    meta, inputs, reference = probed
    with pytest.raises(PipelineError, match=r"returns \(8,\) vectors, its probes say \(16,\)"):
        check_file("f.onnx", meta, inputs, lambda: reference[:, :8])
