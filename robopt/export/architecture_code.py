"""Write a model's architecture as plain-PyTorch Python source (via torch.fx), so its state dict reloads without robopt.

torch.fx traces forward() into a graph of standard torch.nn layers and torch functions; each layer is rebuilt from
its constructor arguments (`nn.Linear(in_features=..., ...)`), and the state-dict keys stay those of the original
model. torch.ao dynamic INT8 Linear layers are written as nn.Linear plus a `quantize(model)` recipe that swaps them
back before the quantized weights are loaded. Anything else (custom leaf layers, functions from other packages,
input-dependent control flow) is refused with the reason; the export's verification checks the rest.
"""

from __future__ import annotations

import keyword
import math
import re
import textwrap
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robopt.export.errors import NotExportableError

_DYNAMIC_QUANTIZED_LINEAR = "torch.ao.nn.quantized.dynamic.modules.linear"
_IMPORTABLE_TOPS = {"torch", "math", "operator", "builtins", "types", "typing"}
_NOT_TRACEABLE_HINT = "use --format torchscript (a traced graph) or onnx, which do not need the Python class"


@dataclass
class ArchitectureCode:
    """Generated source, the class it defines, the state its instance loads, and the INT8 layers to re-quantize."""

    source: str
    class_name: str
    state: dict[str, Any]
    quantized_layers: dict[str, str] = field(default_factory=dict)  # layer name -> "per-channel" | "per-tensor"

    @property
    def needs_quantization(self) -> bool:
        return bool(self.quantized_layers)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, AttributeError...): all mean "not traceable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotExportableError(
            f"torch.fx cannot trace {type(model).__name__} into plain PyTorch code: {type(e).__name__}: {first}",
            _NOT_TRACEABLE_HINT,
        ) from e


def _quantized_linear(module: nn.Module) -> tuple[str, str] | None:
    """(nn.Linear constructor, weight scales) for a torch.ao dynamic INT8 Linear; None for other layers."""
    if type(module).__module__ != _DYNAMIC_QUANTIZED_LINEAR or type(module).__name__ != "Linear":
        return None
    weight = module.weight()
    per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    scales = "per-channel" if per_channel else "per-tensor"
    bias = module.bias() is not None
    return f"nn.Linear({module.in_features}, {module.out_features}, bias={bias})", scales


def _constructor(name: str, module: nn.Module) -> str:
    cls = type(module)
    is_leaf = next(module.children(), None) is None
    if is_leaf and cls.__module__.startswith("torch.nn.modules") and getattr(nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}({module.extra_repr()})"
    raise NotExportableError(
        f"layer {name!r} is a {cls.__module__}.{cls.__qualname__}, which robopt cannot write as a plain torch.nn "
        "constructor",
        _NOT_TRACEABLE_HINT,
    )


def _import_line(name: str, value: Any) -> str | None:
    """An import binding `name` as the generated forward() expects, or None when nothing is needed."""
    if isinstance(value, str) or name == "__builtins__":
        return None  # annotation aliases: harmless under `from __future__ import annotations`
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return f"{name} = float({str(value)!r})"
    if value is types.NoneType:
        return f"{name} = type(None)"
    if isinstance(value, types.ModuleType):
        top = value.__name__.split(".")[0]
        if top in _IMPORTABLE_TOPS:
            return f"import {value.__name__} as {name}" if value.__name__ != name else f"import {name}"
    module_name = getattr(value, "__module__", None) or ""
    module_name = "operator" if module_name == "_operator" else module_name
    qualname = getattr(value, "__qualname__", "")
    if module_name == "builtins" and qualname == name:
        return None  # getattr, len...: Python's own builtins need no import
    if module_name.split(".")[0] in _IMPORTABLE_TOPS and qualname.isidentifier():
        return f"from {module_name} import {qualname} as {name}"
    raise NotExportableError(
        f"forward() uses {name!r} from {module_name or type(value).__name__}, which plain-PyTorch code cannot import",
        _NOT_TRACEABLE_HINT,
    )


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def _attach(parent: str, leaf: str, value: str) -> str:
    if not parent and leaf.isidentifier() and not keyword.iskeyword(leaf):
        return f"self.{leaf} = {value}"
    owner = "self" if not parent else f"self.get_submodule({parent!r})"
    return f"{owner}.add_module({leaf!r}, {value})"


def _parents(path: str) -> list[str]:
    parts = path.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _strip_trailing(src: str) -> str:
    return "\n".join(line.rstrip() for line in src.strip("\n").splitlines())


def _class_name(model: nn.Module) -> str:
    name = type(model).__name__
    return name if name.isidentifier() and not keyword.iskeyword(name) and name != "nn" else "ExportedModel"


