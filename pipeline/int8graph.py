"""The static int8 graph as onnxruntime's CPU provider runs it best (issue 29).

onnxruntime's quantizer writes portable QDQ (pipeline/export.py): each MatMul reads
DequantizeLinear(QuantizeLinear(x)) and DequantizeLinear(int8 weights), and its float output goes
to a float bias Add. onnxruntime's CPU provider turns each such MatMul into MatMulIntegerToFloat
(int8 GEMM, scaled in its epilogue) but leaves the bias Add on its own. `cpu_graph` rewrites the
graph so that the bias is added inside the kernel (MatMulIntegerToFloat's optional bias input, a
contrib op of onnxruntime), and two more:
- `fuse_gelu`: a GELU the exporter wrote out in elementary ops (the exact erf form of open_clip and
  timm towers, Marqo-FashionSigLIP; the tanh form of transformers' SigLIP) in an order
  onnxruntime's own fusion does not match ran as five to eight float ops between the int8 MatMuls;
  it becomes onnxruntime's Gelu or FastGelu (the same formula in one pass);
- `shapes_of_quantized`: a Shape that read the dequantized image input (once the patch
  convolution is quantized) reads the int8 tensor, which then is not dequantized at all.

The export writes the rewritten graph (recipe CPU_GRAPH_RECIPE; for `--int8-profile amx` and a
tower with GELUs, AMX_RECIPE: `activation_products` (a transformer's) or `depthwise_convolutions` (a
ConvNeXt's) left in float before quantizing and `uint8_gelu` after; for `--int8-profile vnni` and a
ConvNeXt, DEPTHWISE_RECIPE: its depthwise convolutions in float; `static_graph` chooses):
the file is the graph every
onnxruntime CPU session runs, in the user's own program too, with no step of ours (figures in the
README, "Int8 recipes"). It is for onnxruntime's CPU provider, where the int8 file belongs: a GPU
runs the fp32 file or the torch model, other runtimes the QDQ file of `--quantization static-qdq`.

Convolutional towers (open_clip's ResNets) get two exact rewrites of the fp32 graph before it is
quantized, `pools_as_convolutions`: an average pool of kernel 1 (the identity a ResNet block's
shortcut writes when it does not downsample) is dropped, and a pool whose windows do not overlap
(ResNet's anti-aliased 2x2 downsampling) becomes the depthwise convolution it is, with weights
1/(kh kw). onnxruntime runs a quantized average pool in a plain loop (QLinearAveragePool, 12% of the
int8 RN50's kernel time) and a quantized depthwise convolution in MLAS (README, "Int8 recipes").
A ConvNeXt's layer scale (MatMul -> bias Add -> Transpose -> Mul by a per-channel constant) is
folded into the MatMul's weights and bias before a per-channel quantization,
`scales_into_matmuls`: the same int8 integers, no float Mul over every position.

Files of earlier recipes, and of `--quantization static-qdq`, are QDQ on disk: `cpu_model`
rewrites them in memory before a CPU session is made (EVERY_REWRITE gets every rewrite, the earliest,
"matmul-float-out", the bias fusion alone), so vectors of stores made from them do not move. That
rewrite is kept in the user's cache ($XDG_CACHE_HOME/fashion-visual-search/int8graph, keyed by the
file's sha256 and this module's own code), so a run opens its CPU sessions straight from it: no
`onnx` import, no rewrite and no session opened only to read the file's recipe.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from .fileio import user_cache_dir

# The QDQ recipe of onnxruntime's quantizer the export uses (pipeline/export.py): MatMul outputs in
# float, convolutions, Gemms over every position and Relu/Clip quantized too, a convolutional
# tower's tiling pools as depthwise convolutions. Every QDQ recipe whose files this rewrite knows:
# "matmul-float-out+conv" (2026-12-04: Relus, Gemms and pools left in float; the same file as now
# for a ViT of transformers), "matmul-float-out" (2026-12-03) left the patch convolution in float.
# Files of all three are QDQ on disk.
FUSED_RECIPE = "matmul-float-out+conv+gemm+relu"
FUSED_RECIPES = frozenset({"matmul-float-out", "matmul-float-out+conv", FUSED_RECIPE})
EVERY_REWRITE = frozenset({"matmul-float-out+conv", FUSED_RECIPE})  # the earliest gets its bias fusion alone
# What the export writes now: FUSED_RECIPE's graph with `cpu_graph` made before it is saved; and the
# files the export wrote so before (their QDQ recipe "matmul-float-out+conv"): already CPU graphs.
CPU_GRAPH_RECIPE = FUSED_RECIPE + "+cpu-graph"
# The AMX profile's (`--int8-profile amx`): the attention products left in float and each GELU
# computed in uint8 (`uint8_gelu`), fewer passes over float activations where AMX makes the int8
# GEMMs cheap (README, "Int8 by CPU kind"). Until the evening of 2026-12-06 a sigmoid GELU's alone
# (CLIP's); since then a tanh or exact one too (SigLIP's, open_clip's), with the same recipe name:
# a file of it made before is a CLIP's, unchanged, and SigLIP's were made with the VNNI recipe.
# Since the evening of 2026-12-06 each such QGemm's bias is carried by constant input columns
# (`bias_columns`): the same integers; on an AMX Xeon 1.09x the speed in one two-thread session, about
# the same in the pipeline's one-thread-per-core sessions. Files of the earlier AMX recipe run as they are.
# Since the night of 2026-12-06 a convolutional tower with GELUs (ConvNeXt) takes it too, its depthwise
# convolutions the part left in float (`depthwise_convolutions`; it has no attention products), with
# the same recipe name: the export wrote the VNNI recipe for such a tower before.
AMX_RECIPE = CPU_GRAPH_RECIPE + "+float-attention+uint8-gelu+bias-columns"
# The VNNI profile's graph for a ConvNeXt since 2026-12-07 (`static_graph`): its depthwise convolutions
# left in float, nothing else changed; the export wrote the AMX recipe for it on every CPU before.
DEPTHWISE_RECIPE = CPU_GRAPH_RECIPE + "+float-depthwise"
CPU_GRAPH_RECIPES = frozenset({"matmul-float-out+conv+cpu-graph", CPU_GRAPH_RECIPE,
                               CPU_GRAPH_RECIPE + "+float-attention+uint8-gelu", AMX_RECIPE, DEPTHWISE_RECIPE})
META_INT8_RECIPE = "fashion_pipeline.int8_recipe"  # also pipeline/export.py's


def cpu_graph(model: Any) -> int:
    """Rewrite, in place, a static QDQ graph of EVERY_REWRITE into the graph a CPU session runs best:
    `fuse_bias`, `fuse_gelu` and `shapes_of_quantized` (the module's doc). Returns the number of
    rewrites."""
    return fuse_bias(model) + fuse_gelu(model) + shapes_of_quantized(model)


def cpu_model(path: Path, meta: dict[str, str]) -> bytes | None:
    """The graph of a QDQ file of an earlier export, as a CPU session runs it: every weight MatMul +
    bias Add fused into MatMulIntegerToFloat and, for EVERY_REWRITE, `cpu_graph`'s other rewrites, as
    bytes for onnxruntime; None when the file is of no QDQ recipe this rewrite knows (a file the
    export wrote already rewritten, CPU_GRAPH_RECIPES, among them), or nothing matched."""
    recipe = meta.get(META_INT8_RECIPE)
    if recipe not in FUSED_RECIPES:
        return None
    import onnx

    model = onnx.load(str(path))
    # an earlier recipe's graph stays as its stores' vectors were made
    changed = cpu_graph(model) if recipe in EVERY_REWRITE else fuse_bias(model)
    if changed == 0:
        return None
    return model.SerializeToString()


AS_IS = "as-is"  # cached answer for a file with nothing to fuse: open the file itself


def _cache_key(file_sha256: str) -> Path:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # a changed rewrite is a new key
    base = user_cache_dir("int8graph")
    return base / f"{file_sha256[:32]}-{code}"


# The cache keeps its most recently used rewrites up to this many bytes (the one just written
# always): every re-export of a QDQ file is a new sha256 and a new rewrite, 90 MB for FashionCLIP's,
# 435 MB for SigLIP so400m's. A temp file a killed writer left goes after a day.
CACHE_BYTES = 2 << 30
CACHE_TEMP_AFTER_S = 24 * 3600


def cached_cpu_model(file_sha256: str) -> Path | str | None:
    """The CPU graph of the ONNX file with this sha256 from the cache: the path of its rewrite,
    AS_IS when it has nothing to fuse, None when not cached yet. A hit counts as a use (mtime)."""
    key = _cache_key(file_sha256)
    for hit, answer in ((key.with_suffix(".onnx"), None), (key.with_suffix(".as-is"), AS_IS)):
        if hit.is_file():
            try:
                os.utime(hit)
            except OSError:  # a cache read from a read-only place is used as it is
                pass
            return answer or hit
    return None


def _prune_cache(folder: Path, keep: Path) -> None:
    """Drop the least recently used rewrites beyond CACHE_BYTES (never `keep`), and temp files
    older than CACHE_TEMP_AFTER_S."""
    now = time.time()
    entries = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            if now - st.st_mtime > CACHE_TEMP_AFTER_S:
                p.unlink(missing_ok=True)
        elif p.suffix == ".onnx" and p != keep:
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries) + (keep.stat().st_size if keep.is_file() else 0)
    for _, size, p in sorted(entries, key=lambda e: e[0]):  # oldest use first
        if total <= CACHE_BYTES:
            break
        p.unlink(missing_ok=True)
        total -= size


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
    try:
        _prune_cache(key.parent, target)
    except OSError:  # another user's file in a shared cache, say: the entry just written stands
        pass
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
    inits, producer, graph_outputs, consumers = _graph_maps(graph)
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
                                             name=f"{node.name or out}_int8", domain="com.microsoft")
        if bias is not None and add is not None:
            drop.add(id(add))
        for dq in (w_dq, x_dq):  # read by this MatMul alone (a graph output is read outside the graph)
            if len(consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in graph_outputs:
                drop.add(id(dq))
    if not replace:
        return 0
    # a DequantizeLinear shared by several rewritten MatMuls (q, k, v) is read by none now
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    _set_nodes(model, _without_unread_dequantize(nodes, graph_outputs))
    return len(replace)


def _scalar(inits: dict[str, Any], name: str) -> float | None:
    """The value of a float initializer that is a scalar or holds one value in one dimension (a
    constant of more dimensions would broadcast the result into them), else None."""
    from onnx import numpy_helper

    init = inits.get(name)
    if init is None or _size(init) != 1 or len(init.dims) > 1:
        return None
    value = numpy_helper.to_array(init)
    return float(value.reshape(-1)[0]) if value.dtype.kind == "f" else None


def fuse_gelu(model: Any, rewrite: bool = True) -> int:
    """Rewrite, in place, each GELU written out in elementary ops into onnxruntime's one-kernel op:
    - exact, 0.5 x (1 + erf(x / sqrt 2)), from Div(x, sqrt 2) or Mul(x, 1/sqrt 2) -> Erf: Gelu
      (open_clip's towers, timm's, Marqo-FashionSigLIP);
    - tanh, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), from Pow(x, 3) -> Mul -> Add(x) -> Mul
      -> Tanh: FastGelu (transformers' SigLIP, gelu_pytorch_tanh);
    each followed by Add(1) and the factors x and 0.5 in any of the three orders exporters write
    them (Mul(Mul(e, 0.5), x), Mul(Mul(e, x), 0.5), Mul(e, Mul(x, 0.5))). Every intermediate value
    must be read by the pattern alone. Returns the number of GELUs rewritten (with rewrite False, the
    number it would rewrite, the model left as it is)."""
    import math

    from onnx import helper

    graph = model.graph
    inits, producer, graph_outputs, consumers = _graph_maps(graph)

    def near(name: str, want: float) -> bool:
        got = _scalar(inits, name)
        return got is not None and abs(got - want) <= 1e-6 * abs(want)

    def only_user(node: Any) -> Any:
        """The one node that reads `node`'s output, None if several (or a graph output) do."""
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and node.output[0] not in graph_outputs else None

    def other(node: Any, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    def fed(node: Any, op: str) -> Any:
        """The producer of one of `node`'s inputs that is an `op` read by `node` alone, else None."""
        for name in node.input:
            got = producer.get(name)
            if got is not None and got.op_type == op and only_user(got) is node and len(got.input) == 2:
                return got
        return None

    def by_constant(node: Any, want: float) -> str | None:
        """The input of a two-input node whose other input is the constant `want`."""
        if len(node.input) == 2:
            for a, b in (node.input, node.input[::-1]):
                if near(b, want):
                    return a
        return None

    def core(act: Any) -> tuple[str, list[Any], str] | None:
        """(x, the nodes from x to `act`, the op that replaces them) of an Erf or a Tanh."""
        scale = producer.get(act.input[0])
        if scale is None or only_user(scale) is not act:
            return None
        if act.op_type == "Erf":
            divided = scale.op_type == "Div" and len(scale.input) == 2 and near(scale.input[1], math.sqrt(2))
            x = (scale.input[0] if divided
                 else by_constant(scale, 1 / math.sqrt(2)) if scale.op_type == "Mul" else None)
            return (x, [scale], "Gelu") if x is not None else None
        inner = producer.get(by_constant(scale, math.sqrt(2 / math.pi)) or "") if scale.op_type == "Mul" else None
        if inner is None or inner.op_type != "Add" or only_user(inner) is not scale:
            return None
        cube_mul = fed(inner, "Mul")
        pow_ = producer.get(by_constant(cube_mul, 0.044715) or "") if cube_mul is not None else None
        if pow_ is None or pow_.op_type != "Pow" or only_user(pow_) is not cube_mul or not near(pow_.input[1], 3.0):
            return None
        x = pow_.input[0]
        if other(inner, cube_mul.output[0]) != x:
            return None
        return x, [pow_, cube_mul, inner, scale], "FastGelu"

    replace: dict[int, Any] = {}
    drop: set[int] = set()
    for act in graph.node:
        if act.op_type not in ("Erf", "Tanh") or act.domain not in ("", "ai.onnx"):
            continue
        found = core(act)
        if found is None:
            continue
        x, head, op = found
        add = only_user(act)
        if add is None or add.op_type != "Add" or by_constant(add, 1.0) != act.output[0]:
            continue
        first = only_user(add)
        if first is None or first.op_type != "Mul":
            continue
        factor = other(first, add.output[0])
        half = producer.get(factor)
        if near(factor, 0.5) or factor == x:  # 0.5 or x first, the other after
            last = only_user(first)
            if last is None or last.op_type != "Mul":
                continue
            rest = other(last, first.output[0])
            if not (rest == x if near(factor, 0.5) else near(rest, 0.5)):
                continue
            pattern = [*head, act, add, first, last]
        elif (half is not None and half.op_type == "Mul" and only_user(half) is first
              and by_constant(half, 0.5) == x):  # (x * 0.5) * (1 + erf)
            last, pattern = first, [*head, act, add, half, first]
        else:
            continue
        if any(id(n) in drop or id(n) in replace for n in pattern):
            continue
        replace[id(last)] = helper.make_node(op, [x], [last.output[0]], name=f"{act.name or last.output[0]}_{op}",
                                           domain="com.microsoft")
        drop.update(id(n) for n in pattern if n is not last)
    if replace and rewrite:
        _set_nodes(model, [replace.get(id(n), n) for n in graph.node if id(n) not in drop])
    return len(replace)


def shapes_of_quantized(model: Any) -> int:
    """Rewrite, in place, each Shape that reads a DequantizeLinear's output to read its quantized
    input (the same shape), so a tensor dequantized only to be measured is not dequantized at all
    (the image input, once the patch convolution is quantized: the class token's batch size). A
    DequantizeLinear left unread is dropped. Returns the number of Shapes rewired."""
    graph = model.graph
    producer = _graph_maps(graph)[1]
    rewired = 0
    for node in graph.node:
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            dq = producer.get(node.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx"):
                node.input[0] = dq.input[0]
                rewired += 1
    if rewired:
        _set_nodes(model, _without_unread_dequantize(list(graph.node), {o.name for o in graph.output}))
    return rewired


def pools_as_convolutions(model: Any) -> int:
    """Rewrite, in place, a float graph's average pools that are not pools at all: one of kernel 1,
    stride 1 and no padding (the identity) is dropped, its readers reading its input; one whose
    kernel equals its strides, unpadded, undilated and not ceil-mode (windows that tile the
    input), becomes a depthwise Conv (group = channels, weights 1/(kh kw), no bias): the same
    sums. The channel count and type come from the graph's shape information (onnx shape
    inference); a pool of unknown channels, or not float32, is left, and so is every pool of a
    graph with subgraphs (whose readers this does not follow). Returns the number of pools
    rewritten."""
    import numpy as np

    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if _has_subgraphs(graph):
        return 0
    values = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.input, *graph.output)}
    graph_outputs = {o.name for o in graph.output}
    nodes: list[Any] = []
    rename: dict[str, str] = {}
    rewritten = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel, strides = list(attrs.get("kernel_shape", [])), list(attrs.get("strides", []))
        strides = strides or [1] * len(kernel)
        unpadded = not any(attrs.get("pads", [])) and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
        undilated = all(d == 1 for d in attrs.get("dilations", []))
        if not (kernel and unpadded and undilated and kernel == strides and not attrs.get("ceil_mode", 0)):
            nodes.append(node)
        elif all(k == 1 for k in kernel) and node.output[0] not in graph_outputs:
            rename[node.output[0]] = node.input[0]
            rewritten += 1
        else:
            value = values.get(node.input[0])
            dims = value.shape.dim if value is not None else []
            c = dims[1].dim_value if len(dims) == len(kernel) + 2 else 0
            if c <= 0 or value is None or value.elem_type != TensorProto.FLOAT:
                nodes.append(node)
                continue
            base = f"{node.name or node.output[0]}_as_depthwise_conv"
            weights = np.full((c, 1, *kernel), 1.0 / np.prod(kernel), np.float32)
            weight = numpy_helper.from_array(weights, f"{base}_weight")
            graph.initializer.append(weight)
            nodes.append(helper.make_node("Conv", [node.input[0], weight.name], list(node.output), name=base, group=c,
                                          kernel_shape=kernel, strides=strides))
            rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def scales_into_matmuls(model: Any) -> int:
    """Fold, in place, a constant per-channel scale on a MatMul's output into its weights: ConvNeXt's
    layer scale, MatMul(x, W) -> Add(bias) -> [Transpose] -> Mul(gamma), becomes MatMul(x, W gamma)
    -> Add(bias gamma) -> [Transpose], the same sums. Quantized per output channel (symmetric int8)
    the folded weights are the same integers, the column's scale taking |gamma| and a negative gamma
    flipping the column's sign: no float Mul over every position is left between two int8 ops. For a
    float graph whose weights are per-channel quantized next (per tensor, a gamma that varies by
    channel would change every column's integers: the caller does not fold then). Left as they are: a
    scale that varies along any axis but the MatMul's output channels, a chain whose values are read
    elsewhere or are graph outputs, weights that are not float32 inside the file or that a graph
    input can override, an unknown or inconsistent rank, and every Mul of a graph with subgraphs.
    The folded weights are new initializers of new names (an exporter shares equal tensors between
    layers); an initializer the folds left unread goes. Returns the number of scales folded."""
    import numpy as np

    from onnx import TensorProto, numpy_helper

    graph = model.graph
    if _has_subgraphs(graph):
        return 0
    inits, producer, graph_outputs, consumers = _graph_maps(graph)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input, *graph.output)
             if v.type.tensor_type.HasField("shape")}
    overridable = {i.name for i in graph.input}
    taken = set(inits) | set(producer) | overridable | {n.name for n in graph.node}

    def constant(name: str) -> Any:
        init = inits.get(name)
        if (init is None or name in overridable or init.data_location == TensorProto.EXTERNAL
                or init.data_type != TensorProto.FLOAT):
            return None
        return numpy_helper.to_array(init)

    def new_name(want: str) -> str:
        name, i = want, 1
        while name in taken:
            name, i = f"{want}_{i}", i + 1
        taken.add(name)
        return name

    def only_reader(value: str, node: Any) -> bool:
        return value not in graph_outputs and [id(n) for n in consumers.get(value, [])] == [id(node)]

    def made_by(value: str, op: str, reader: Any) -> Any:
        """The `op` node of the default domain making `value`, if `reader` alone reads it."""
        node = producer.get(value)
        if node is None or node.op_type != op or node.domain not in ("", "ai.onnx") or not only_reader(value, reader):
            return None
        return node

    drop: set[int] = set()
    rename: dict[str, str] = {}
    replaced: set[str] = set()  # initializers a fold stopped reading
    folded = 0
    for mul in graph.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or mul.output[0] in graph_outputs:
            continue
        at = [i for i, name in enumerate(mul.input) if constant(name) is not None]
        if len(at) != 1:
            continue
        gamma, scaled_value = constant(mul.input[at[0]]), mul.input[1 - at[0]]
        value, reader, perm = scaled_value, mul, None
        transpose = made_by(value, "Transpose", reader)
        if transpose is not None:  # without perm, a Transpose reverses the axes
            perm = [int(p) for a in transpose.attribute if a.name == "perm" for p in a.ints]
            perm = perm or list(reversed(range(ranks.get(scaled_value, 0))))
            value, reader = transpose.input[0], transpose
        add, bias_name = made_by(value, "Add", reader), ""
        if add is not None:
            at_bias = [i for i, name in enumerate(add.input) if constant(name) is not None]
            if len(at_bias) != 1:
                continue
            bias_name, value, reader = add.input[at_bias[0]], add.input[1 - at_bias[0]], add
        node = made_by(value, "MatMul", reader)
        if node is None or gamma is None:
            continue
        weight, rank = constant(node.input[1]), ranks.get(scaled_value, 0)
        if weight is None or weight.ndim != 2 or rank < 2 or gamma.ndim > rank or (perm and len(perm) != rank):
            continue
        if {ranks.get(v) for v in (node.input[0], node.output[0], mul.output[0])} != {rank}:  # shapes agree
            continue
        n = weight.shape[1]
        channel = perm.index(rank - 1) if perm else rank - 1
        shape = (1,) * (rank - gamma.ndim) + tuple(gamma.shape)
        if any(d != 1 for a, d in enumerate(shape) if a != channel) or shape[channel] not in (1, n):
            continue
        bias = constant(bias_name) if add is not None else np.zeros(n, np.float32)
        if bias is None or bias.ndim > 1 or bias.size not in (1, n):
            continue
        g = np.broadcast_to(gamma.reshape(-1), (n,)).astype(np.float32)
        base = mul.name or mul.output[0]
        weight_name = node.input[1]
        folded_weight = numpy_helper.from_array((weight * g[None, :]).astype(np.float32),
                                                new_name(f"{base}_folded_weight"))
        graph.initializer.append(folded_weight)
        node.input[1] = folded_weight.name
        if add is not None:
            folded_bias = numpy_helper.from_array((bias * g).astype(np.float32), new_name(f"{base}_folded_bias"))
            graph.initializer.append(folded_bias)
            add.input[list(add.input).index(bias_name)] = folded_bias.name
        replaced |= {mul.input[at[0]], weight_name, bias_name} - {""}
        rename[mul.output[0]] = scaled_value
        drop.add(id(mul))
        folded += 1
    if folded:
        nodes = [n for n in graph.node if id(n) not in drop]
        for n in nodes:
            for i, name in enumerate(n.input):
                n.input[i] = rename.get(name, name)
        unread = replaced - {name for n in nodes for name in n.input} - overridable - graph_outputs
        kept = [i for i in graph.initializer if i.name not in unread]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return folded


