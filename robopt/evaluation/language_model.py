"""Language-model evaluators: perplexity on held-out text, and a multiple-choice task run through lm-eval.

Both need the tokenizer, found in `model_dir` (the save_pretrained folder; the zoo fills it in for its models).
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robopt.errors import EvaluationError, RoboptError
from robopt.evaluation.base import EvaluationSetup, Evaluator, EvaluatorSpec, register_evaluator
from robopt.evaluation.classification import fixed_batch_size, parse_options, primary_output, set_eval_mode
from robopt.evaluation.text_corpus import CORPUS_NAME, corpus_text
from robopt.progress import Progress

LM_TASKS_DIR = Path(__file__).parent / "lm_tasks"
LM_TASK_NAME = "robopt_stdlib_complete_line"
_MODEL_DIR_HINT = (
    "set the evaluator option model_dir to the model's save_pretrained folder (it holds the tokenizer), "
    'e.g. EvaluatorSpec(name="perplexity", options={"model_dir": "path/to/folder"}); zoo models fill it in'
)


def load_tokenizer(model_dir: str) -> Any:
    """The tokenizer saved in `model_dir`, loaded with plain transformers."""
    from transformers import AutoTokenizer

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"model_dir {model_dir!r} is not a directory", _MODEL_DIR_HINT)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise EvaluationError(f"no tokenizer could be loaded from {model_dir!r}: {e}", _MODEL_DIR_HINT) from e


def fill_model_dir(spec: EvaluatorSpec, folder: str | Path | None) -> EvaluatorSpec:
    """`spec` with model_dir set to `folder` when its evaluator reads a tokenizer from model_dir and has none yet
    (perplexity, lm-eval, embedding-fidelity).

    For callers that know where a Hugging Face model came from (a zoo card, an ingested hf-folder) and were given
    an evaluator by name only, e.g. `--evaluator lm-eval`.
    """
    from robopt.evaluation.embedding import EmbeddingFidelityEvaluator

    takes_model_dir = (*LANGUAGE_MODEL_EVALUATORS, EmbeddingFidelityEvaluator.name)
    if spec.name not in takes_model_dir or spec.options.get("model_dir") or folder is None:
        return spec
    return spec.model_copy(update={"options": {**spec.options, "model_dir": str(folder)}})


def _require_model_dir(name: str, model_dir: str | None) -> str:
    if not model_dir:
        raise EvaluationError(
            f"the {name} evaluator needs the model's tokenizer, but no model_dir was given", _MODEL_DIR_HINT
        )
    return model_dir


# -- perplexity ----------------------------------------------------------------------------------------


class PerplexityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(default=None, description="save_pretrained folder holding the tokenizer")
    windows: int = Field(default=48, gt=0, description="number of token windows, spread evenly over the text")
    window_length: int = Field(default=64, ge=2, description="tokens per window")
    batch_size: int = Field(default=8, gt=0, description="windows per forward pass")


class PerplexityEvaluator(Evaluator):
    """exp(mean next-token NLL) over fixed token windows of held-out text; also `loss` (the mean NLL).

    The windows start at evenly spaced offsets of the tokenized text, so every model sees exactly the same tokens.
    `dataset` is 'stdlib-heldout' (held-out standard library modules, the default) or a UTF-8 .txt file.
    """

    name = "perplexity"
    description = "perplexity of a causal LM on held-out text ('stdlib-heldout' or a .txt file); needs model_dir"
    primary_metric = "perplexity"
    higher_is_better = False

    def __init__(self, spec: EvaluatorSpec, setup: EvaluationSetup) -> None:
        self.options = parse_options(PerplexityOptions, spec)
        self.tokenizer = load_tokenizer(_require_model_dir(self.name, self.options.model_dir))
        text = _read_text(spec.dataset or CORPUS_NAME)
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        length = self.options.window_length
        if len(ids) < length:
            raise EvaluationError(
                f"the text has {len(ids)} tokens, fewer than one window of {length}",
                "give a longer text or a smaller window_length",
            )
        tokens = torch.tensor(ids, dtype=torch.long)
        starts = torch.linspace(0, len(ids) - length, self.options.windows).round().long().tolist()
        self.windows = torch.stack([tokens[s : s + length] for s in starts])

    def evaluate(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        set_eval_mode(model)
        fixed = fixed_batch_size(model)
        batch = fixed or self.options.batch_size
        with torch.no_grad():
            try:
                return self._run(model, batch, progress)
            except _FirstBatchFailed as failed:
                if fixed is not None or batch == 1:
                    raise failed.cause from None
                # Exported or traced models may only take the batch size they were made with (usually 1).
                try:
                    return self._run(model, 1, progress)
                except _FirstBatchFailed:
                    raise failed.cause from None

    def _run(self, model: nn.Module, batch: int, progress: Progress) -> dict[str, float]:
        windows = self.windows
        chunks = [windows[i : i + batch] for i in range(0, len(windows), batch)]
        nll_sum, predicted, nonfinite, elements = 0.0, 0, 0, 0
        for i, chunk in enumerate(progress.track(chunks, "perplexity")):
            rows = chunk.shape[0]
            if rows < batch:  # fixed-batch models: fill the last batch, drop the extra rows' outputs
                chunk = torch.cat([chunk, chunk[-1:].expand(batch - rows, -1)])
            try:
                logits = self._logits(model, chunk)
            except EvaluationError as e:
                if i == 0:
                    raise _FirstBatchFailed(e) from e
                raise
            logits = logits[:rows, :-1].float()
            targets = chunk[:rows, 1:]
            nonfinite += int((~torch.isfinite(logits)).sum())
            elements += logits.numel()
            nll_sum += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            )
            predicted += targets.numel()
        metrics = {"tokens": float(predicted), "nonfinite_outputs": nonfinite / max(elements, 1)}
        loss = nll_sum / predicted
        # NaN/inf would not survive JSON; nonfinite_outputs already tells the judge the outputs are broken.
        if math.isfinite(loss):
            metrics["loss"] = loss
            if loss < 700:  # exp overflows a float beyond that
                metrics["perplexity"] = math.exp(loss)
        return metrics

    def _logits(self, model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
        logits = _call_with_input_ids(model, chunk)
        vocab = len(self.tokenizer)
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(chunk.shape) or logits.shape[-1] < vocab:
            raise EvaluationError(
                f"the model returned shape {list(logits.shape)} for input_ids of shape {list(chunk.shape)}; "
                f"a causal LM must return logits [batch, sequence, vocab >= {vocab}]",
                "give a causal language model (e.g. an AutoModelForCausalLM) whose tokenizer is in model_dir; "
                "a model exported with a fixed sequence length needs window_length set to it",
            )
        return logits


def _call_with_input_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for `input_ids`: its output's `.logits`, or the output tensor itself."""
    try:
        output = model(input_ids)
    except RoboptError:
        raise
    except Exception as e:  # a model may raise anything; it is reported, never hidden
        raise EvaluationError(
            f"the model failed on input_ids of shape {list(input_ids.shape)}: {type(e).__name__}: {e}",
            "give a causal language model that takes token ids (e.g. an AutoModelForCausalLM) and its model_dir",
        ) from e
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else primary_output(output)


