"""The static int8 file as the CPU runs it best (issue 29).

The export writes portable QDQ (pipeline/export.py, recipe "matmul-float-out"): each MatMul reads
DequantizeLinear(QuantizeLinear(x)) and DequantizeLinear(int8 weights), and its float output goes
to a float bias Add. onnxruntime's CPU provider turns each such MatMul into MatMulIntegerToFloat
(int8 GEMM, scaled in its epilogue) but leaves the bias Add on its own: 8-9% of kernel time on the
real architecture. `cpu_model` rewrites the graph in memory, before the session is made, so that
the bias is added inside the kernel (MatMulIntegerToFloat's optional bias input, a contrib op of
onnxruntime): measured 1.07x the speed of the unfused file (benchmarks/int8_recipes.py).

The file on disk stays QDQ, so other providers (CUDA) and tools still read it; only a CPU session
sees the rewrite, and the file's probes check the rewritten graph as it runs. Files of another
recipe (or fp32) are left as they are: their vectors must not move.

The rewrite is kept in the user's cache ($XDG_CACHE_HOME/fashion-visual-search/int8graph, keyed by
the file's sha256 and this module's own code), so a run opens its CPU sessions straight from it:
no `onnx` import, no rewrite and no session opened only to read the file's recipe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .fileio import user_cache_dir

FUSED_RECIPE = "matmul-float-out"
META_INT8_RECIPE = "fashion_pipeline.int8_recipe"  # also pipeline/export.py's


def cpu_model(path: Path, meta: dict[str, str]) -> bytes | None:
    """The file's graph with every weight MatMul + bias Add fused into MatMulIntegerToFloat, as bytes
    for onnxruntime; None when the file is not of the fused recipe or nothing matched."""
    if meta.get(META_INT8_RECIPE) != FUSED_RECIPE:
        return None
    import onnx

    model = onnx.load(str(path))
    if fuse_bias(model) == 0:
        return None
    return model.SerializeToString()


AS_IS = "as-is"  # cached answer for a file with nothing to fuse: open the file itself


def _cache_key(file_sha256: str) -> Path:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # a changed rewrite is a new key
    base = user_cache_dir("int8graph")
    return base / f"{file_sha256[:32]}-{code}"


def cached_cpu_model(file_sha256: str) -> Path | str | None:
    """The CPU graph of the ONNX file with this sha256 from the cache: the path of its rewrite,
    AS_IS when it has nothing to fuse, None when not cached yet."""
    key = _cache_key(file_sha256)
    if key.with_suffix(".onnx").is_file():
        return key.with_suffix(".onnx")
    return AS_IS if key.with_suffix(".as-is").is_file() else None


def keep_cpu_model(file_sha256: str, fused: bytes | None) -> Path | None:
    """Put a file's rewrite (None: nothing to fuse) in the cache; its path, or None when the cache
    cannot be written (the run goes on from memory) or there was nothing to fuse."""
    from .fileio import atomic_write_bytes

    key = _cache_key(file_sha256)
    target = key.with_suffix(".onnx" if fused is not None else ".as-is")
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        for stale in key.parent.glob(f"{file_sha256[:32]}-*"):  # this file's rewrites by other code: dropped
            if not stale.name.startswith(key.name):
                stale.unlink(missing_ok=True)
        atomic_write_bytes(target, fused if fused is not None else b"")
    except OSError:
        return None
    return target if fused is not None else None


def _size(init: Any) -> int:
    n = 1
    for d in getattr(init, "dims", []):
        n *= d
    return n if init is not None else 0


def fuse_bias(model: Any) -> int:
    """Rewrite, in place, MatMul(DQ(xq), DQ(W)) [+ Add(bias)] into com.microsoft MatMulIntegerToFloat
    (xq, W, x_scale, W_scale, x_zero_point, W_zero_point[, bias]) where W is an int8 initializer and
    bias a 1-D initializer. Activation x activation MatMuls are left to onnxruntime. Returns the
    number of MatMuls rewritten."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replace: dict[int, Any] = {}
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if not (x_dq is not None and w_dq is not None and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        if w_dq.input[0] not in inits or len(x_dq.input) < 3 or len(w_dq.input) < 3:
            continue
        weight = inits[w_dq.input[0]]
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        per_column = axis in (1, -1) and len(weight.dims) == 2
        if not per_column and _size(inits.get(w_dq.input[1])) != 1:  # per-row scales: not what the kernel takes
            continue
        if node.output[0] in graph_outputs:
            continue
        users = consumers.get(node.output[0], [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        bias = None
        if add is not None:
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if other in inits and list(inits[other].dims) == [weight.dims[-1]] and add.output[0] not in graph_outputs:
                bias = other
        inputs = [x_dq.input[0], w_dq.input[0], x_dq.input[1], w_dq.input[1], x_dq.input[2], w_dq.input[2]]
        out = add.output[0] if add is not None and bias is not None else node.output[0]
        replace[id(node)] = helper.make_node("MatMulIntegerToFloat", inputs + ([bias] if bias else []), [out],
                                             name=f"{node.name}_int8", domain="com.microsoft")
        if bias is not None and add is not None:
            drop.add(id(add))
        if len(consumers.get(w_dq.output[0], [])) == 1:
            drop.add(id(w_dq))
        if len(consumers.get(x_dq.output[0], [])) == 1:
            drop.add(id(x_dq))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    while True:  # a DequantizeLinear shared by several rewritten MatMuls (q, k, v) is read by none now
        read = {name for n in nodes for name in n.input} | graph_outputs
        dead = [n for n in nodes if n.op_type == "DequantizeLinear" and not any(o in read for o in n.output)]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)