def per_position_gemm(model: Any, node: Any) -> bool:
    """Whether a Gemm of a float graph (onnx shape inference run on it) multiplies a row per
    position rather than a row per picture: its input's rows are a known multiple of the graph
    input's batch ("50*batch" in open_clip's ResNet attention pool, "197*batch" in an open_clip
    ViT's attention), not the batch itself ("batch": a final projection). Unknown shapes: False."""
    graph = model.graph
    shapes = {v.name: v.type.tensor_type.shape.dim for v in (*graph.value_info, *graph.input)}
    rows, batch = shapes.get(node.input[0]), shapes.get(graph.input[0].name) if graph.input else None
    if not rows or not batch:
        return False
    r, b = rows[0], batch[0]
    if b.dim_param:
        return bool(r.dim_param) and r.dim_param != b.dim_param and r.dim_param.endswith("*" + b.dim_param)
    return r.dim_value > b.dim_value > 0 and r.dim_value % b.dim_value == 0


def activation_products(model: Any) -> list[str]:
    """The names of the MatMuls of a float graph whose inputs are all activations (a transformer's
    attention products q.k and p.v), unnamed ones named first: the AMX profile leaves them to the
    quantizer's `nodes_to_exclude`, which matches nodes by name."""
    return _named(_activation_matmuls(model), "activation_matmul")