class _FirstBatchFailed(Exception):
    """The first batch failed: the model may take only a fixed batch size."""

    def __init__(self, cause: EvaluationError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _read_text(dataset: str) -> str:
    if dataset == CORPUS_NAME:
        return corpus_text("heldout")
    path = Path(dataset).expanduser()
    if path.suffix == ".txt" and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EvaluationError(f"{dataset} is not UTF-8 text: {e}", "give a UTF-8 .txt file") from e
    raise EvaluationError(
        f"unknown text dataset {dataset!r}", f"use the bundled {CORPUS_NAME!r} or the path of a UTF-8 .txt file"
    )


# -- lm-eval -------------------------------------------------------------------------------------------


class LmEvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(default=None, description="save_pretrained folder holding the tokenizer")
    limit: int | None = Field(default=None, gt=0, description="evaluate only the first N task items")
    batch_size: int = Field(default=16, gt=0, description="requests per forward pass")


class LmEvalEvaluator(Evaluator):
    """Accuracy on a local multiple-choice task (complete a started line of held-out stdlib code), run by lm-eval.

    The task is robopt's own YAML + JSONL (robopt/evaluation/lm_tasks); lm-eval scores each choice by its
    log-likelihood after the context: `acc` sums it, `acc_norm` divides it by the choice's length in bytes.
    Needs a Hugging Face causal LM (quantized in place is fine); ONNX and other bare modules are refused.
    """

    name = "lm-eval"
    description = "lm-eval accuracy completing lines of held-out stdlib code (local task, 4 choices); needs model_dir"
    primary_metric = "acc"
    higher_is_better = True

    def __init__(self, spec: EvaluatorSpec, setup: EvaluationSetup) -> None:
        self.options = parse_options(LmEvalOptions, spec)
        if spec.dataset not in (None, LM_TASK_NAME):
            raise EvaluationError(
                f"unknown lm-eval task {spec.dataset!r}", f"the lm-eval evaluator runs the local task {LM_TASK_NAME!r}"
            )
        self.tokenizer = load_tokenizer(_require_model_dir(self.name, self.options.model_dir))

    def evaluate(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise EvaluationError(
                f"lm-eval can only run Hugging Face causal LMs; this model is a {type(model).__name__}",
                "use the perplexity evaluator for ONNX and other exported or rebuilt models",
            )
        progress.check()
        set_eval_mode(model)
        calls = 0

        def report(module: nn.Module, args: Any) -> None:  # one event per forward pass, and a cancellation point
            nonlocal calls
            calls += 1
            progress.update("lm-eval", calls, None, message=f"{calls} forward passes")

        handle = model.register_forward_pre_hook(report)
        try:
            with _preserved_global_rng():  # lm-eval seeds python, numpy and torch globally
                results = _run_lm_eval(model, self.tokenizer, self.options)
        except RoboptError:
            raise  # cancellation (raised by the hook) and our own errors pass through
        except Exception as e:  # lm-eval and the model may raise anything; it is reported, never hidden
            raise EvaluationError(
                f"lm-eval failed on this model: {type(e).__name__}: {e}",
                "check that the model is a causal LM matching the tokenizer in model_dir, "
                "or use the perplexity evaluator",
            ) from e
        finally:
            handle.remove()
        task = results["results"][LM_TASK_NAME]
        metrics = {"samples": float(results["n-samples"][LM_TASK_NAME]["effective"])}
        for metric in ("acc", "acc_norm"):
            if isinstance(task.get(f"{metric},none"), (int, float)):
                metrics[metric] = float(task[f"{metric},none"])
        if "acc" not in metrics:
            raise EvaluationError(
                f"lm-eval returned no accuracy for {LM_TASK_NAME}: {task}", "check the lm-eval install"
            )
        return metrics


@contextlib.contextmanager
def _preserved_global_rng() -> Iterator[None]:
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def write_task_dir(directory: Path) -> Path:
    """Write the task YAML into `directory` with the JSONL's absolute path (lm-eval resolves data files by path)."""
    import yaml

    config = yaml.safe_load((LM_TASKS_DIR / f"{LM_TASK_NAME}.yaml").read_text())
    data_file = LM_TASKS_DIR / config["dataset_kwargs"]["data_files"]["test"]
    config["dataset_kwargs"]["data_files"]["test"] = str(data_file.resolve())
    (directory / f"{LM_TASK_NAME}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def _run_lm_eval(model: nn.Module, tokenizer: Any, options: LmEvalOptions) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=str(model.device))
    with tempfile.TemporaryDirectory(prefix="robopt-lm-eval-") as include:
        task_manager = TaskManager(include_path=str(write_task_dir(Path(include))), include_defaults=False)
        results = simple_evaluate(
            model=lm,
            tasks=[LM_TASK_NAME],
            task_manager=task_manager,
            limit=options.limit,
            num_fewshot=0,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    if not results or LM_TASK_NAME not in results.get("results", {}):
        raise EvaluationError("lm-eval returned no results for the task", "run with --verbose to see lm-eval's log")
    return results


LANGUAGE_MODEL_EVALUATORS = (PerplexityEvaluator.name, LmEvalEvaluator.name)
register_evaluator(PerplexityEvaluator.name, PerplexityEvaluator.description)(PerplexityEvaluator)
register_evaluator(LmEvalEvaluator.name, LmEvalEvaluator.description)(LmEvalEvaluator)
