"""AutoRound (Intel auto-round): weight-only INT4/INT8 (W4A16, W8A16) of a Hugging Face causal LM's decoder blocks,
with rounding tuned by signed gradient descent on real calibration tokens, packed GPTQ-style (int32 words plus
fp16 scales and zero points per group).

The quantized model is the checkpoint auto-round writes, loaded back with transformers: on CPU its layers run
auto-round's pure-torch kernel (`auto_round:torch_zp`), which dequantizes per call and computes in float16, so the
whole model becomes float16 (auto-round casts it; transformers refuses `.float()` on quantized models). The head
(`lm_head`) and the embeddings are not quantized.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import tempfile
import time
from collections.abc import Iterator
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools import hf_export
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Availability,
    Estimate,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    register_technique,
)
from robopt.tools.techniques import _layers
from robopt.tools.threads import torch_threads

# Measured on the 2-core build machine (tiny-lm, input [1, 64], one thread, 100 interleaved calls, p50): fp32 7.9 ms;
# auto-round's torch_zp kernel (fp16) W4 g32 17.5 ms, W4 g128 16.8 ms, W8 g128 17.1 ms. The packed model is SLOWER
# on CPU (weights dequantized on every call); this ratio is the whole-model speedup the estimates report.
MEASURED_CPU_SPEEDUP = 0.45
CPU_COMPUTE_BYTES = 2  # auto-round's CPU kernel runs the whole model in float16
SCALE_BYTES = 2  # one fp16 scale per group and output channel

ExportFormat = Literal["auto_round", "gptq"]
_AUTO_ROUND_FORMAT = {"auto_round": "auto_round", "gptq": "auto_gptq"}


class WeightOnlySettings(TechniqueConfig):
    """Weight-only integer quantization of the decoder blocks' Linear layers, calibrated on token sequences
    (shared by `autoround` and `gptq`)."""

    bits: Literal[4, 8] = Field(default=4, description="Weight bits: 4 (W4A16) or 8 (W8A16); activations stay float.")
    group_size: Literal[-1, 32, 64, 128] = Field(
        default=128,
        description="Input channels sharing one scale/zero point (-1: one per output channel). Must divide the "
        "Linear layers' input size, else the layer stays unquantized.",
    )
    sym: bool = Field(
        default=True,
        description="Symmetric quantization. Must stay true here: asymmetric checkpoints do not run on CPU.",
    )
    nsamples: int = Field(default=128, ge=1, le=4096, description="Calibration sequences to use.")
    seqlen: int | None = Field(
        default=None,
        ge=8,
        description="Tokens per calibration sequence (longer ones are cut, shorter ones dropped); "
        "None: the length of the calibration samples.",
    )

    @model_validator(mode="after")
    def _symmetric_only(self) -> WeightOnlySettings:
        if not self.sym:
            raise ValueError(
                "asymmetric weights do not run on CPU here: auto-round packs 4-bit asymmetric weights in the AWQ "
                "layout, whose CPU reload picks its 'fake' backend and leaves the Linear weights uninitialised "
                "(auto-round 0.16.1), and 8-bit packed layouts have no room for an 8-bit zero point; use sym=true"
            )
        return self


class AutoRoundTechniqueConfig(WeightOnlySettings):
    """auto-round's tuning length and the checkpoint format of the result."""

    iters: int = Field(default=200, ge=0, le=5000, description="Tuning steps per decoder block (0: round to nearest).")
    export_format: ExportFormat = Field(
        default="auto_round",
        description="auto_round: quant_method 'auto-round', loads with plain transformers.from_pretrained. gptq: a "
        "GPTQ-format checkpoint (quant_method 'gptq', for GPTQ tooling); transformers needs optimum + gptqmodel for "
        "it, or quantization_config=AutoRoundConfig(backend='auto').",
    )