def depthwise_convolutions(model: Any) -> list[str]:
    """The names of the depthwise convolutions of a float graph (`_depthwise_convs`), unnamed ones
    named first: the AMX profile leaves a ConvNeXt's 7x7 ones to the quantizer's `nodes_to_exclude`.
    In float, onnxruntime runs them in its blocked layout, with no DequantizeLinear after each and no
    QuantizeLinear before; in int8 they were 2% of kernel time and their conversions 13% on an AMX
    Xeon (README, "ConvNeXt is over the bar")."""
    return _named(_depthwise_convs(model), "depthwise_conv")


def _named(found: list[tuple[int, Any]], prefix: str) -> list[str]:
    """The names of the nodes `found` ((index, node) pairs), each unnamed one named first
    (prefix_index_output: new in the graph)."""
    for i, node in found:
        node.name = node.name or f"{prefix}_{i}_{node.output[0]}"
    return [node.name for _, node in found]


def _depthwise_convs(model: Any) -> list[tuple[int, Any]]:
    """(index, node) of each depthwise Conv of a float graph: more than one group, each of one input
    channel (its constant weight (M, 1, kh, kw)). Read before `pools_as_convolutions`, which writes
    a ResNet's tiling pools as depthwise convolutions for int8 to run."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    found = []
    for i, n in enumerate(model.graph.node):
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        dims = weights.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if group > 1 and dims is not None and len(dims) > 1 and dims[1] == 1:
            found.append((i, n))
    return found


def amx_in_float(model: Any) -> list[str]:
    """The nodes of a float graph the AMX profile leaves to the quantizer's `nodes_to_exclude`, named
    first where unnamed: a transformer's attention products (`activation_products`), else a
    ConvNeXt's depthwise convolutions (`depthwise_convolutions`)."""
    return activation_products(model) or depthwise_convolutions(model)


