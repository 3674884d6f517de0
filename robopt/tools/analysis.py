"""Static profile of a torch module: parameters, memory, FLOPs, layer census, architecture family, output shapes.

Counting rules:
- A *layer* is a leaf module (packed-parameter holders such as LinearPackedParams do not count as
  children) or any module that directly owns parameters (MultiheadAttention's in_proj_weight). Each
  parameter is attributed to the module that owns it, once (shared/tied weights count once), so
  `params_by_layer_type` sums to `param_count`.
- Census keys are `Module._get_name()` (DynamicQuantizedLinear, QuantizedConv2d, Linear4bit...) and
  TorchScript's `original_name`; a TorchScript layer holding packed quantized weights is `Quantized<name>`.
- torch.ao quantized layers keep their weights in packed ScriptObjects: they are unpacked
  (`quantized.linear_unpack`, `conv2d_unpack`, ...) and counted as weight numel + bias numel.
- torchao tensor-subclass weights report their logical numel; their memory is the sum of the inner
  tensors (`__tensor_flatten__`), e.g. int8 data + scales.
- bitsandbytes 4-bit weights (Params4bit) are stored packed as uint8 [n/2, 1]: the parameter count is
  the logical `quant_state.shape` (in_features * out_features), the memory is the packed bytes plus
  the quantization state (absmax, nested absmax and code tables).
- HQQ layers (hqq's HQQLinear, robopt's CpuHQQLinear) keep bit-packed weights in the parameter `W_q`, and their
  scales and zero points (in the `meta` dict) and bias as plain attributes: the parameter count is the logical
  `meta["shape"]` plus the bias, the memory is the packed weights, the meta tensors and the bias.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from robopt.domain.analysis import ArchitectureFamily
from robopt.tools.family import classify_family, hf_config_of, is_conv_kind, is_linear_kind

NO_INPUT_REASON = "no input shape: pass --input-shape"
_PACKED_ATTRS = ("_packed_params", "_packed_weight")


@dataclass
class StaticProfile:
    """Everything an AnalysisReport needs that does not need timing."""

    param_count: int
    trainable_param_count: int | None
    size_in_memory_bytes: int
    flops: int | None
    macs: int | None
    layer_census: dict[str, int]
    params_by_layer_type: dict[str, int]
    architecture: ArchitectureFamily
    architecture_evidence: str
    output_shapes: list[list[int]]
    unmeasured: dict[str, str] = field(default_factory=dict)


@dataclass
class LayerInfo:
    """One module's own share of the model: parameters and bytes it owns directly."""

    name: str
    kind: str
    in_census: bool
    params: int = 0
    trainable: int = 0
    nbytes: int = 0


# ---- module walk -----------------------------------------------------------------------------