@functools.cache
def _auto_round_probe() -> Availability:
    """auto-round and its CPU kernel for packed int weights are installed (found without importing them: importing
    auto-round takes ~6 s of CPU, too much for every technique listing; `apply` reports an import failure)."""
    import importlib.util

    for module in ("auto_round", "auto_round_extension.torch.qlinear_torch_zp"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as e:
            return Availability(False, f"{module} cannot be found: {e}")
        if not found:
            return Availability(False, f"{module} is not installed (pip install auto-round)")
    return Availability(True, backend=f"auto-round {_version('auto-round')} (CPU kernel auto_round:torch_zp)")


def import_auto_round(technique: str) -> Any:
    """auto-round's AutoRound class, or TechniqueNotApplicableError saying why it does not import here."""
    try:
        from auto_round import AutoRound
    except Exception as e:  # an optional backend may fail to import in any way; the reason is reported
        raise TechniqueNotApplicableError(
            f"{technique}: auto-round does not import here: {type(e).__name__}: {e}", "reinstall auto-round"
        ) from e
    return AutoRound


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def causal_lm_applicability(analysis: AnalysisReport) -> Applicability:
    """Decoder LLMs (Hugging Face causal LMs) with Linear layers that are not quantized yet."""
    base = _layers.linear_quantization_applicability(analysis)
    if not base.applicable:
        return base
    if analysis.architecture != "decoder-llm":
        return Applicability(
            False,
            f"needs a Hugging Face causal language model (decoder-llm); this model is {analysis.architecture!r}",
        )
    return Applicability(True)


def packed_bytes_per_weight(bits: int, group_size: int) -> float:
    """Stored bytes per quantized weight: the packed weight plus, per group, an fp16 scale and a packed zero point."""
    weight = bits / 8
    return weight + ((SCALE_BYTES + weight) / group_size if group_size > 0 else 0.0)


def estimate_weight_only(
    analysis: AnalysisReport, bits: int, group_size: int, *, speedup: float, compute_dtype: str = "float16"
) -> tuple[float, str]:
    """(size after / before, note) for block Linears packed to `bits` and everything else in a 16-bit float on CPU
    (`speedup`: the measured whole-model ratio the note quotes).

    The LM head is not quantized; it is taken as large as the token embedding (vocab x hidden, untied heads).
    """
    linear = _layers.linear_params(analysis)
    head = min(_layers.params_of(analysis, ("Embedding",)), linear)
    quantized = linear - head
    per_weight = packed_bytes_per_weight(bits, group_size)
    after = quantized * per_weight + (analysis.param_count - quantized) * CPU_COMPUTE_BYTES
    ratio = max(after, 1.0) / _layers.memory_bytes(analysis)
    share = _layers.share_of_params(analysis, quantized)
    note = (
        f"{share:.0%} of the parameters (the decoder blocks' Linear layers) go to {per_weight:.3g} bytes each; the "
        f"embeddings and head stay unquantized and, like the rest, {compute_dtype} on CPU (auto-round's torch "
        f"kernel). SLOWER on CPU: measured {speedup:.2f}x fp32 speed on tiny-lm (weights dequantized per call)."
    )
    return ratio, note


def calibration_token_ids(
    context: ApplyContext, nsamples: int, seqlen: int | None, technique: str
) -> tuple[list[torch.Tensor], str]:
    """`nsamples` token-id sequences [1, seqlen] from the run's calibration source, and where they came from.

    Raises TechniqueNotApplicableError when there is no calibration source or its samples are not token ids.
    """
    if context.calibration is None:
        raise TechniqueNotApplicableError(
            f"{technique} tunes the quantized weights on real text, but this run has no calibration data",
            "give the run a calibration source (ApplyContext.calibration): token-id sequences of text like the "
            "model's inputs",
        )
    calibration = context.calibration(nsamples)
    ids = []
    for sample in calibration.samples:
        tokens = sample[0] if sample else None
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.ndim != 2:
            raise TechniqueNotApplicableError(
                f"{technique} needs token ids [1, length] as the first calibration input, got "
                f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')} {list(getattr(tokens, 'shape', []))}",
                "use a calibration source that yields input_ids for a causal language model",
            )
        ids.extend(row.unsqueeze(0) for row in tokens.long())
    length = seqlen or min((t.shape[1] for t in ids), default=0)
    usable = [t[:, :length] for t in ids if t.shape[1] >= length][:nsamples]
    if not usable or length < 2:
        longest = max((t.shape[1] for t in ids), default=0)
        raise TechniqueNotApplicableError(
            f"{technique} found no calibration sequence of {length} tokens (longest: {longest})",
            "lower seqlen or give longer calibration sequences",
        )
    return usable, f"{calibration.source} ({len(usable)} x {length} tokens, sha256 {calibration.fingerprint[:12]})"


def require_causal_lm(model: nn.Module, technique: str) -> None:
    from transformers import PreTrainedModel

    _layers.require_eager_float_module(model, technique)
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "generate"):
        raise TechniqueNotApplicableError(
            f"{technique} quantizes Hugging Face causal language models; this is a {type(model).__name__}",
            "load the model from its save_pretrained folder (e.g. an AutoModelForCausalLM)",
        )


