"""GPTQ (Hessian-based one-shot weight quantization) through gptqmodel, the maintained successor of auto-gptq.

auto-gptq 0.7.1 does not import with transformers 5 and refuses to quantize without CUDA; gptqmodel runs on CPU
but pins numpy/protobuf versions robopt's environment cannot take. So it runs in its own environment
(robopt.tools.isolated_env, `robopt backends install gptqmodel`) as a subprocess: the model goes there as a
save_pretrained folder, the calibration tokens as JSON, and a GPTQ checkpoint (quant_method "gptq", v1 layout) comes
back, which robopt loads with auto-round's CPU kernel (transformers' `AutoRoundConfig(backend="auto")`).

GPTQ-*format* checkpoints without gptqmodel: the `autoround` technique with export_format="gptq" (AutoRound's own
rounding, packed in the GPTQ layout).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.tools import hf_export, isolated_env
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
from robopt.tools.techniques.autoround import (
    WeightOnlySettings,
    calibration_token_ids,
    causal_lm_applicability,
    describe_quantized,
    estimate_weight_only,
    require_causal_lm,
    scratch_dir,
)

BACKEND = "gptqmodel"
# tiny-lm [1, 64], one thread, p50 of 100 interleaved calls: fp32 7.9 ms, gptqmodel's W4 g32 checkpoint (bfloat16)
# on auto-round's torch_zp kernel 21.0 ms.
GPTQ_CPU_SPEEDUP = 0.38

# Runs in gptqmodel's environment (no robopt there): `worker.py quantize JOB.json`, or `worker.py` alone to probe.
# GPTQMODEL_CPU_WORKERS=2: gptqmodel 7.6 sizes its CPU pool to (cores + 1) // 2 but its model loader asks for 2
# workers, and on a 2-core machine it fails with "Virtual pool 'model_loader:cpu' requests 2 workers but parent
# 'cpu' only has 1". offload_to_disk=False: the default offload made a 1M-parameter model take 237 s instead of 13 s.
WORKER = r'''
import json, sys, time


def quantize(model_dir, token_ids, settings, out_dir):
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(settings["seed"])
    from gptqmodel import GPTQModel, QuantizeConfig
    import gptqmodel

    config = QuantizeConfig(
        bits=settings["bits"],
        group_size=settings["group_size"],
        sym=settings["sym"],
        desc_act=False,
        damp_percent=settings["damp_percent"],
        offload_to_disk=False,
    )
    model = GPTQModel.load(model_dir, config, device="cpu")
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in token_ids]
    start = time.perf_counter()
    model.quantize(calibration, batch_size=1, calibration_data_min_length=min(len(t) for t in token_ids))
    seconds = time.perf_counter() - start
    model.save(out_dir)
    return {"quantize_s": round(seconds, 2), "gptqmodel": gptqmodel.__version__, "torch": torch.__version__}


def probe():
    """Quantize a tiny random Llama (with its own word-level tokenizer) on CPU and run the result."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(256)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained("tiny")
    tokenizer.save_pretrained("tiny")
    ids = [torch.randint(2, 256, (32,)).tolist() for _ in range(8)]
    settings = {"bits": 4, "group_size": 32, "sym": True, "damp_percent": 0.05, "seed": 0}
    result = quantize("tiny", ids, settings, "tiny-gptq")
    from gptqmodel import GPTQModel

    quantized = GPTQModel.load("tiny-gptq", device="cpu")
    with torch.no_grad():
        logits = quantized.model(torch.tensor([ids[0]])).logits
    if not torch.isfinite(logits).all():
        raise SystemExit("the quantized probe model returned non-finite logits")
    return result


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(json.dumps(probe()))
    else:
        job = json.loads(open(sys.argv[2]).read())
        print(json.dumps(quantize(job["model_dir"], job["token_ids"], job["settings"], job["out_dir"])))
