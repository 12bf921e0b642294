"""Run an int8 ONNX file as a CPU without VNNI would: an emulation of onnxruntime's (MLAS) u8 x s8 GEMM
on AVX2 and AVX-512BW, for tests that must hold on every x86 CPU whatever CPU runs them.

There the kernel multiplies uint8 activations by int8 weights with vpmaddubsw, which adds each
pair of neighbouring products (k, k+1) into a 16-bit sum that saturates at [-32768, 32767], then
widens to 32 bits (vpmaddwd); zero points are corrected afterwards from row and column sums. VNNI
(vpdpbusd) and AMX add into 32 bits and never saturate. u8 x u8 products (activation x activation
MatMuls of the static QDQ model) run a widening kernel and are exact on every CPU.

The graph is evaluated by onnx's reference evaluator, with each quantized MatMul replaced by the
saturating version. The static export's graph holds onnxruntime's contrib ops (pipeline/int8graph.py):
MatMulIntegerToFloat (u8 x s8, emulated so too), Gelu and FastGelu (their formulas); the AMX
profile's QGemm (u8 x s8 too, its uint8 output requantized), QLinearSigmoid and QLinearMul (uint8 in
and out, by their formulas: onnxruntime's table for QLinearSigmoid and its float arithmetic may round a
value to the next step where the emulation does not). Slow (numpy), exact for the integer GEMMs;
meant for tiny test models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import onnx
from onnx import helper

DOMAIN = "test.int8emulation"


def saturating_dot(a_u8: np.ndarray, b_s8: np.ndarray) -> np.ndarray:
    """sum over k of a[..., k] * b[k, n], with each pair (2j, 2j+1) summed in int16 with saturation.

    Args:
        a_u8: uint8 (..., K) activations; b_s8: int8 (K, N) weights.
    Returns:
        int64 (..., N).
    """
    a = a_u8.astype(np.int32)
    b = b_s8.astype(np.int32)
    if a.shape[-1] % 2:  # MLAS pads K with zeros
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), np.int32)], -1)
        b = np.concatenate([b, np.zeros((1, b.shape[1]), np.int32)], 0)
    flat = a.reshape(-1, a.shape[-1])
    out = np.zeros((flat.shape[0], b.shape[1]), np.int64)
    for j in range(0, flat.shape[1], 2):
        pair = flat[:, j : j + 1] * b[j][None, :] + flat[:, j + 1 : j + 2] * b[j + 1][None, :]
        out += np.clip(pair, -32768, 32767)
    return out.reshape(a.shape[:-1] + (b.shape[1],))


def integer_matmul(a: np.ndarray, b: np.ndarray, a_zp=None, b_zp=None) -> np.ndarray:
    """MatMulInteger as AVX2 computes it: int64 result of (a - a_zp) @ (b - b_zp)."""
    za = np.int64(0) if a_zp is None else np.asarray(a_zp).astype(np.int64)
    zb = np.int64(0) if b_zp is None else np.asarray(b_zp).astype(np.int64)
    if a.dtype == np.uint8 and b.dtype == np.int8 and b.ndim == 2:
        zb = np.broadcast_to(zb.reshape(-1), (b.shape[1],))
        za = int(za.reshape(-1)[0])
        raw = saturating_dot(a, b)
        return (
            raw
            - za * b.astype(np.int64).sum(0)
            - zb * a.astype(np.int64).sum(-1, keepdims=True)
            + a.shape[-1] * za * zb
        )
    return np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb)


class SaturatingMatMulInteger(OpRun):
    op_domain = DOMAIN

    def _run(self, a, b, a_zp=None, b_zp=None):
        return (integer_matmul(a, b, a_zp, b_zp).astype(np.int32),)


class SaturatingQdqMatMul(OpRun):
    """MatMul(DequantizeLinear(xq), DequantizeLinear(wq)) as onnxruntime fuses it: integer GEMM, then scales."""

    op_domain = DOMAIN

    def _run(self, xq, xs, xzp, wq, ws, wzp):
        return (scaled_matmul(xq, wq, xs, ws, xzp, wzp).astype(np.float32),)


def scaled_matmul(a, b, a_scale, b_scale, a_zp=None, b_zp=None, int_bias=None) -> np.ndarray:
    """float64 integer_matmul(a, b) (plus int_bias, in its units: QGemm's int32 C) x a_scale (one
    value) x b_scale (one or one per column)."""
    acc = integer_matmul(a, b, a_zp, b_zp).astype(np.float64)
    if int_bias is not None:
        acc = acc + np.asarray(int_bias, np.float64)
    return acc * float(np.asarray(a_scale).reshape(-1)[0]) * np.asarray(b_scale, np.float64).reshape(-1)


class ContribMatMulIntegerToFloat(OpRun):
    """onnxruntime's contrib op: integer GEMM, then a_scale x b_scale (per column) and the bias."""

    op_domain = DOMAIN

    def _run(self, a, b, a_scale, b_scale, a_zp=None, b_zp=None, bias=None):
        out = scaled_matmul(a, b, a_scale, b_scale, a_zp, b_zp)
        return ((out if bias is None else out + bias).astype(np.float32),)