def require_tokenizer(model: nn.Module, technique: str) -> Any:
    """The tokenizer in the model's source folder (auto-round needs it for pad tokens and writes it with the
    checkpoint)."""
    folder = hf_export.tokenizer_folder(model)
    if folder is None:
        where = getattr(model, "name_or_path", "") or "(unknown)"
        raise TechniqueNotApplicableError(
            f"{technique} needs the model's tokenizer, but the model's source folder {where!r} has none",
            "load the model from its save_pretrained folder that holds the tokenizer (tokenizer.json), so "
            "config._name_or_path points at it",
        )
    try:
        return hf_export.load_tokenizer(folder)
    except (OSError, ValueError, TypeError) as e:
        raise TechniqueNotApplicableError(
            f"{technique} could not load the tokenizer in {folder}: {e}", "save the tokenizer again"
        ) from e


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Freeze the objects that exist now out of the garbage collector's reach while a library runs.

    auto-round calls gc.collect() after every block; with transformers and torch loaded each call walks millions
    of objects (measured ~1 s each, half of a tiny model's quantization time). Objects created inside are
    collected as usual.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def block_progress(model: nn.Module, progress: Progress, stage: str) -> Iterator[None]:
    """Report which decoder block runs (auto-round tunes them one after another) and honour cancellation there."""
    from auto_round.utils import get_block_names

    names = [name for group in get_block_names(model) for name in group]
    total = len(names)

    def hook(index: int) -> Any:
        def report(_module: nn.Module, _args: Any) -> None:
            progress.update(stage, index, total, f"decoder block {index + 1}/{total}")

        return report

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(i)) for i, name in enumerate(names)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    progress.update(stage, total, total)


def run_autoround(
    model: nn.Module,
    settings: AutoRoundTechniqueConfig,
    context: ApplyContext,
    out_dir: Path,
    stage: str,
) -> tuple[Path, dict[str, Any]]:
    """Quantize `model` with auto-round and write the checkpoint into `out_dir`; returns (folder, details).

    Single-threaded with fixed seeds, so the same seed and data give the same checkpoint.
    """
    auto_round = import_auto_round(stage)
    tokenizer = require_tokenizer(model, stage)
    samples, source = calibration_token_ids(context, settings.nsamples, settings.seqlen, stage)
    start = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[]),
        torch_threads(1),
        quiet_gc(),
        block_progress(model, context.progress, stage),
    ):
        rounder = auto_round(
            model,
            tokenizer=tokenizer,
            scheme=f"W{settings.bits}A16",
            group_size=settings.group_size,
            sym=settings.sym,
            iters=settings.iters,
            nsamples=len(samples),
            seqlen=samples[0].shape[1],
            batch_size=1,
            dataset=samples,
            device_map="cpu",
            seed=context.seed,
            enable_torch_compile=False,  # compiling takes minutes on a small CPU and gains nothing at this size
        )
        try:
            _, folder = rounder.quantize_and_save(str(out_dir), format=_AUTO_ROUND_FORMAT[settings.export_format])
        except SystemExit as e:  # auto-round exits the process on some input errors; this must not
            raise TechniqueFailedError(
                f"auto-round stopped (exit {e.code}); see its log above", "check the calibration data and settings"
            ) from None
    details = {
        "calibration_source": source,
        "bits": settings.bits,
        "group_size": settings.group_size,
        "sym": settings.sym,
        "iters": settings.iters,
        "calibration_sequences": len(samples),
        "seqlen": samples[0].shape[1],
        "quantize_seconds": round(time.perf_counter() - start, 2),
        "auto_round": _version("auto-round"),
    }
    return Path(folder), details