def _activation_matmuls(model: Any) -> list[tuple[int, Any]]:
    """(index, node) of each MatMul of a float graph none of whose inputs is a constant."""
    constant = {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [(i, n) for i, n in enumerate(model.graph.node)
            if n.op_type == "MatMul" and not any(x in constant for x in n.input)]


def _sigmoid_gates(model: Any) -> list[tuple[str, Any, Any, Any, float]]:
    """Each x * sigmoid(c x) of a graph, c > 0 one constant and the Sigmoid read by the gating Mul
    alone, c x by the Sigmoid alone (`uint8_gelu` drops both): (x, the Mul by c, the Sigmoid, the
    Mul that gates, c)."""
    inits, producer, outputs, users = _graph_maps(model.graph)
    gates = []
    for sigmoid in model.graph.node:
        scale = producer.get(sigmoid.input[0]) if sigmoid.op_type == "Sigmoid" else None
        if scale is None or scale.op_type != "Mul" or sum(i in inits for i in scale.input) != 1:
            continue
        x = next(i for i in scale.input if i not in inits)
        c = _scalar(inits, next(i for i in scale.input if i in inits))
        readers = users.get(sigmoid.output[0], [])
        gate = readers[0] if len(readers) == 1 else None
        only_sigmoid = users.get(scale.output[0]) == [sigmoid] and not {scale.output[0], sigmoid.output[0]} & outputs
        if gate is not None and gate.op_type == "Mul" and set(gate.input) == {x, sigmoid.output[0]} \
                and only_sigmoid and c is not None and c > 0:
            gates.append((x, scale, sigmoid, gate, c))
    return gates


def has_sigmoid_gelu(model: Any) -> bool:
    """Whether a float graph computes x * sigmoid(c x) (CLIP's QuickGelu, written out by the
    exporter): the AMX profile's uint8 GELU has something to rewrite (`uint8_gelu`)."""
    return bool(_sigmoid_gates(model))


# The static CPU graphs the export writes (`static_graph`), by the profile asked and the tower.
VNNI_GRAPH, AMX_GRAPH, DEPTHWISE_GRAPH = "vnni", "amx", "float-depthwise"


def static_graph(model: Any, profile: str) -> str:
    """Which static CPU graph the export writes for the float graph `model` under the resolved
    `profile` ("amx" or "vnni", pipeline/export.py's `int8_profile`):
    - AMX_GRAPH under "amx" for a tower with GELUs `uint8_gelu` writes in uint8 (sigmoid ones, CLIP's,
      or ones `fuse_gelu` makes one op of: SigLIP's tanh GELU, open_clip's and timm's exact one) and a
      part left in float: a transformer's attention products (MatMuls of two activations) or a
      ConvNeXt's depthwise convolutions. A tower with both (a hybrid: unmeasured) leaves only its
      attention products in float (`amx_in_float`).
    - DEPTHWISE_GRAPH under "vnni" for a ConvNeXt (depthwise convolutions and GELUs, no attention
      products): its depthwise convolutions in float, its GELUs as the VNNI graph's. On an AMD EPYC
      (AVX-512 VNNI and AVX-VNNI, 2026-12-07) it ran 0.95x the VNNI graph with conversion + Add at
      8.8-10.4% of kernel time (at the bar) against 16.1%, where the AMX graph ran 0.87x (4.9%): its uint8 GELU, three
      QLinearMuls a value for the exact GELU, costs more there than the float one (README, "ConvNeXt
      is over the bar").
    - VNNI_GRAPH otherwise: a ResNet (no GELU) under either profile, a ViT under "vnni".
    Each part of the graph is looked for once."""
    attention, depthwise = bool(_activation_matmuls(model)), bool(_depthwise_convs(model))
    if profile == "amx":
        wanted = attention or depthwise
    elif profile == "vnni":
        wanted = depthwise and not attention
    else:
        raise ValueError(f"unknown int8 profile {profile!r}")
    if not (wanted and (has_sigmoid_gelu(model) or fuse_gelu(model, rewrite=False) > 0)):
        return VNNI_GRAPH
    return AMX_GRAPH if profile == "amx" else DEPTHWISE_GRAPH


def in_float(model: Any, graph: str) -> list[str]:
    """The nodes of a float graph `graph` leaves to the quantizer's `nodes_to_exclude` (named first
    where unnamed): the AMX graph's (`amx_in_float`), the depthwise convolutions of DEPTHWISE_GRAPH,
    none for the VNNI graph."""
    if graph == AMX_GRAPH:
        return amx_in_float(model)
    return depthwise_convolutions(model) if graph == DEPTHWISE_GRAPH else []


def sigmoid_gelus(model: Any) -> list[tuple[Any, ...]]:
    """Each MatMulIntegerToFloat -> x * sigmoid(c x) -> QuantizeLinear chain of a CPU graph (CLIP's
    QuickGelu between an MLP's two int8 MatMuls), as (matmul, the nodes of the GELU, the
    QuantizeLinear, a = c, b = 0): `uint8_gelu`'s x * sigmoid(a x + b x^3)."""
    inits, producer, _, users = _graph_maps(model.graph)
    chains = []
    for x, scale, sigmoid, gate, c in _sigmoid_gates(model):
        mm, after = producer.get(x), users.get(gate.output[0], [])
        if len(users.get(x, [])) == 2 and len(after) == 1 and _gelu_ends(inits, mm, after[0]):
            chains.append((mm, (scale, sigmoid, gate), after[0], c, 0.0))
    return chains


# x * sigmoid(a x + b x^3) for onnxruntime's one-kernel GELUs (`fuse_gelu`): transformers' tanh GELU,
# FastGelu, is that exactly (0.5 (1 + tanh u) = sigmoid(2 u): a = 2 sqrt(2/pi), b = 0.044715 a); the
# exact (erf) GELU, Gelu, is within 2.7e-4 of it with a and b fitted for the least largest error over
# [-8, 8] (a fiftieth of a uint8 step of CLIP-size activations).
CUBIC_GELUS = {"FastGelu": (1.5957691216057308, 0.07135481627260025), "Gelu": (1.60031416, 0.06940179)}


def cubic_gelus(model: Any) -> list[tuple[Any, ...]]:
    """Each MatMulIntegerToFloat -> Gelu or FastGelu (onnxruntime's, no bias input) -> QuantizeLinear
    chain of a CPU graph, as `sigmoid_gelus` gives them, a and b from CUBIC_GELUS."""
    inits, producer, _, users = _graph_maps(model.graph)
    chains = []
    for gelu in model.graph.node:
        if gelu.op_type not in CUBIC_GELUS or gelu.domain != "com.microsoft" or len(gelu.input) != 1:
            continue
        mm, after = producer.get(gelu.input[0]), users.get(gelu.output[0], [])
        if len(users.get(gelu.input[0], [])) == 1 and len(after) == 1 and _gelu_ends(inits, mm, after[0]):
            chains.append((mm, (gelu,), after[0], *CUBIC_GELUS[gelu.op_type]))
    return chains


def _gelu_ends(inits: dict[str, Any], mm: Any, quantize: Any) -> bool:
    """Whether a GELU between `mm` and `quantize` can run on uint8: `mm` a MatMulIntegerToFloat of
    2-D constant weights (QGemm's B is (K, N)) and constant scales, `quantize` a QuantizeLinear with
    its zero point."""
    if mm is None or mm.op_type != "MatMulIntegerToFloat" or quantize.op_type != "QuantizeLinear":
        return False
    two_d = mm.input[1] in inits and len(inits[mm.input[1]].dims) == 2
    return two_d and all(name in inits for name in mm.input[2:4]) and len(quantize.input) == 3


def gelu_chains(model: Any) -> list[tuple[Any, ...]]:
    """Every GELU of a CPU graph `uint8_gelu` can write in uint8 (`sigmoid_gelus`, `cubic_gelus`)."""
    return sigmoid_gelus(model) + cubic_gelus(model)


# The uint8 w = a + b x^2 of a cubic GELU: read at scale a / W_ZERO and zero point 0, so that its
# QLinearMul writes it at zero point W_ZERO; saturating at 1.5 a (x^2 = a / 2b), where
# x w = sqrt(a / 2b) 1.5 a is already as far as Z_RANGE (8.0 for both GELUs).
W_ZERO = 170
# z = a x + b x^3 in uint8 over [-Z_RANGE, Z_RANGE]: sigmoid(8) is 1 - 3.4e-4.
Z_RANGE = 8.0


def uint8_gelu(model: Any, chains: list[tuple[Any, ...]], ranges: list[tuple[float, float]]) -> int:
    """Rewrite, in place, each chain `gelu_chains` found on this model (`chains`) so that the GELU,
    x * sigmoid(a x + b x^3), runs on uint8 values: the MatMul as QGemm with a uint8 output (range
    `ranges[i]`, calibrated on its float output as the export calibrates; the bias as int32 at the
    input scale times each column's, carried by constant input columns, `bias_columns`); for a
    sigmoid GELU (b = 0) QLinearSigmoid (a taken into its input scale; a table of 256 values), for a
    tanh or exact one two QLinearMuls (a x + b x^3 as x (a + b x^2)) before it; then QLinearMul into
    the QuantizeLinear's scale, which the next MatMul reads as before. No float GELU and no
    QuantizeLinear on its output are left. QGemm is 2-D: rows of every picture's tokens, then the
    input's shape again. Returns the number of chains rewritten."""
    import numpy as np

    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def constant(name: str, value: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def sigmoid_of_cubic(p: str, y_step: float, y_scale: str, y_zero: str, a_x: float, b_x3: float,
                         s_scale: str, s_zero: str) -> list[Any]:
        """The nodes writing p_s = sigmoid(a x + b x^3) of x = p_y in uint8 at (s_scale, s_zero).
        b = 0: one QLinearSigmoid, a taken into x's scale. Else z = x w, w = a + b x^2 written by
        QLinearMul(x, x) at scale (a / W_ZERO) / b and zero point W_ZERO and read at a / W_ZERO and
        zero point 0 (the difference of zero points adds a), then QLinearSigmoid of z."""
        if not b_x3:
            return [helper.make_node("QLinearSigmoid", [p + "_y", constant(p + "_c_scale", np.float32(y_step * a_x)),
                                                        y_zero, s_scale, s_zero], [p + "_s"], domain="com.microsoft",
                                     name=p + "_sigmoid")]
        w_step, z_step = a_x / W_ZERO, Z_RANGE / 127
        w_scale, zero = constant(p + "_cubic_w_scale", np.float32(w_step)), constant(p + "_cubic_w_zero", np.uint8(0))
        z_scale = constant(p + "_cubic_z_scale", np.float32(z_step))
        z_zero = constant(p + "_cubic_z_zero", np.uint8(128))
        return [
            helper.make_node("QLinearMul", [p + "_y", y_scale, y_zero, p + "_y", y_scale, y_zero,
                                            constant(p + "_cubic_w_written_scale", np.float32(w_step / b_x3)),
                                            constant(p + "_cubic_w_written_zero", np.uint8(W_ZERO))], [p + "_cubic_w"],
                             domain="com.microsoft", name=p + "_cubic_w"),
            helper.make_node("QLinearMul", [p + "_y", y_scale, y_zero, p + "_cubic_w", w_scale, zero, z_scale, z_zero],
                             [p + "_cubic_z"], domain="com.microsoft", name=p + "_cubic_z"),
            helper.make_node("QLinearSigmoid", [p + "_cubic_z", z_scale, z_zero, s_scale, s_zero], [p + "_s"],
                             domain="com.microsoft", name=p + "_sigmoid"),
        ]

    replace, drop = {}, set()
    for i, ((mm, gelu, quantize, a_x, b_x3), (low, high)) in enumerate(zip(chains, ranges, strict=True)):
        a, w, a_scale, w_scale = mm.input[:4]
        p = f"uint8_gelu_{i}_{mm.name or mm.output[0]}"  # the names it adds: new in the graph
        a_zero = mm.input[4] if len(mm.input) > 4 and mm.input[4] else constant(p + "_a_zero", np.uint8(0))
        w_scales = numpy_helper.to_array(inits[w_scale]).astype(np.float32)
        w_zero = mm.input[5] if len(mm.input) > 5 and mm.input[5] else constant(
            p + "_w_zero", np.zeros(w_scales.shape, np.int8))
        bias = mm.input[6] if len(mm.input) > 6 else ""
        k_in, n_out = inits[w].dims
        a_rows, columns = p + "_a2", None
        if bias:
            step = float(numpy_helper.to_array(inits[a_scale]).reshape(-1)[0]) * w_scales.astype(np.float64)
            steps = np.round(numpy_helper.to_array(inits[bias]).astype(np.float64) / step)
            steps = np.clip(steps, -(2**31), 2**31 - 1).astype(np.int64)  # clipped as onnxruntime's quantizer does
            zero = _zero_point(inits, mm.input[4] if len(mm.input) > 4 else "")
            symmetric = _zero_point(inits, mm.input[5] if len(mm.input) > 5 else "", every=True) == 0
            if steps.any() and zero is not None and symmetric:
                columns = bias_columns(steps, zero)
            if not steps.any():  # nothing to add
                bias = ""
            elif columns is None:  # QGemm adds it itself, a pass more over its int32 output
                bias = constant(p + "_bias_int32", steps.astype(np.int32))
            else:
                values, rows = columns
                w = constant(p + "_w", np.concatenate([numpy_helper.to_array(inits[w]), rows]))
                a_rows, bias = p + "_a3", ""
        low, high = min(low, 0.0), max(high, 0.0)  # as onnxruntime's MinMax: the range holds 0
        y_step = (high - low) / 255.0 or 1.0
        y_scale = constant(p + "_y_scale", np.float32(y_step))
        y_zero = constant(p + "_y_zero", np.uint8(round(-low / y_step)))
        s_scale, s_zero = constant(p + "_s_scale", np.float32(1 / 255)), constant(p + "_s_zero", np.uint8(0))
        replace[id(mm)] = [
            helper.make_node("Shape", [a], [p + "_shape"], name=p + "_shape"),
            helper.make_node("Slice", [p + "_shape", constant(p + "_from", np.array([0])),
                                       constant(p + "_to", np.array([-1]))], [p + "_lead"], name=p + "_lead"),
            helper.make_node("Concat", [p + "_lead", constant(p + "_n", np.array([n_out]))], [p + "_out_shape"],
                             axis=0, name=p + "_out_shape"),
            helper.make_node("Reshape", [a, constant(p + "_rows", np.array([-1, k_in]))], [p + "_a2"], name=p + "_a2"),
            *([] if columns is None else [  # every row gets the bias's constant columns
                helper.make_node("Shape", [p + "_a2"], [p + "_a2_shape"], name=p + "_a2_shape"),
                helper.make_node("Slice", [p + "_a2_shape", constant(p + "_first", np.array([0])),
                                           constant(p + "_second", np.array([1]))], [p + "_m"], name=p + "_m"),
                helper.make_node("Concat", [p + "_m", constant(p + "_ncols", np.array([len(columns[0])]))],
                                 [p + "_cols_shape"], axis=0, name=p + "_cols_shape"),
                helper.make_node("Expand", [constant(p + "_col_values", columns[0][None, :]), p + "_cols_shape"],
                                 [p + "_cols"], name=p + "_cols"),
                helper.make_node("Concat", [p + "_a2", p + "_cols"], [p + "_a3"], axis=1, name=p + "_a3"),
            ]),
            helper.make_node("QGemm", [a_rows, a_scale, a_zero, w, w_scale, w_zero, bias, y_scale, y_zero],
                             [p + "_y2"], domain="com.microsoft", name=p + "_qgemm"),
            helper.make_node("Reshape", [p + "_y2", p + "_out_shape"], [p + "_y"], name=p + "_y"),
            *sigmoid_of_cubic(p, y_step, y_scale, y_zero, a_x, b_x3, s_scale, s_zero),
            helper.make_node("QLinearMul", [p + "_y", y_scale, y_zero, p + "_s", s_scale, s_zero,
                                            quantize.input[1], quantize.input[2]], [quantize.output[0]],
                             domain="com.microsoft", name=p + "_gelu"),
        ]
        drop.update({id(n) for n in gelu} | {id(quantize)})
    _set_nodes(model, [m for n in graph.node if id(n) not in drop for m in replace.get(id(n), [n])])
    return len(chains)


# At most this many constant input columns carry a QGemm's bias (`bias_columns`): 2% more K for
# CLIP's 768, and biases of up to 63 + 128 * 63 * 15 = 121,023 steps of the input scale times the
# column's either way; a larger one stays QGemm's own bias input.
MAX_BIAS_COLUMNS = 16


def bias_columns(steps: Any, a_zero: int) -> tuple[Any, Any] | None:
    """A QGemm's int32 bias as constant input columns: (uint8 values (C,), int8 rows (C, N)) such
    that (values - a_zero) @ rows equals `steps` (int, (N,)) exactly; or None where it would take
    more than MAX_BIAS_COLUMNS columns.

    onnxruntime's QGemm with a bias input first copies the bias into its int32 output and then
    accumulates onto it: a pass more over the output, 1.6 ms of a 4.8 ms (1600 x 768 x 3072) GEMM on
    an AMX Xeon, where the same GEMM without a bias takes 3.1 ms and with its input 4 columns wider
    3.5 ms. One column one level off the input's zero point carries the bias modulo 128 (weights
    -64..63), the others 128 levels off carry the rest, 63 at a time: weights within the 7 bits that
    keep AVX2's pair sums from saturating (pipeline/export.py), as the products' own."""
    import numpy as np

    steps = np.asarray(steps, np.int64)
    fine_d = 1 if a_zero < 255 else -1  # a value one level from the zero point
    coarse_d = 128 if a_zero <= 127 else -128  # and one 128 levels from it, on the side that has room
    low = -64 if fine_d == 1 else -63  # so that fine_d * fine stays within -64..63
    fine = (steps - low) % 128 + low
    rest = (steps - fine) // 128
    n_coarse = int(-(-np.abs(rest).max() // 63)) if rest.size else 0
    if 1 + n_coarse > MAX_BIAS_COLUMNS:
        return None
    rows = np.zeros((1 + n_coarse, steps.size), np.int64)
    rows[0] = fine * fine_d
    for j in range(n_coarse):
        part = np.clip(rest, -63, 63)
        rows[1 + j], rest = part * (coarse_d // 128), rest - part
    values = np.array([a_zero + fine_d] + [a_zero + coarse_d] * n_coarse, np.int64)
    assert np.array_equal((values - a_zero) @ rows, steps), "bias columns must add up to the bias"
    return values.astype(np.uint8), rows.astype(np.int8)


def _zero_point(inits: dict[str, Any], name: str, every: bool = False) -> int | None:
    """A MatMul's zero point input `name` as an int (0 where it has none; with every, 0 only where
    all of a per-column one are); None where it is not an initializer, or differs along columns."""
    import numpy as np

    from onnx import TensorProto, numpy_helper

    if not name:
        return 0
    if name not in inits:
        return None
    values = numpy_helper.to_array(inits[name]).reshape(-1).astype(np.int64)
    if values.size == 0 or (every and np.any(values != values[0])) or (not every and values.size != 1):
        return None
    if not every and inits[name].data_type != TensorProto.UINT8:  # the columns are uint8 activations
        return None
    return int(values[0])


def _has_subgraphs(graph: Any) -> bool:
    """Whether a node of `graph` holds a subgraph (If, Loop, Scan), whose reads of the graph's values
    the float-graph rewrites do not follow: they leave such a graph as it is."""
    from onnx import AttributeProto

    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)


def _graph_maps(graph: Any) -> tuple[dict[str, Any], dict[str, Any], set[str], dict[str, list[Any]]]:
    """(initializers by name, the node making each value, the graph's output names, the nodes
    reading each value)."""
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return inits, producer, {o.name for o in graph.output}, consumers


def _without_unread_dequantize(nodes: list[Any], graph_outputs: set[str]) -> list[Any]:
    """`nodes` less every DequantizeLinear whose output nothing reads any more."""
    read = {name for n in nodes for name in n.input} | graph_outputs
    return [n for n in nodes if not (n.op_type == "DequantizeLinear" and not any(o in read for o in n.output))]


def _set_nodes(model: Any, nodes: list[Any]) -> None:
    """The graph's nodes replaced by `nodes` (in order), with onnxruntime's contrib domain imported.
    Initializers only the dropped nodes read go too (onnxruntime warns of each one left unread)."""
    from onnx import helper

    before = {name for n in model.graph.node for name in n.input}
    after = {name for n in nodes for name in n.input} | {v.name for v in (*model.graph.output, *model.graph.input)}
    unread = before - after
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if unread:
        kept = [i for i in model.graph.initializer if i.name not in unread]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
