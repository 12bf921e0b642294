"""pipeline/onnxspeed.py: what an ONNX file does on this CPU (the export's speed lines, the benchmarks' profiles)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onnx import TensorProto, helper, numpy_helper
from pipeline import onnxspeed


def _graph() -> bytes:
    """pixels -> Add(1) -> QuantizeLinear -> DequantizeLinear -> Relu: a file whose op types are known."""
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("Add", ["pixel_values", "one"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                         ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_op_profile_shares_kernel_time_among_the_ops_that_ran():
    shares = onnxspeed.op_profile(_graph(), batch=4, runs=2)
    assert set(shares) == {"Add", "QuantizeLinear", "DequantizeLinear", "Relu"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert list(shares.values()) == sorted(shares.values(), reverse=True)
    assert onnxspeed.conversion_share(shares) == pytest.approx(1.0 - shares["Relu"])


def _node(op: str, ts: float, dur: float) -> dict:
    return {"cat": "Node", "name": f"{op}_node_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_kernel_shares_leave_out_the_first_run():
    # run 1 (a fresh session's first): a slow DequantizeLinear; runs 2 and 3: MatMul 3, Dequantize 1
    events = [{"name": "model_run", "cat": "Session", "ts": 0, "dur": 100},
              _node("DequantizeLinear", 10, 60), _node("MatMulInteger", 70, 30),
              {"name": "model_run", "cat": "Session", "ts": 200, "dur": 40},
              _node("MatMulInteger", 205, 30), _node("DequantizeLinear", 236, 10),
              {"name": "model_run", "cat": "Session", "ts": 300, "dur": 40},
              _node("MatMulInteger", 305, 30), _node("DequantizeLinear", 336, 10),
              {"name": "session_initialization", "cat": "Session", "ts": -50, "dur": 40}]
    assert onnxspeed.kernel_shares(events, skip_runs=1) == {"MatMulInteger": 0.75, "DequantizeLinear": 0.25}
    assert onnxspeed.kernel_shares(events) == {"DequantizeLinear": 80 / 170, "MatMulInteger": 90 / 170}
    with pytest.raises(ValueError, match="3 run"):
        onnxspeed.kernel_shares(events, skip_runs=3)


class _Session:
    """Counts its runs; its input is the export's. first_run_s: how long its first run takes."""

    def __init__(self, first_run_s: float = 0.0) -> None:
        self.runs, self.first_run_s = 0, first_run_s

    def get_inputs(self):
        return [type("Input", (), {"name": "pixel_values", "shape": ["batch", 3, 8, 8]})()]

    def get_modelmeta(self):
        return type("Meta", (), {"custom_metadata_map": {}})()

    def run(self, outputs, feeds):
        assert feeds["pixel_values"].shape == (2, 3, 8, 8)
        if self.runs == 0:
            time.sleep(self.first_run_s)
        self.runs += 1
        return [feeds["pixel_values"][:, 0, 0, :2] * self.runs]


def test_images_per_second_stops_a_small_models_rounds_at_max_runs():
    a, b = _Session(), _Session()
    rates = onnxspeed.images_per_second({"a": a, "b": b}, batch=2, seconds=60.0, rounds=3, max_runs=5)
    assert a.runs == b.runs == 1 + 3 * 5  # one warm-up, then three rounds of five
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())


def test_a_model_whose_warm_up_run_is_long_is_timed_in_one_round(monkeypatch):
    """A large tower's batch of 32 takes tens of seconds: one round, not two, after the warm-up."""
    monkeypatch.setattr(onnxspeed, "LONG_RUN_S", 0.05)
    a, b = _Session(), _Session(first_run_s=0.1)  # the slower of the two decides for both
    outputs: dict = {}
    rates = onnxspeed.images_per_second({"a": a, "b": b}, batch=2, seconds=60.0, rounds=3, max_runs=5,
                                        outputs=outputs)
    assert a.runs == b.runs == 1 + 5 and set(rates) == {"a", "b"}
    pixels = onnxspeed._input(a, 2)[1]
    np.testing.assert_array_equal(outputs["a"], pixels[:, 0, 0, :2])  # the warm-up's output, kept


def test_the_export_measurement_checks_a_picture_alone_against_the_timed_batch(tmp_path, monkeypatch):
    """The batch-of-32 output the alone check compares with is the warm-up's, of the same pixels:
    a batch-independent file reads 0.0, and the int8 file runs no extra batch for it."""
    fp32 = tmp_path / "f.onnx"
    fp32.write_bytes(_graph())
    real = onnxspeed.batch_dependence

    def given_the_batch(sess, batch, together=None):
        assert together is not None and together.shape == (batch, 3, 32, 32)
        return real(sess, batch, together)

    monkeypatch.setattr(onnxspeed, "batch_dependence", given_the_batch)
    speed = onnxspeed.measure_export(_graph(), fp32, batch=4, seconds=0.01)
    assert speed.alone_diff == 0.0 and speed.batch == 4 and speed.int8_rate > 0 and speed.fp32_rate > 0
    assert set(speed.shares) == {"Add", "QuantizeLinear", "DequantizeLinear", "Relu"}


