"""Output fidelity: how closely a model reproduces the reference model's outputs on deterministic random inputs.

The default evaluator for models without a labeled dataset; it needs the reference model and the input spec.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robopt.errors import EvaluationError
from robopt.evaluation.base import EvaluationSetup, Evaluator, EvaluatorSpec, register_evaluator
from robopt.evaluation.classification import call_model, parse_options, set_eval_mode
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs

DEFAULT_EVALUATOR_NAME = "output-fidelity"


class FidelityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(default=64, gt=0, description="number of random inputs (one forward pass each)")
    primary: Literal["auto", "top1_agreement", "cosine"] = Field(
        default="auto",
        description="the metric judged: auto = top1_agreement for [batch, classes] logits, cosine otherwise; "
        "top1_agreement also suits token logits such as [batch, action_dims, bins]",
    )


class OutputFidelityEvaluator(Evaluator):
    """`top1_agreement` (argmax over the last dim), mean `cosine` of flattened outputs, `max_abs_error`.

    The primary metric follows what the output is: top-1 agreement for logits-like outputs ([batch, classes]),
    cosine for everything else (embeddings, hidden states, continuous actions), where an argmax means nothing.
    """

    name = DEFAULT_EVALUATOR_NAME
    description = "agreement with the original model's outputs on deterministic random inputs (no data needed)"
    primary_metric = "top1_agreement"
    higher_is_better = True
    needs_reference = True

    def __init__(self, spec: EvaluatorSpec, setup: EvaluationSetup) -> None:
        self.options = parse_options(FidelityOptions, spec)
        needed = (("reference", setup.reference), ("input_spec", setup.input_spec))
        missing = [what for what, value in needed if value is None]
        if missing:
            raise EvaluationError(
                "the output-fidelity evaluator needs the original model and its input shapes; "
                f"missing: {', '.join(missing)}",
                "pass --input-shape (e.g. 1,3,224,224) so random inputs can be built, "
                "or give an evaluator with labeled data (e.g. classification with a .npz file)",
            )
        assert setup.reference is not None and setup.input_spec is not None
        self.reference = setup.reference
        self.inputs = [make_example_inputs(setup.input_spec, seed=setup.seed + i) for i in range(self.options.samples)]
        self._reference_outputs: list[torch.Tensor] | None = None

    def _outputs(self, model: nn.Module, progress: Progress, stage: str) -> list[torch.Tensor]:
        set_eval_mode(model)
        outputs = []
        with torch.no_grad():
            for inputs in progress.track(self.inputs, stage):
                outputs.append(call_model(model, inputs).detach().to(torch.float64).cpu())
        return outputs

    def reference_outputs(self, progress: Progress) -> list[torch.Tensor]:
        """The reference's outputs, computed once: the reference never changes during a run."""
        if self._reference_outputs is None:
            outputs = self._outputs(self.reference, progress, "reference")
            bad = sum(int((~torch.isfinite(o)).sum()) for o in outputs)
            if bad:
                raise EvaluationError(
                    f"the original model returns {bad} non-finite values on random normal inputs, "
                    "so outputs cannot be compared",
                    "give an evaluator with real data (e.g. classification with a .npz file)",
                )
            self._reference_outputs = outputs
            first = outputs[0]
            if self.options.primary != "auto":
                self.primary_metric = self.options.primary
            else:
                self.primary_metric = "top1_agreement" if first.ndim == 2 and first.shape[-1] > 1 else "cosine"
        return self._reference_outputs

    def evaluate(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        references = self.reference_outputs(progress)
        outputs = self._outputs(model, progress, "evaluate")
        agree = rows = nonfinite = elements = 0
        cosines: list[float] = []
        max_abs = 0.0
        for ref, out in zip(references, outputs, strict=True):
            if out.shape != ref.shape:
                raise EvaluationError(
                    f"the model returns shape {list(out.shape)} where the original returns {list(ref.shape)}",
                    "a compressed model must keep the original's output shape",
                )
            nonfinite += int((~torch.isfinite(out)).sum())
            elements += out.numel()
            if ref.ndim == 0:
                agree, rows = agree + 1, rows + 1  # a scalar output has a single "class"
            else:
                agree += int((out.argmax(dim=-1) == ref.argmax(dim=-1)).sum())
                rows += ref[..., 0].numel()
            cosines.append(_cosine(out.flatten(), ref.flatten()))
            max_abs = max(max_abs, float((out - ref).abs().max())) if out.numel() else max_abs
        metrics = {"top1_agreement": agree / rows, "nonfinite_outputs": nonfinite / max(elements, 1)}
        cosine = sum(cosines) / len(cosines)
        # NaN/inf would not survive JSON; nonfinite_outputs already tells the judge the outputs are broken.
        if nonfinite == 0:
            metrics["cosine"] = cosine
            metrics["max_abs_error"] = max_abs
        return metrics


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 if norm_a == norm_b else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (norm_a * norm_b)))


register_evaluator(OutputFidelityEvaluator.name, OutputFidelityEvaluator.description)(OutputFidelityEvaluator)
