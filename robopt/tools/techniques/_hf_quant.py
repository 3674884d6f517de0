"""Hugging Face models rebuilt by transformers itself (bitsandbytes quantization, half precision) and saved back.

A transformers PreTrainedModel is written to a temporary folder with `save_pretrained` and loaded again with
`from_pretrained(quantization_config=BitsAndBytesConfig(...) or dtype=..., device_map="cpu")`: the result is the
model transformers itself builds, so its `save_pretrained` writes a folder whose config.json carries the
quantization_config (or dtype), and plain transformers reloads that folder (no robopt needed).

bitsandbytes 0.50.2 on CPUs with AVX512-BF16 repacks 4-bit weights for its fused kernel on the first inference
call, and its unpacking before a save (`_convert_weight_packed_for_cpu_inverse`) leaves the per-block scales
(absmax) transposed unless double quantization is on: `save_pretrained` after any forward then writes wrong weights.
`restore_bnb_cpu_layout` undoes the packing correctly; the 4-bit technique registers it as a state-dict pre-hook,
so `save_pretrained` of its models is right whenever it is called.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robopt.errors import TechniqueFailedError
from robopt.progress import Progress

# What transformers' replace_with_bnb_linear swaps: exact nn.Linear layers and GPT-2 style Conv1D layers.
_CONV1D = "Conv1D"


def is_hf_model(model: nn.Module) -> bool:
    """True for transformers PreTrainedModel instances (they take the transformers route)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def convertible_layers(model: nn.Module) -> list[str]:
    """Names of the layers transformers' bitsandbytes integration would quantize."""
    return [n for n, m in model.named_modules() if n and (type(m) is nn.Linear or type(m).__name__ == _CONV1D)]


def tied_layers(model: nn.Module) -> set[str]:
    """Layers whose weight is tied to another (quantizing one side would break the tie)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied) | set(tied.values())
    return {k.removesuffix(".weight") for k in keys}


def skip_modules(model: nn.Module, keep: Iterable[str]) -> list[str]:
    """Every convertible layer outside `keep`, plus tied layers: transformers' llm_int8_skip_modules.

    transformers matches each entry from the start of a module name up to a module boundary, so full names
    select exactly one layer ("model.layers.1" does not match "model.layers.11")."""
    chosen = set(keep) - tied_layers(model)
    return sorted(n for n in convertible_layers(model) if n not in chosen)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No loading/saving progress bars and no info logs from transformers inside the block (restored after)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _user_attributes(model: nn.Module, new: nn.Module) -> dict[str, Any]:
    """Plain attributes set on `model` after construction (e.g. robopt's input_spec) that `new` lacks."""
    fresh = vars(new)
    return {k: v for k, v in vars(model).items() if not k.startswith("_") and k not in fresh}


def reload(model: nn.Module, progress: Progress, stage: str, **from_pretrained: Any) -> nn.Module:
    """Save `model` to a temporary folder and load it back with `from_pretrained(**from_pretrained)` on CPU.

    The result is what plain transformers builds from such a folder (quantizers, layers it keeps in fp32 such as
    rotary inv_freq); it is in eval mode and keeps plain attributes that were set on the incoming model. The
    dtype defaults to the model's float dtype."""
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel)
    cls = type(model)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    kwargs = {"device_map": "cpu", "dtype": dtype, "local_files_only": True, **from_pretrained}
    progress.update(stage, 0, 2, "saving the float model for transformers")
    with tempfile.TemporaryDirectory(prefix="robopt-hf-") as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        progress.update(stage, 1, 2, f"reloading with from_pretrained({', '.join(sorted(from_pretrained))}) on CPU")
        try:
            loaded = cls.from_pretrained(tmp, **kwargs)
        except (ImportError, RuntimeError, ValueError, TypeError) as e:
            raise TechniqueFailedError(
                f"transformers could not reload {cls.__name__} with {sorted(from_pretrained)} on CPU: "
                f"{type(e).__name__}: {e}",
                "check the backend installation (for bitsandbytes: `python -m bitsandbytes`), or use another technique",
            ) from e
    for key, value in _user_attributes(model, loaded).items():
        setattr(loaded, key, value)
    progress.update(stage, 2, 2)
    return loaded.eval()


def bnb_layers(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes layers in `model`."""
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]


def restore_bnb_cpu_layout(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU packing of 4-bit weights so the state dict holds the canonical layout.

    bnb's own inverse restores the nibble order but, without double quantization, leaves absmax as the
    transposed bf16 [in/blocksize, out] table; it is turned back into the flat per-block vector here. The
    values are those the fused kernel used (bf16), stored as fp32; the next CPU forward packs again. Returns how
    many layers were restored.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    restored = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if not isinstance(module, Linear4bit) or not getattr(state, "packing_format_for_cpu", False):
            continue
        nested = state.original_nested
        data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        if not nested:
            state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
        module.weight.data, module.weight.quant_state = data, state
        restored += 1
    return restored


def restore_bnb_cpu_layout_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: `restore_bnb_cpu_layout` before any state_dict/save_pretrained of the model.

    A module-level function, so a model carrying it still pickles (loading the pickle imports robopt)."""
    if not prefix:  # the model itself, not each submodule again
        restore_bnb_cpu_layout(module)


def save_pretrained_folder(model: nn.Module, out_dir: Path) -> Path:
    """`model.save_pretrained(out_dir)` with bitsandbytes' CPU packing undone first (see the module docstring)."""
    restore_bnb_cpu_layout(model)
    with quiet_transformers():
        model.save_pretrained(out_dir)  # type: ignore[operator]
    return Path(out_dir)