def describe_quantized(model: nn.Module) -> dict[str, Any]:
    """What runs the packed layers: their kernel class, how many there are, which Linears stayed float, the dtype."""
    packed = [(n, m) for n, m in model.named_modules() if hasattr(m, "qweight")]
    kernels = sorted({f"{type(m).__module__}.{type(m).__name__}" for _, m in packed})
    config = getattr(model.config, "quantization_config", None)
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return {
        "layers_quantized": len(packed),
        "layers_kept_float": [n for n, m in model.named_modules() if type(m) is nn.Linear],
        "kernel": ", ".join(kernels),
        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantization_config": {
            k: v.value if isinstance(v, Enum) else v
            for k, v in as_dict.items()
            if isinstance(v, (str, int, float, bool, type(None)))
        },
    }


@contextlib.contextmanager
def scratch_dir(context: ApplyContext, name: str) -> Iterator[Path]:
    """A folder for the checkpoint: inside the run's workdir when there is one, else a temporary one."""
    if context.workdir is not None:
        folder = Path(context.workdir) / name
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=f"robopt-{name}-") as tmp:
        yield Path(tmp)


@register_technique
class AutoRoundTechnique(Technique):
    name = "autoround"
    family = "quantization"
    description = (
        "AutoRound weight-only INT4/INT8 (W4A16/W8A16) of a Hugging Face causal LM: rounding tuned on calibration "
        "text, packed weights; exports load with plain transformers. Smaller, but slower than fp32 on CPU."
    )
    config_cls = AutoRoundTechniqueConfig

    def availability(self) -> Availability:
        return _auto_round_probe()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return causal_lm_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, AutoRoundTechniqueConfig)
        ratio, note = estimate_weight_only(analysis, config.bits, config.group_size, speedup=MEASURED_CPU_SPEEDUP)
        return Estimate(
            size_ratio=ratio,
            speedup=MEASURED_CPU_SPEEDUP,
            accuracy_risk="medium" if config.bits == 4 else "low",
            note=note,
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, AutoRoundTechniqueConfig)
        avail = _auto_round_probe()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}")
        require_causal_lm(model, self.name)
        origin = hf_export.source_folder(model)
        with scratch_dir(context, self.name) as out_dir:
            folder, details = run_autoround(model, config, context, out_dir, self.name)
            quantized = hf_export.load_quantized_folder(type(model), folder, gptq_format=config.export_format == "gptq")
        hf_export.set_source_folder(quantized, origin)
        details |= describe_quantized(quantized) | {"export_format": config.export_format}
        if details["layers_quantized"] == 0:
            raise TechniqueFailedError(
                "auto-round quantized no layer of this model",
                "Linear input sizes must be multiples of 32 (and of group_size); check the decoder blocks",
            )
        return TechniqueResult(
            model=quantized,
            backend=f"{avail.backend}; kernel {details['kernel']}",
            notes=f"W{config.bits}A16 g{config.group_size} {config.export_format} checkpoint, "
            f"{details['calibration_source']}",
            details=details,
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, AutoRoundTechniqueConfig)
        if config.bits == 4 and config.group_size != 32:
            return config.model_copy(update={"group_size": 32})
        if config.bits == 4:
            return config.model_copy(update={"bits": 8, "group_size": 128, "sym": True})
        return None
