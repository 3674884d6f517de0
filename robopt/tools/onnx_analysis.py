"""Static profile of an ONNX graph: parameters from initializers, op census, MatMul/Gemm/Conv FLOPs, output shapes.

FLOPs use ONNX shape inference and count what torch's FlopCounterMode counts: 2 * outputs * reduction
size for MatMul, Gemm and Conv/ConvTranspose (and their quantized forms MatMulInteger, QLinearMatMul,
ConvInteger, QLinearConv, MatMulNBits). Elementwise ops and bias adds are not counted. A graph whose
shapes are dynamic needs `input_spec` to fix them, else FLOPs are left unmeasured with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from robopt.domain.records import InputSpec
from robopt.errors import CorruptModelError, ModelNotFoundError
from robopt.tools.analysis import StaticProfile
from robopt.tools.family import detect_family_onnx

# input index of the activation (A/X) and of the weight (B/W) for each counted op
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "FusedMatMul": (0, 1)}
_CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1)}
_COUNTED = {*_MATMUL_OPS, *_CONV_OPS, "Gemm", "MatMulNBits"}
_UNCOUNTED_HEAVY = {"Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN"}
_PASS_THROUGH = {"DequantizeLinear", "Cast", "Transpose", "Identity", "Reshape"}
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}

Shape = list[int | None]


def _load(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise ModelNotFoundError(f"ONNX file {path} does not exist", "check the path (an .onnx file)")
    try:
        # Weights are not needed (dims are in the protos), so external data stays on disk.
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises its own DecodeError family for damaged files
        raise CorruptModelError(
            f"{path} is not a readable ONNX model: {type(err).__name__}: {err}",
            "re-export the model (torch.onnx.export) or check that the file was copied completely",
        ) from err


def _element_bytes(data_type: int, numel: int) -> int:
    import onnx

    name = onnx.TensorProto.DataType.Name(data_type)
    if name in _SUB_BYTE_BITS:
        return math.ceil(numel * _SUB_BYTE_BITS[name] / 8)
    if name == "STRING":
        return 0
    return numel * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _walk_nodes(graph: Any) -> Iterator[Any]:
    """Every node, those inside If/Loop/Scan subgraphs included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _walk_nodes(attr.g)
            for sub in attr.graphs:
                yield from _walk_nodes(sub)


def _dims(type_proto: Any) -> Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim]


def _fix_inputs(model: Any, input_spec: InputSpec) -> str | None:
    """Write the spec's static shapes into the graph inputs (by position), so inference can resolve dims.

    Returns why it could not (the spec does not match the graph's inputs), else None.
    """
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(graph_inputs) != len(input_spec.inputs):
        return (
            f"the input spec has {len(input_spec.inputs)} inputs but the graph takes {len(graph_inputs)} "
            f"({', '.join(i.name for i in graph_inputs)}): give one shape per graph input"
        )
    for value, spec in zip(graph_inputs, input_spec.inputs, strict=True):
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for size in spec.shape:
            shape.dim.add().dim_value = size
    return None


def _infer_shapes(model: Any) -> tuple[dict[str, Shape], str | None]:
    import onnx

    shapes: dict[str, Shape] = {t.name: list(t.dims) for t in model.graph.initializer}
    note = None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        inferred, note = model, f"ONNX shape inference failed: {err}"
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
    return shapes, note


def _node_flops(node: Any, shapes: dict[str, Shape]) -> int | None:
    """FLOPs of one counted node, or None when a needed shape is unknown or dynamic. 0 for uncounted ops."""

    def static(name: str) -> list[int] | None:
        dims = shapes.get(name)
        return None if dims is None or any(d is None for d in dims) else dims  # type: ignore[return-value]

    op = node.op_type
    if op not in _COUNTED:
        return 0
    out = static(node.output[0])
    if out is None:
        return None
    if op == "MatMulNBits":
        k = next((a.i for a in node.attribute if a.name == "K"), None)
        return None if k is None else 2 * math.prod(out) * k
    if op == "Gemm":
        a = static(node.input[0])
        if a is None:
            return None
        trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
        return 2 * math.prod(out) * (a[0] if trans_a else a[1])
    if op in _MATMUL_OPS:
        a = static(node.input[_MATMUL_OPS[op][0]])
        return None if a is None else 2 * math.prod(out) * a[-1]
    x_index, w_index = _CONV_OPS[op]
    w = static(node.input[w_index])
    if w is None:
        return None
    if op == "ConvTranspose":  # weight [C_in, C_out/groups, *k]: each input element feeds C_out/groups*k outputs
        x = static(node.input[x_index])
        return None if x is None else 2 * math.prod(x) * math.prod(w[1:])
    return 2 * math.prod(out) * math.prod(w[1:])


