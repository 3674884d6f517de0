"""Make a module picklable by torch.save without changing what it computes."""

from __future__ import annotations

from torch import nn


def make_picklable(module: nn.Module) -> nn.Module:
    """Drop instance-level `extra_repr` overrides (torchao's quantize_ sets a functools.partial there, which
    pickle cannot name); they only affect printing, and the class method takes over again."""
    for sub in module.modules():
        if "extra_repr" in vars(sub):
            del sub.extra_repr
    return module