def generate_architecture_code(model: nn.Module) -> ArchitectureCode:
    """Plain-PyTorch source for `model` (in eval mode) and the state dict its class loads with strict keys."""
    model.eval()
    gm = _trace(model)
    code = gm.graph.python_code(root_module="self")
    forward_src = code.src
    for name, value in code.globals.items():
        if isinstance(value, str) and value.replace(".", "").isidentifier():  # annotation aliases: torch.Tensor
            forward_src = re.sub(rf"\b{re.escape(name)}\b", value, forward_src)
    used = {n: v for n, v in code.globals.items() if re.search(rf"\b{re.escape(n)}\b", forward_src)}
    imports = sorted({line for n, v in used.items() if (line := _import_line(n, v)) is not None})

    leaves: dict[str, str] = {}
    quantized: dict[str, str] = {}
    attrs: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in leaves:
            module = gm.get_submodule(node.target)
            if (q := _quantized_linear(module)) is not None:
                leaves[node.target], quantized[node.target] = q
            else:
                leaves[node.target] = _constructor(node.target, module)
        elif node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise NotExportableError(
                    f"forward() reads attribute {node.target!r}, a {type(value).__name__}, not a tensor",
                    _NOT_TRACEABLE_HINT,
                )
            attrs[node.target] = value

    lines: list[str] = []
    # graph order, parents before children: the rebuilt module registers its layers as the original did
    containers = [p for p in dict.fromkeys(p for path in [*leaves, *attrs] for p in _parents(path)) if p not in leaves]
    lines += [_attach(*_split(p), "nn.Module()") for p in containers]
    lines += [_attach(*_split(path), ctor) for path, ctor in leaves.items()]
    state = gm.state_dict()  # keeps its _metadata: quantized layers read their format version from it
    for path, tensor in attrs.items():
        parent, leaf = _split(path)
        if parent in leaves:
            continue  # a weight of a layer rebuilt above (forward reads it directly as well)
        owner = "self" if not parent else f"self.get_submodule({parent!r})"
        empty = f"torch.empty({list(tensor.shape)}, dtype={tensor.dtype})"
        if isinstance(tensor, nn.Parameter):
            lines.append(f"{owner}.register_parameter({leaf!r}, nn.Parameter({empty}, requires_grad=False))")
        else:
            lines.append(f"{owner}.register_buffer({leaf!r}, {empty})")
        state.setdefault(path, tensor.detach())

    class_name = _class_name(model)
    body = "\n".join(lines) or "pass"
    source = _render(class_name, type(model), imports, body, forward_src, quantized)
    return ArchitectureCode(source=source, class_name=class_name, state=state, quantized_layers=quantized)


def _render(
    class_name: str, original: type, imports: list[str], init_body: str, forward_src: str, quantized: dict[str, str]
) -> str:
    header = (
        f'"""{class_name} as plain PyTorch, written by robopt export (torch.fx) from the optimized model.\n\n'
        f"Original class: {original.__module__}:{original.__qualname__}.\n"
        "Only torch is needed: build the model, "
        + ("call quantize(model), " if quantized else "")
        + 'then load the weights.\n"""\n\n'
    )
    parts = [header, "from __future__ import annotations\n\nimport torch\nfrom torch import nn\n"]
    extra = [i for i in imports if i not in ("import torch",)]
    if extra:
        parts.append("\n".join(extra) + "\n")
    parts.append(
        f"\n\nclass {class_name}(nn.Module):\n"
        f"    def __init__(self) -> None:\n"
        f"        super().__init__()\n"
        f"{textwrap.indent(init_body, ' ' * 8)}\n\n"
        f"{textwrap.indent(_strip_trailing(forward_src), ' ' * 4)}\n"
    )
    if quantized:
        specs = ", ".join(
            f"{name!r}: {'per_channel_dynamic_qconfig' if s == 'per-channel' else 'default_dynamic_qconfig'}"
            for name, s in quantized.items()
        )
        parts.append(
            "\n\ndef quantize(model: nn.Module) -> nn.Module:\n"
            '    """torch.ao dynamic INT8 on the layers robopt quantized; load the INT8 state dict after this."""\n'
            "    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, "
            "quantize_dynamic\n\n"
            f"    layers = {{{specs}}}\n"
            "    return quantize_dynamic(model, layers, dtype=torch.qint8, inplace=True)\n"
        )
    return "".join(parts)


def instantiate(code: ArchitectureCode, *, quantize: bool = True) -> nn.Module:
    """Build the generated class in this process (to check its keys before anything is written)."""
    namespace: dict[str, Any] = {"__name__": "robopt_export_architecture"}
    exec(compile(code.source, "architecture.py", "exec"), namespace)  # our own generated source
    model = namespace[code.class_name]().eval()
    if quantize and code.needs_quantization:
        with warnings.catch_warnings():  # torch.ao's deprecation notices; the recipe is what the export ships
            warnings.simplefilter("ignore")
            model = namespace["quantize"](model)
    return model