def _consumer_kind(name: str, consumers: dict[str, list[Any]]) -> str:
    """The op type a weight finally feeds, looking through dequantize/cast/transpose/reshape nodes."""
    for _ in range(4):
        nodes = consumers.get(name, [])
        if not nodes:
            return "unused"
        node = nodes[0]
        if node.op_type not in _PASS_THROUGH or not node.output:
            return node.op_type
        name = node.output[0]
    return nodes[0].op_type


def profile_onnx(path: Path, *, input_spec: InputSpec | None = None) -> StaticProfile:
    """Static profile of an ONNX file. `input_spec` fixes dynamic input dims (batch, sequence) for FLOPs."""
    path = Path(path)
    model = _load(path)
    graph = model.graph
    spec_problem = _fix_inputs(model, input_spec) if input_spec is not None else None

    consumers: dict[str, list[Any]] = {}
    nodes = list(_walk_nodes(graph))
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    param_count = 0
    nbytes = 0
    params_by_kind: Counter[str] = Counter()
    for tensor in graph.initializer:
        numel = math.prod(tensor.dims)
        param_count += numel
        nbytes += _element_bytes(tensor.data_type, numel)
        params_by_kind[_consumer_kind(tensor.name, consumers)] += numel
    for sparse in graph.sparse_initializer:
        numel = math.prod(sparse.values.dims)
        param_count += numel
        nbytes += _element_bytes(sparse.values.data_type, numel)
        params_by_kind[_consumer_kind(sparse.values.name, consumers)] += numel

    census = Counter(node.op_type for node in nodes)
    unmeasured: dict[str, str] = {}
    shapes, inference_note = _infer_shapes(model)

    flops: int | None = 0
    for node in graph.node:
        node_flops = _node_flops(node, shapes)
        if node_flops is None:
            reason = f"shape of {node.op_type} node {node.name or node.output[0]!r} is dynamic or unknown"
            hint = "; pass --input-shape to fix dynamic dims" if input_spec is None else ""
            unmeasured["flops"] = unmeasured["macs"] = spec_problem or inference_note or reason + hint
            flops = None
            break
        flops += node_flops  # type: ignore[operator]
    heavy = sorted(op for op in census if op in _UNCOUNTED_HEAVY)
    top_level = Counter(node.op_type for node in graph.node)
    in_subgraphs = sorted(op for op in census if op in _COUNTED and census[op] > top_level[op])
    gaps = [f"no FLOP formula for {', '.join(heavy)}"] if heavy else []
    gaps += [f"{', '.join(in_subgraphs)} inside If/Loop/Scan subgraphs not counted"] if in_subgraphs else []
    if flops is not None and gaps:
        unmeasured["flops_coverage"] = "; ".join(gaps) + "; flops counts the other ops only"

    output_shapes: list[list[int]] = []
    for value in graph.output:
        dims = shapes.get(value.name)
        if dims is None or any(d is None for d in dims):
            unmeasured["output_shapes"] = f"output {value.name!r} has a dynamic or unknown shape"
            output_shapes = []
            break
        output_shapes.append([int(d) for d in dims])  # type: ignore[arg-type]

    family, evidence = detect_family_onnx(census, [t.name for t in graph.initializer])
    return StaticProfile(
        param_count=param_count,
        trainable_param_count=None,
        size_in_memory_bytes=nbytes,
        flops=flops,
        macs=flops // 2 if flops is not None else None,
        layer_census=dict(census),
        params_by_layer_type=dict(params_by_kind),
        architecture=family,
        architecture_evidence=evidence,
        output_shapes=output_shapes,
        unmeasured=unmeasured,
    )
