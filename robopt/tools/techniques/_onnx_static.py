"""Steps shared by the static INT8 techniques (onnx_static_int8, smoothquant_int8): the float ONNX graph (given, or
exported from the eager model), ONNX Runtime's quantization pre-processing, calibration feeds built from the
run's calibration set, and what the quantized graph holds and which ONNX Runtime kernels run it."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from robopt.calibration import CalibrationSet
from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.registry import Applicability, ApplyContext, Estimate
from robopt.tools.techniques import _layers

EXECUTION_PROVIDER = "CPUExecutionProvider"
TRANSFORMER_FAMILIES = frozenset({"transformer-encoder", "decoder-llm", "vision-language-action"})
# Layers whose weights become int8: torch leaf classes and ONNX op types (as the analysis names them).
WEIGHT_LAYERS = (*_layers.LINEAR_TYPES, *_layers.CONV_TYPES, "Conv", "ConvTranspose", "MatMul", "Gemm")
EMBEDDING_LAYERS = ("Embedding", "Gather")
DYNAMIC_INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOAT_COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul"})
_LARGE_MODEL_BYTES = 1_800_000_000
_ARITY_HINT = "give calibration samples with one tensor per model input, in the model's input order (its InputSpec)"
_CALIBRATION_HINT = (
    "give the run calibration data: the zoo's models bring their own, other models need a folder or file of real "
    "inputs (see robopt.calibration); in code, ApplyContext(calibration=lambda n: CalibrationSet(samples, source))"
)


@functools.cache
def ort_version() -> str:
    return onnxruntime.__version__


def is_transformer(analysis: AnalysisReport) -> bool:
    return analysis.architecture in TRANSFORMER_FAMILIES


def quantizable_params(analysis: AnalysisReport) -> int:
    """Weights a static INT8 pass stores as int8: conv/linear layers, and embedding tables of transformers."""
    layers = WEIGHT_LAYERS + (EMBEDDING_LAYERS if is_transformer(analysis) else ())
    return _layers.params_of(analysis, layers)


def static_applicability(analysis: AnalysisReport) -> Applicability:
    """An eager float model or an ONNX graph, not quantized yet, with conv/linear weights."""
    if analysis.format != "onnx" and (reason := _layers.not_eager_reason(analysis)):
        return Applicability(False, reason.replace("an eager PyTorch nn.Module", "an eager PyTorch module or ONNX"))
    if reason := _layers.already_quantized_reason(analysis):
        return Applicability(False, reason)
    if quantizable_params(analysis) <= 0:
        return Applicability(False, "the model has no convolution, Linear/MatMul/Gemm or embedding weights")
    return Applicability(True)


def int8_estimate(analysis: AnalysisReport, speedup: float, risk: str, note: str) -> Estimate:
    quantized = quantizable_params(analysis)
    share = _layers.share_of_params(analysis, quantized)
    return Estimate(
        size_ratio=_layers.size_ratio_after(analysis, quantized, _layers.INT8_BYTES_PER_PARAM),
        speedup=_layers.amdahl_speedup(share, speedup),
        accuracy_risk=risk,  # type: ignore[arg-type]
        note=f"{share:.0%} of weights become int8 (~1 byte each). {note}",
    )


def require_workdir(context: ApplyContext, technique: str) -> Path:
    if context.workdir is None:
        raise TechniqueNotApplicableError(f"{technique} writes a new ONNX file and needs a work directory")
    return context.workdir


def require_calibration(context: ApplyContext, technique: str, samples: int) -> CalibrationSet:
    """The run's calibration set; TechniqueNotApplicableError when the run has none or it is empty."""
    if context.calibration is None:
        raise TechniqueNotApplicableError(
            f"{technique} needs calibration data (real inputs to measure activation ranges) and this run has none",
            _CALIBRATION_HINT,
        )
    calibration = context.calibration(samples)
    if len(calibration) == 0:
        raise TechniqueNotApplicableError(f"the calibration source {calibration.source!r} gave no samples")
    spec = context.analysis.input_spec
    if spec is not None and (wrong := [s for s in calibration.samples if len(s) != len(spec.inputs)]):
        raise TechniqueNotApplicableError(
            f"calibration samples from {calibration.source!r} hold {len(wrong[0])} tensors but the model takes "
            f"{len(spec.inputs)} inputs ({', '.join(t.name for t in spec.inputs)})",
            _ARITY_HINT,
        )
    return calibration


@dataclass(frozen=True)
class FloatGraph:
    """The float ONNX graph a static technique starts from, and how it was obtained."""

    path: Path
    details: dict[str, Any] = field(default_factory=dict)


def float_graph(model: nn.Module, context: ApplyContext, technique: str, calibration: CalibrationSet) -> FloatGraph:
    """The given ONNX model as is, or the eager model exported to ONNX in the work directory."""
    from robopt.tools.example_inputs import make_example_inputs
    from robopt.tools.onnx_export import export_onnx
    from robopt.tools.onnx_module import OnnxModule

    if isinstance(model, OnnxModule):
        return FloatGraph(Path(model.path), {"source_graph": "the input ONNX model"})
    _layers.require_eager_float_module(model, technique)
    spec = context.analysis.input_spec
    example = context.example_inputs
    if example is None:
        example = make_example_inputs(spec, context.seed) if spec is not None else calibration.samples[0]
    names = [t.name for t in spec.inputs] if spec is not None else None
    context.progress.message(technique, "exporting the model to ONNX")
    export = export_onnx(model, example, require_workdir(context, technique) / "model.fp32.onnx", input_names=names)
    return FloatGraph(
        export.path,
        {
            "source_graph": "exported from the eager model",
            "exporter": export.exporter,
            "opset": export.opset,
            "dynamic_axes": export.dynamic_axes,
        },
    )


