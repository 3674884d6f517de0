"""Top-1 classification accuracy and cross-entropy of a model on a labeled held-out split.

Also holds the small helpers evaluators share: option parsing, a model's primary output, guarded calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from robopt.errors import EvaluationError, RoboptError
from robopt.evaluation.base import EvaluationSetup, Evaluator, EvaluatorSpec, register_evaluator
from robopt.evaluation.datasets import BUNDLED_DATASETS, load_labeled_data
from robopt.progress import Progress
from robopt.tools.example_inputs import torch_dtype
from robopt.tools.onnx_module import OnnxModule

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def parse_options(options_cls: type[OptionsT], spec: EvaluatorSpec) -> OptionsT:
    """Validate `spec.options` against an evaluator's options model; bad options raise EvaluationError."""
    try:
        return options_cls.model_validate(spec.options)
    except ValidationError as e:
        fields = ", ".join(f"{name} ({f.description or f.annotation})" for name, f in options_cls.model_fields.items())
        raise EvaluationError(
            f"invalid options for evaluator {spec.name!r}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}",
            f"valid options: {fields}",
        ) from e


def primary_output(output: Any) -> torch.Tensor:
    """The tensor to judge: the output itself, `logits` of a dict-like output, or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise EvaluationError(
        f"the model returned {type(output).__name__}, which holds no tensor to evaluate",
        "the model must return a tensor, a tuple whose first tensor is the output, or a dict with 'logits'",
    )


def call_model(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run the model and return its primary output; any failure becomes an EvaluationError naming the input shapes."""
    try:
        output = model(*inputs)
    except RoboptError:
        raise
    except Exception as e:  # a model may raise anything; it is reported, never hidden
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise EvaluationError(
            f"the model failed on inputs of shape {shapes}: {type(e).__name__}: {e}",
            "check that the inputs match what the model takes (pass --input-shape, or give data that fits)",
        ) from e
    return primary_output(output)


def fixed_batch_size(model: nn.Module) -> int | None:
    """The batch size an ONNX model was exported with, when its batch dimension is fixed; None when dynamic."""
    if isinstance(model, OnnxModule):
        inputs = model.session.get_inputs()
        if inputs and inputs[0].shape and isinstance(inputs[0].shape[0], int) and inputs[0].shape[0] > 0:
            return int(inputs[0].shape[0])
    return None


def set_eval_mode(model: nn.Module) -> None:
    # Dropout and batch-norm statistics would make every measurement random; evaluation is always in eval mode.
    if model.training:
        model.eval()


class ClassificationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=256, gt=0, description="samples per forward pass")
    limit: int | None = Field(default=None, gt=0, description="evaluate only the first N samples")


class _BatchRejected(Exception):
    """The first batch failed or came back with the wrong number of rows: the model may have a fixed batch size."""

    def __init__(self, cause: EvaluationError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ClassificationEvaluator(Evaluator):
    """Top-1 accuracy over a labeled split; also cross-entropy `loss`, `samples` and `nonfinite_outputs`."""

    name = "classification"
    description = "top-1 accuracy on a labeled held-out split (bundled 'digits' or a user .npz/.pt file)"
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, spec: EvaluatorSpec, setup: EvaluationSetup) -> None:
        self.options = parse_options(ClassificationOptions, spec)
        if not spec.dataset:
            raise EvaluationError(
                "the classification evaluator needs a labeled dataset",
                f"set dataset to a bundled one ({', '.join(BUNDLED_DATASETS)}) or a .npz/.pt file with 'x' and 'y'",
            )
        self.setup = setup
        x, y = load_labeled_data(spec.dataset)
        if self.options.limit is not None:
            x, y = x[: self.options.limit], y[: self.options.limit]
        self.x, self.y = self._match_input_dtype(x), y

    def _match_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.setup.input_spec
        if spec and spec.inputs and x.is_floating_point():
            dtype = torch_dtype(spec.inputs[0].dtype)
            if dtype.is_floating_point:
                return x.to(dtype)
        return x

    def _fallback_batch_size(self) -> int:
        spec = self.setup.input_spec
        if spec and spec.inputs and spec.inputs[0].shape and spec.inputs[0].shape[0] > 0:
            return spec.inputs[0].shape[0]
        return 1

    def evaluate(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        set_eval_mode(model)
        fixed = fixed_batch_size(model)
        batch = fixed or self.options.batch_size
        with torch.no_grad():
            try:
                return self._run(model, batch, pad=fixed is not None, progress=progress)
            except _BatchRejected as rejected:
                if fixed is not None or batch == 1:
                    raise rejected.cause from None
                fallback = self._fallback_batch_size()
                fallback = fallback if fallback < batch else 1
                # Some exported or traced models only take the batch size they were made with (usually 1).
                try:
                    return self._run(model, fallback, pad=True, progress=progress)
                except _BatchRejected:
                    raise rejected.cause from None

    def _run(self, model: nn.Module, batch: int, *, pad: bool, progress: Progress) -> dict[str, float]:
        x, y = self.x, self.y
        n = x.shape[0]
        batches = math.ceil(n / batch)
        correct = 0
        loss_sum = 0.0
        nonfinite = 0
        elements = 0
        classes: int | None = None
        progress.update("evaluate", 0, batches)
        for i in range(batches):
            xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
            rows = xb.shape[0]
            if pad and rows < batch:  # fixed-batch models: fill the last batch, drop the extra rows' outputs
                xb = torch.cat([xb, xb[-1:].expand(batch - rows, *xb.shape[1:])])
            try:
                logits = self._logits(model, xb, batch if pad else rows)
            except EvaluationError as e:
                if i == 0:
                    raise _BatchRejected(e) from e
                raise
            logits = logits[:rows].float()
            if classes is None:
                classes = logits.shape[1]
                if int(y.max()) >= classes:
                    raise EvaluationError(
                        f"labels go up to {int(y.max())} but the model outputs {classes} classes",
                        "check that the dataset's labels are class indices 0..classes-1 for this model",
                    )
            elif logits.shape[1] != classes:
                raise EvaluationError(
                    f"the model returned {logits.shape[1]} classes after {classes} in an earlier batch",
                    "a classifier must return the same number of classes for every batch",
                )
            finite = torch.isfinite(logits)
            nonfinite += int((~finite).sum())
            elements += logits.numel()
            correct += int((logits.argmax(dim=1) == yb).sum())
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            progress.update("evaluate", i + 1, batches)
        metrics = {"accuracy": correct / n, "samples": float(n), "nonfinite_outputs": nonfinite / elements}
        loss = loss_sum / n
        if math.isfinite(loss):  # NaN/inf would not survive JSON; nonfinite_outputs already tells the judge
            metrics["loss"] = loss
        return metrics

    @staticmethod
    def _logits(model: nn.Module, xb: torch.Tensor, rows: int) -> torch.Tensor:
        logits = call_model(model, (xb,))
        if logits.ndim != 2 or logits.shape[0] != rows or logits.shape[1] == 0:
            raise EvaluationError(
                f"the model returned shape {list(logits.shape)} for a batch of {rows}; "
                "a classifier must return [N, classes]",
                "use the output-fidelity evaluator for models that are not classifiers",
            )
        return logits


register_evaluator(ClassificationEvaluator.name, ClassificationEvaluator.description)(ClassificationEvaluator)