def module_kind(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        kind = getattr(module, "original_name", type(module).__name__)
        if _packed_objects(module) or any(_is_packed_holder(c) for c in module.children()):
            return kind if "Quantized" in kind or kind.endswith("PackedParams") else f"Quantized{kind}"
        return kind
    return module._get_name()


def _is_packed_holder(module: nn.Module) -> bool:
    return module_kind(module).endswith("PackedParams")


def module_tree(module: nn.Module) -> list[tuple[str, str]]:
    """(qualified name, kind) of every module in the tree, the root included as ''."""
    return [(name, module_kind(m)) for name, m in module.named_modules()]


def _packed_objects(module: nn.Module) -> list[torch.ScriptObject]:
    found = []
    for attr in _PACKED_ATTRS:
        obj = getattr(module, attr, None)
        if isinstance(obj, torch.ScriptObject):
            found.append(obj)
    return found


def _unpack(obj: torch.ScriptObject) -> list[torch.Tensor]:
    """Weight and bias tensors inside a torch.ao packed-params object."""
    qualified = obj._type().qualified_name()
    ops = torch.ops.quantized
    if "LinearPackedParams" in qualified:
        try:
            unpacked: Any = ops.linear_unpack(obj)
        except RuntimeError:  # fp16 packed weights have their own unpack op
            unpacked = ops.linear_unpack_fp16(obj)
    elif "Conv3dPackedParams" in qualified:
        unpacked = ops.conv3d_unpack(obj)
    elif "Conv2dPackedParams" in qualified or "Conv1dPackedParams" in qualified:
        unpacked = ops.conv2d_unpack(obj)
    elif "EmbeddingPackedParams" in qualified:
        unpacked = ops.embedding_bag_unpack(obj)
    else:
        raise TypeError(f"no unpack rule for packed params of type {qualified}")
    items = unpacked if isinstance(unpacked, (tuple, list)) else (unpacked,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def logical_numel(tensor: torch.Tensor) -> int:
    """Number of parameters a tensor stands for (bitsandbytes 4-bit packs two weights per byte)."""
    quant_state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and quant_state is not None:
        return math.prod(quant_state.shape)
    return tensor.numel()


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory, quantization metadata included."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if callable(flatten) and type(tensor) not in (torch.Tensor, nn.Parameter):
        inner_names, _ = flatten()
        inner = [getattr(tensor, name) for name in inner_names]
        return sum(tensor_nbytes(t) for t in inner if isinstance(t, torch.Tensor))
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.is_quantized and tensor.qscheme() in (
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    ):
        scales, zeros = tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()
        nbytes += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit
    if quant_state is not None:
        nbytes += _quant_state_nbytes(quant_state)
    scb = getattr(tensor, "SCB", None)  # bitsandbytes int8 row scales
    if isinstance(scb, torch.Tensor):
        nbytes += scb.numel() * scb.element_size()
    return nbytes


def _quant_state_nbytes(state: Any) -> int:
    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(state, attr, None)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    return total + (_quant_state_nbytes(nested) if nested is not None else 0)


def _hqq_layer(module: nn.Module) -> bool:
    """True for a quantized hqq HQQLinear (robopt's CpuHQQLinear included). hqq is only checked once imported:
    no such layer can exist (nor be unpickled) without it."""
    if "hqq.core.quantize" not in sys.modules:
        return False
    from hqq.core.quantize import HQQLinear

    meta = getattr(module, "meta", None)
    return isinstance(module, HQQLinear) and isinstance(meta, dict) and "shape" in meta


def _count_hqq(layer: nn.Module, info: LayerInfo, seen: set[int]) -> None:
    """Add an HQQ layer's logical parameters (meta shape + bias) and stored bytes (packed weights, meta, bias)."""
    bias = getattr(layer, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    info.params += math.prod(layer.meta["shape"]) + (bias.numel() if bias is not None else 0)
    info.trainable += bias.numel() if bias is not None and bias.requires_grad else 0
    tensors = [layer.W_q, bias, *layer.meta.values()]  # meta: scales, zero points (and plain settings)
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            info.nbytes += tensor_nbytes(t)
    for b in layer.buffers(recurse=False):
        if id(b) not in seen:
            seen.add(id(b))
            info.nbytes += tensor_nbytes(b)


def walk_layers(module: nn.Module) -> tuple[list[LayerInfo], dict[str, str]]:
    """Every module with its directly owned parameters/buffers (see the module docstring); plus problems met."""
    problems: dict[str, str] = {}
    seen: set[int] = set()
    infos: dict[str, LayerInfo] = {}
    for name, sub in module.named_modules():
        kind = module_kind(sub)
        owner = name
        if kind.endswith("PackedParams"):  # its weights belong to the layer that holds it
            owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner not in infos:
            owner = name
            children = [c for c in sub.children() if not _is_packed_holder(c)]
            owns = any(True for _ in sub.named_parameters(recurse=False))
            infos[name] = LayerInfo(name, kind, in_census=not children or owns or bool(_packed_objects(sub)))
        info = infos[owner]
        if _hqq_layer(sub):
            _count_hqq(sub, info, seen)
            continue
        for p in sub.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = logical_numel(p)
            info.params += n
            info.trainable += n if p.requires_grad else 0
            info.nbytes += tensor_nbytes(p)
        for b in sub.buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                info.nbytes += tensor_nbytes(b)
        for obj in _packed_objects(sub):
            try:
                tensors = _unpack(obj)
            except (TypeError, RuntimeError) as err:
                problems["param_count"] = f"packed weights of {info.kind} ({name}) not counted: {err}"
                continue
            info.params += sum(t.numel() for t in tensors)
            info.nbytes += sum(tensor_nbytes(t) for t in tensors)
    return list(infos.values()), problems


# ---- forward: FLOPs and output shapes --------------------------------------------------------


def _matmul_like_flops(a_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """2 * outputs * reduction dim: quantized/packed linear kernels take the activation first."""
    return 2 * math.prod(out_shape) * a_shape[-1]


def _quantized_conv_flops(x_shape: Any, packed: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    weight = _unpack(packed)[0]
    return 2 * math.prod(out_shape) * math.prod(weight.shape[1:])


def _cpu_sdpa_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _kernel_flop_formulas() -> dict[Any, Any]:
    """FLOP formulas for kernels FlopCounterMode does not know: CPU fused attention, packed/quantized linears."""
    formulas: dict[Any, Any] = {}
    # torch counts the CUDA flash/efficient attention kernels but not the CPU one (same math: two bmm).
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    linear_ops = ["linear_dynamic", "linear_dynamic_fp16", "linear_relu_dynamic", "linear", "linear_relu"]
    for name in linear_ops:
        if hasattr(torch.ops.quantized, name):
            formulas[getattr(torch.ops.quantized, name)] = _matmul_like_flops
    for name in ["conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu", "conv3d_relu"]:
        if hasattr(torch.ops.quantized, name):
            formulas[getattr(torch.ops.quantized, name)] = _quantized_conv_flops
    if "bitsandbytes" in sys.modules:  # its ops exist only once it is imported (a quantized model did)
        for name in ["gemm_4bit", "gemv_4bit", "int8_linear_matmul"]:
            if hasattr(torch.ops.bitsandbytes, name):
                formulas[getattr(torch.ops.bitsandbytes, name)] = _matmul_like_flops
    return formulas


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (no dropout, no BatchNorm statistics updates); restore after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def output_shapes_of(output: Any) -> list[list[int]]:
    """Shapes of every tensor in a (possibly nested / HF ModelOutput) forward output."""
    leaves, _ = tree_flatten(output)
    return [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def _count_flops(
    module: nn.Module, example_inputs: tuple[torch.Tensor, ...], layers: list[LayerInfo]
) -> tuple[int, list[list[int]], str | None]:
    """FLOPs of one forward, its output shapes, and a note naming called compute layers left uncounted."""
    compute = {
        info.name
        for info in layers
        if info.in_census
        and info.params > 0
        and (is_linear_kind(info.kind) or is_conv_kind(info.kind) or "Attention" in info.kind)
    }
    called: set[str] = set()
    handles = []
    if not isinstance(module, torch.jit.ScriptModule):
        for name, sub in module.named_modules():
            if name in compute:
                handles.append(sub.register_forward_hook(lambda m, i, o, name=name: called.add(name)))
    # MultiheadAttention's inference fast path is one fused kernel without a FLOP formula; the
    # regular path computes the same result with countable matmuls.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with (
            eval_mode(module),
            torch.no_grad(),
            FlopCounterMode(display=False, custom_mapping=_kernel_flop_formulas()) as counter,
        ):
            output = module(*example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
    counted = counter.get_flop_counts()
    root = type(module).__name__
    kinds = {info.name: info.kind for info in layers}
    missed = Counter(
        kinds[name] for name in called if not sum(counted.get(f"{root}.{name}" if name else root, {}).values())
    )
    note = None
    if missed:
        note = "no FLOP formula for the kernels of " + ", ".join(f"{k} x{n}" for k, n in sorted(missed.items()))
    return counter.get_total_flops(), output_shapes_of(output), note


def profile_module(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | None,
    *,
    hf_config: Mapping[str, Any] | None = None,
) -> StaticProfile:
    """Static profile of an eager, TorchScript, quantized or ONNX-backed module; never raises for FLOP failures."""
    from robopt.tools.onnx_module import OnnxModule

    if isinstance(module, OnnxModule):
        from robopt.tools.onnx_analysis import profile_onnx

        return profile_onnx(Path(module.path))

    layers, unmeasured = walk_layers(module)
    census: Counter[str] = Counter()
    params_by_type: Counter[str] = Counter()
    for info in layers:
        if info.in_census:
            census[info.kind] += 1
        if info.params:
            params_by_type[info.kind] += info.params

    flops: int | None = None
    shapes: list[list[int]] = []
    if example_inputs is None:
        for key in ("flops", "macs", "output_shapes"):
            unmeasured[key] = NO_INPUT_REASON
    else:
        try:
            flops, shapes, note = _count_flops(module, example_inputs, layers)
        except Exception as err:  # any model code can fail under the counting mode; the reason is reported
            unmeasured["flops"] = unmeasured["macs"] = f"FLOP counting failed: {type(err).__name__}: {err}"
            shapes = _plain_output_shapes(module, example_inputs, unmeasured)
        else:
            if note and flops == 0:
                flops = None
                unmeasured["flops"] = unmeasured["macs"] = note
            elif note:
                unmeasured["flops_coverage"] = f"{note}; flops counts the other layers only"

    family, evidence = classify_family(
        layers, module_tree(module), hf_config_of(module, hf_config), type(module).__name__
    )
    return StaticProfile(
        param_count=sum(info.params for info in layers),
        trainable_param_count=sum(info.trainable for info in layers),
        size_in_memory_bytes=sum(info.nbytes for info in layers),
        flops=flops,
        macs=flops // 2 if flops is not None else None,
        layer_census=dict(census),
        params_by_layer_type=dict(params_by_type),
        architecture=family,
        architecture_evidence=evidence,
        output_shapes=shapes,
        unmeasured=unmeasured,
    )


def _plain_output_shapes(
    module: nn.Module, example_inputs: tuple[torch.Tensor, ...], unmeasured: dict[str, str]
) -> list[list[int]]:
    try:
        with eval_mode(module), torch.no_grad():
            return output_shapes_of(module(*example_inputs))
    except Exception as err:  # the model's own forward failed on these inputs; reported, not hidden
        unmeasured["output_shapes"] = f"forward failed on the example inputs: {type(err).__name__}: {err}"
        return []