def preprocess(source: Path, output: Path) -> dict[str, Any]:
    """ONNX Runtime's quant_pre_process: symbolic shape inference, graph optimization, ONNX shape inference.

    Symbolic shape inference merges conflicting symbolic dims (auto_merge), which torch.export graphs of
    transformers need; where it still fails, the step is skipped and the reason recorded.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    large = source.stat().st_size > _LARGE_MODEL_BYTES
    steps = ["symbolic shape inference (auto_merge)", "onnxruntime graph optimization", "onnx shape inference"]
    try:
        quant_pre_process(str(source), str(output), auto_merge=True, save_as_external_data=large)
        return {"preprocessing": steps}
    except Exception as first:  # symbolic shape inference raises a bare Exception when it cannot finish
        try:
            quant_pre_process(str(source), str(output), skip_symbolic_shape=True, save_as_external_data=large)
        except Exception as second:
            raise TechniqueFailedError(
                f"onnxruntime quant_pre_process failed: {type(second).__name__}: {second} (with symbolic shape "
                f"inference: {first})",
                "check that the ONNX model runs in onnxruntime; re-export it with static shapes if it does not",
            ) from second
        return {"preprocessing": steps[1:], "preprocessing_skipped": f"symbolic shape inference: {first}"}


def graph_inputs(path: Path) -> list[tuple[str, np.dtype]]:
    """(name, numpy dtype) of the inputs a caller must feed (initializer-backed inputs excluded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [
        (i.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
        for i in model.graph.input
        if i.name not in initializers
    ]


def calibration_feeds(path: Path, calibration: CalibrationSet) -> list[dict[str, np.ndarray]]:
    """One feed dict per calibration sample: positional tensors (InputSpec order) to the graph's input names."""
    inputs = graph_inputs(path)
    feeds = []
    for sample in calibration.samples:
        if len(sample) != len(inputs):
            raise TechniqueNotApplicableError(
                f"calibration samples from {calibration.source!r} hold {len(sample)} tensors but the ONNX graph takes "
                f"{len(inputs)} inputs ({', '.join(n for n, _ in inputs)})",
                _ARITY_HINT,
            )
        feeds.append(
            {
                name: np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))
                for (name, dtype), t in zip(inputs, sample, strict=True)
            }
        )
    return feeds


class CalibrationFeeds(CalibrationDataReader):
    """ONNX Runtime's calibration reader over fixed feeds. `set_range` lets quantize_static collect statistics one
    sample at a time (its CalibStridedMinMax option): memory stays bounded, and histogram calibrators accept
    samples of different shapes (sentences of different lengths). Reports progress and honours cancellation."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], progress: Progress, stage: str) -> None:
        self.feeds = feeds
        self.progress = progress
        self.stage = stage
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self.feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self.progress.update(self.stage, self._next + 1, len(self.feeds))
        feed = self.feeds[self._next]
        self._next += 1
        return feed


def quantized_ops(path: Path) -> dict[str, int]:
    """Op type -> count of the nodes whose weights are stored quantized: they read an initializer through a
    DequantizeLinear node (int8 conv/linear weights, int8 embedding tables)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    weights = {
        out for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers for out in n.output
    }
    counts = Counter(n.op_type for n in graph.node if n.op_type not in _QDQ_OPS and any(i in weights for i in n.input))
    return dict(sorted(counts.items()))


def graph_op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def runtime_kernels(path: Path, scratch: Path) -> dict[str, Any]:
    """The execution provider and the compute kernels ONNX Runtime runs after its own graph fusions (QDQ groups
    become QLinearConv, QGemm, QLinearMatMul... when the CPU provider has an integer kernel for them)."""
    import onnx

    optimized = scratch / f"{path.stem}.ort-optimized.onnx"
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # the optimized file is machine-specific: expected, no warning needed
    session = onnxruntime.InferenceSession(str(path), options, providers=[EXECUTION_PROVIDER])
    integer: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    try:
        for node in onnx.load(str(optimized), load_external_data=False).graph.node:
            name = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
            if _is_integer_kernel(node.op_type):
                integer[name] += 1
            elif node.op_type in _FLOAT_COMPUTE_OPS:
                floating[name] += 1
    finally:
        optimized.unlink(missing_ok=True)
        for side in scratch.glob(f"{optimized.name}*"):
            side.unlink(missing_ok=True)
    return {
        "execution_provider": session.get_providers()[0],
        "integer_kernels": dict(sorted(integer.items())),
        "float_kernels": dict(sorted(floating.items())),
    }


def _is_integer_kernel(op_type: str) -> bool:
    """QLinearConv/QLinearMatMul/QGemm..., and the integer products of dynamic graphs (MatMulIntegerToFloat)."""
    return (
        op_type.startswith("QLinear")
        or op_type in ("QGemm", "QAttention", "QOrderedMatMul")
        or "Integer" in op_type
        or op_type in DYNAMIC_INTEGER_OPS
    )