def test_the_speed_lines_say_the_ratio_and_which_side_of_the_bar():
    speed = onnxspeed.CpuSpeed("Some CPU [avx2]", 32, 2, 75.0, 25.0,
                               {"MatMulIntegerToFloat": 0.8, "QuantizeLinear": 0.07, "Add": 0.05, "Relu": 0.08})
    first, second = speed.lines(top=2)
    assert first == "on this CPU, Some CPU [avx2], batch 32, 2 thread(s): int8 75.0 img/s, fp32 25.0 img/s (3.00x)"
    assert second == ("  int8 kernel time: MatMulIntegerToFloat 80.0%, QuantizeLinear 7.0%; "
                      "Quantize/DequantizeLinear + float Add 12.0% (over the 10% bar)")
    speed.shares["Add"] = 0.01
    assert speed.lines()[1].endswith("8.0% (within the 10% bar)")


def test_a_dynamic_files_conversion_is_not_judged_by_the_bar():
    """Its activations are quantized inside DynamicQuantizeMatMul: a small share says nothing."""
    speed = onnxspeed.CpuSpeed("Some CPU [avx2]", 32, 2, 90.0, 25.0, {"DynamicQuantizeMatMul": 0.9, "Add": 0.02})
    assert speed.lines()[1].endswith("Quantize/DequantizeLinear + float Add 2.0% (not judged: its activations are "
                                     "quantized inside DynamicQuantizeMatMul, not counted apart)")


@pytest.mark.parametrize(("shape", "meta", "want"), [
    (["batch", 3, 32, 32], {}, (2, 3, 32, 32)),  # fixed dims, as the export writes them
    (["batch", 3, "h", "w"], {"crop_height": 64, "crop_width": 48}, (2, 3, 64, 48)),  # the file's crop
    (["batch", 1, "h", "w"], None, (2, 1, 224, 224)),  # nothing to go by: 224 px, its channels
])
def test_the_timing_input_fits_the_files_input(shape, meta, want):
    import json

    import onnxruntime as ort

    from pipeline.embedders import META_PREPROCESS
    from pipeline.preprocess import PreprocessConfig

    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["y"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if meta is not None:
        cfg = json.loads(PreprocessConfig().to_json()) | meta
        helper.set_model_props(model, {META_PREPROCESS: json.dumps(cfg)})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name, x = onnxspeed._input(sess, 2)
    assert name == "pixel_values" and x.shape == want and x.dtype == np.float32
    sess.run(None, {name: x})


def _session(nodes, inits=()):
    import onnxruntime as ort

    shape = ["batch", 3, 8, 8]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_batch_dependence_is_zero_for_a_graph_of_each_picture_alone_and_not_otherwise():
    assert onnxspeed.batch_dependence(_session([helper.make_node("Relu", ["pixel_values"], ["y"])]), 8) == 0.0
    # minus the batch's mean: each picture's output depends on the others (as dynamic int8's scales do)
    centred = [helper.make_node("ReduceMean", ["pixel_values"], ["m"], keepdims=1),
               helper.make_node("Sub", ["pixel_values", "m"], ["y"])]
    assert onnxspeed.batch_dependence(_session(centred), 8) > 1e-3


def test_the_speed_lines_say_whether_a_picture_alone_equals_it_in_the_batch():
    def third(diff, shares):
        return onnxspeed.CpuSpeed("C", 32, 2, 9.0, 3.0, shares, diff).lines()[2:]

    assert third(None, {"MatMulIntegerToFloat": 1.0}) == []
    assert third(0.0, {"MatMulIntegerToFloat": 1.0}) == ["  one picture alone = the same picture in a batch of 32: "
                                                         "bit for bit"]
    [static] = third(3e-5, {"MatMulIntegerToFloat": 1.0})
    assert static.endswith("no, up to 3e-05 apart (this CPU's kernels make the file batch-dependent: a picture's "
                           "vector may differ between runs that batch it differently)")
    [dynamic] = third(0.02, {"DynamicQuantizeMatMul": 1.0})
    assert dynamic.endswith("no, up to 0.02 apart (as expected of dynamic int8, whose scales are the batch's)")


def test_a_file_the_export_calls_dynamic_is_judged_so_whatever_its_ops():
    speed = onnxspeed.CpuSpeed("C", 32, 2, 9.0, 3.0, {"MatMulInteger": 1.0}, 0.01, dynamic=True)
    assert "(not judged: its activations are quantized inside" in speed.lines()[1]
    assert speed.lines()[2].endswith("(as expected of dynamic int8, whose scales are the batch's)")