class ContribGelu(OpRun):
    """onnxruntime's contrib Gelu: 0.5 x (1 + erf(x / sqrt 2))."""

    op_domain = DOMAIN

    def _run(self, x):
        from scipy.special import erf

        return ((0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(x.dtype),)


class ContribFastGelu(OpRun):
    """onnxruntime's contrib FastGelu: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    op_domain = DOMAIN

    def _run(self, x, bias=None):
        x = x if bias is None else x + bias
        return ((0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))).astype(x.dtype),)


def _requantize(y: np.ndarray, scale, zero) -> np.ndarray:
    """float y as uint8 at scale and zero point (rounded half to even, as MLAS rounds)."""
    q = np.rint(y / float(np.asarray(scale).reshape(-1)[0])) + int(np.asarray(zero).reshape(-1)[0])
    return np.clip(q, 0, 255).astype(np.uint8)


def _real(q: np.ndarray, scale, zero) -> np.ndarray:
    return (q.astype(np.float64) - int(np.asarray(zero).reshape(-1)[0])) * float(np.asarray(scale).reshape(-1)[0])


class ContribQGemm(OpRun):
    """onnxruntime's contrib QGemm (transA = transB = 0, alpha 1, as the AMX profile writes it): the
    u8 x s8 GEMM as on AVX2, the int32 bias, then scaled, and requantized where y_scale is given."""

    op_domain = DOMAIN

    def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c=None, y_scale=None, y_zp=None, **attrs):
        if attrs.get("transA") or attrs.get("transB") or attrs.get("alpha", 1.0) != 1.0:
            raise NotImplementedError(f"QGemm with {attrs} is not emulated")
        y = scaled_matmul(a, b, a_scale, b_scale, a_zp, b_zp, int_bias=c)
        return (y.astype(np.float32) if y_scale is None else _requantize(y, y_scale, y_zp),)


class ContribQLinearSigmoid(OpRun):
    """onnxruntime's contrib QLinearSigmoid: sigmoid of the uint8 input's value, as uint8."""

    op_domain = DOMAIN

    def _run(self, x, x_scale, x_zp, y_scale, y_zp):
        return (_requantize(1.0 / (1.0 + np.exp(-_real(x, x_scale, x_zp))), y_scale, y_zp),)


class ContribQLinearMul(OpRun):
    """onnxruntime's contrib QLinearMul: the product of two uint8 inputs' values, as uint8."""

    op_domain = DOMAIN

    def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp):
        return (_requantize(_real(a, a_scale, a_zp) * _real(b, b_scale, b_zp), c_scale, c_zp),)


def emulated_session(path: str | Path) -> ReferenceEvaluator:
    """An evaluator of the int8 file at `path` with every u8 x s8 GEMM computed as on AVX2."""
    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMulInteger":
            nodes.append(
                helper.make_node(
                    "SaturatingMatMulInteger", list(node.input), list(node.output), domain=DOMAIN, name=node.name
                )
            )
        elif node.op_type == "MatMul" and all(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input
        ):
            x, w = producer[node.input[0]], producer[node.input[1]]
            nodes.append(
                helper.make_node(
                    "SaturatingQdqMatMul", [*x.input, *w.input], list(node.output), domain=DOMAIN, name=node.name
                )
            )
        elif node.domain == "com.microsoft":  # the emulation's own, by name (onnx has a Gelu of its own)
            nodes.append(helper.make_node(f"Contrib{node.op_type}", list(node.input), list(node.output), domain=DOMAIN,
                                          name=node.name, **{a.name: helper.get_attribute_value(a)
                                                             for a in node.attribute}))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 19:
            op.version = 19  # the reference evaluator implements (De)QuantizeLinear from opset 19 on
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return ReferenceEvaluator(
        model, new_ops=[SaturatingMatMulInteger, SaturatingQdqMatMul, ContribMatMulIntegerToFloat, ContribGelu,
                        ContribFastGelu, ContribQGemm, ContribQLinearSigmoid, ContribQLinearMul]
    )


def run_emulated(path: str | Path, pixels: np.ndarray, batch: int = 16) -> np.ndarray:
    """The file's outputs for `pixels` (float32 (B, 3, H, W)) as an AVX2-only CPU computes them."""
    session = emulated_session(path)
    name = session.input_names[0]
    return np.concatenate([session.run(None, {name: pixels[i : i + batch]})[0] for i in range(0, len(pixels), batch)])