'''

isolated_env.register_backend(
    isolated_env.BackendSpec(
        name=BACKEND,
        description="GPTQ quantization (gptqmodel, the maintained successor of auto-gptq) for the `gptq` technique",
        packages=("gptqmodel",),
        probe=WORKER,
        run_env={"GPTQMODEL_CPU_WORKERS": "2", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"},
    )
)


class GptqConfig(WeightOnlySettings):
    """GPTQ settings (gptqmodel's QuantizeConfig): bits, group size, symmetry, Hessian dampening, calibration."""

    damp_percent: float = Field(
        default=0.05, gt=0.0, le=0.5, description="Dampening added to the Hessian diagonal (fraction of its mean)."
    )
    timeout_s: int = Field(default=1800, ge=60, le=6 * 3600, description="Stop the gptqmodel subprocess after this.")


def _availability() -> Availability:
    status = isolated_env.backend_status(BACKEND)
    if not status.available:
        return Availability(False, status.reason)
    versions = status.record.get("probe", {})
    return Availability(
        True,
        backend=f"gptqmodel {versions.get('gptqmodel', '?')} (isolated environment, torch {versions.get('torch', '?')})"
        "; inference: auto-round CPU kernel auto_round:torch_zp",
    )


@register_technique
class GptqTechnique(Technique):
    name = "gptq"
    family = "quantization"
    description = (
        "GPTQ weight-only INT4/INT8 of a Hugging Face causal LM through gptqmodel (optional isolated environment: "
        "`robopt backends install gptqmodel`); GPTQ checkpoint, runs on CPU through auto-round's kernel, slower "
        "than fp32 there."
    )
    config_cls = GptqConfig

    def availability(self) -> Availability:
        return _availability()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return causal_lm_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, GptqConfig)
        ratio, note = estimate_weight_only(
            analysis, config.bits, config.group_size, speedup=GPTQ_CPU_SPEEDUP, compute_dtype="bfloat16"
        )
        return Estimate(ratio, GPTQ_CPU_SPEEDUP, "medium" if config.bits == 4 else "low", note)

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, GptqConfig)
        avail = _availability()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use `autoround`")
        require_causal_lm(model, self.name)
        origin = hf_export.source_folder(model)
        if hf_export.tokenizer_folder(model) is None:
            raise TechniqueNotApplicableError(
                f"{self.name} needs the model's tokenizer folder; {getattr(model, 'name_or_path', '')!r} has none",
                "load the model from its save_pretrained folder that holds the tokenizer",
            )
        samples, source = calibration_token_ids(context, config.nsamples, config.seqlen, self.name)
        with scratch_dir(context, self.name) as work:
            context.progress.message(self.name, "writing the model for gptqmodel")
            model_dir = hf_export.export_hf_folder(model, work / "input")
            job = {
                "model_dir": str(model_dir),
                "out_dir": str(work / "output"),
                "token_ids": [t[0].tolist() for t in samples],
                "settings": {
                    "bits": config.bits,
                    "group_size": config.group_size,
                    "sym": config.sym,
                    "damp_percent": config.damp_percent,
                    "seed": context.seed,
                },
            }
            (work / "job.json").write_text(json.dumps(job))
            start = time.perf_counter()
            done = isolated_env.run_in_backend(
                BACKEND,
                WORKER,
                ["quantize", str(work / "job.json")],
                progress=context.progress,
                stage=self.name,
                timeout_s=config.timeout_s,
                cwd=work,
            )
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                raise TechniqueFailedError(
                    f"gptqmodel failed (exit {done.returncode}): {done.output[-2000:]}",
                    "see the output above; `robopt backends list` shows whether the environment still works",
                )
            worker = isolated_env.last_json_line(done.output)
            out_dir = work / "output"
            _prepare_for_auto_round(out_dir, config.group_size)
            quantized = hf_export.load_quantized_folder(type(model), out_dir, gptq_format=True)
        hf_export.set_source_folder(quantized, origin)
        details: dict[str, Any] = {
            "bits": config.bits,
            "group_size": config.group_size,
            "sym": config.sym,
            "damp_percent": config.damp_percent,
            "calibration_sequences": len(samples),
            "seqlen": samples[0].shape[1],
            "subprocess_seconds": round(elapsed, 1),
            **{k: v for k, v in worker.items() if isinstance(v, (str, int, float))},
        }
        details |= describe_quantized(quantized)
        return TechniqueResult(
            model=quantized,
            backend=f"{avail.backend}; kernel {details['kernel']}",
            notes=f"GPTQ W{config.bits}A16 g{config.group_size} by gptqmodel, {source}",
            details=details,
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, GptqConfig)
        if config.bits == 4 and config.group_size != 32:
            return config.model_copy(update={"group_size": 32})
        if config.bits == 4:
            return config.model_copy(update={"bits": 8, "group_size": 128, "sym": True})
        return None


def _prepare_for_auto_round(folder: Path, group_size: int) -> None:
    """Make gptqmodel's checkpoint loadable by auto-round's kernel, or fail saying why.

    transformers' AutoRoundConfig refuses any GPTQ config that has a "meta" entry (it takes it for GPTQ v2), but
    gptqmodel writes its provenance there for v1 checkpoints too: it is dropped from config.json (quantize_config.json
    keeps it). auto-round's kernel ignores g_idx, so the checkpoint must not reorder input channels.
    """
    from safetensors import safe_open

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TechniqueFailedError(f"gptqmodel wrote no config.json into {folder}", "see its output above")
    config = json.loads(config_path.read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("checkpoint_format", "gptq") != "gptq" or quant.get("desc_act"):
        raise TechniqueFailedError(
            f"gptqmodel wrote a checkpoint robopt cannot run on CPU (format {quant.get('checkpoint_format')!r}, "
            f"desc_act {quant.get('desc_act')})",
            "this gptqmodel version changed its defaults; reinstall the backend",
        )
    quant.pop("meta", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open objects are not iterable)
                if key.endswith(".g_idx"):
                    g_idx = f.get_tensor(key)
                    expected = (
                        (g_idx.new_ones(g_idx.shape).cumsum(0) - 1) // group_size if group_size > 0 else 0 * g_idx
                    )
                    if not bool((g_idx == expected).all()):
                        raise TechniqueFailedError(
                            f"gptqmodel reordered the input channels of {key.removesuffix('.g_idx')} (non-trivial "
                            "g_idx), which auto-round's CPU kernel ignores",
                            "report this: robopt asks gptqmodel for desc_act=False",
                        )
