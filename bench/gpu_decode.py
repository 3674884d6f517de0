"""Batch-1 decode latency of an OpenVLA-7B-shaped Llama backbone on a GPU, per weight format, against the roofline.

Issue 4, item 6. Runs only where a CUDA GPU is lent (never in CI); it does not import robopt, so it runs under any
python with torch and transformers (plus bitsandbytes / torchao where they are importable).

What it measures, for each weight format of the 224 decoder Linear layers (lm_head, embeddings and norms stay BF16):
- ``graph_ms``: one decode step (token at position ``--context``) captured in a CUDA graph and replayed: the kernels
  alone, no Python launch overhead. This is what the roofline is compared with.
- ``eager_ms``: the same step run eagerly (what plain PyTorch code pays per token, launch overhead included).
- ``hf_eager_ms``: ``LlamaForCausalLM.forward`` with a DynamicCache, one token at a time (what plain transformers pays).
- ``prefill_ms``: ``forward`` over the whole ``--context``-token prompt (OpenVLA's 256 image patches plus text).
- ``roofline_ms``: bytes a decode step must read (weights in their stored format + KV cache) / copy bandwidth measured
  in the same run. ``roofline_fraction`` = roofline_ms / graph_ms.
- ``action_ms``: prefill + 7 decode steps (OpenVLA emits 7 action tokens per control step) and the control rate it
  allows.
Weights are random (speed does not depend on the values). Correctness of the static decode step is checked against
``LlamaForCausalLM.forward`` on the same weights (``step_vs_hf_rel_err``); quantization error against the BF16 logits is
``logits_rel_err_vs_bf16``.

    python bench/gpu_decode.py --out bench/results/gpu_decode.json             # OpenVLA-7B shape, CUDA
    python bench/gpu_decode.py --tiny --device cpu --out /tmp/gpu_decode.json  # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# OpenVLA-7B's language backbone is Llama-2-7B with the vocabulary padded to 32064.
OPENVLA_7B = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
TINY = OPENVLA_7B | {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip
ACTION_TOKENS = 7
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StaticDecoder:
    """One decode step of a HF Llama with a preallocated KV cache and device-side position: CUDA-graph capturable.

    It calls the model's own modules (norms, rotary embedding, projections, MLP), so swapped-in quantized Linear
    layers are what runs.
    """

    def __init__(self, model: LlamaForCausalLM, max_len: int) -> None:
        cfg = model.config
        self.model = model
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
        shape = (cfg.num_hidden_layers, 1, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, device=dev, dtype=dt)
        self.v = torch.zeros(shape, device=dev, dtype=dt)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.arange(max_len, device=dev)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        m = self.model.model
        x = m.embed_tokens(self.token)
        cos, sin = m.rotary_emb(x, self.pos.view(1, 1))
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            o = F.scaled_dot_product_attention(
                q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=self.kv_heads != self.heads
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x))[:, -1].float()

    def prefill(self, ids: torch.Tensor, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Feed the prompt one token at a time through ``step`` (eager or graph replay); returns the last logits."""
        out = None
        for p in range(ids.shape[1]):
            self.token.fill_(int(ids[0, p]))
            self.pos.fill_(p)
            out = step().clone()
        return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str, reps: int, warmup: int = 3) -> float:
    """Median wall time of one call, in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, gib: float) -> dict[str, float]:
    """Device-to-device copy bandwidth, counting bytes read plus written (the roofline's ceiling)."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10)
    return {"copy_gib": gib, "copy_ms": ms, "bytes_per_s": 2 * n * 4 / (ms / 1e3)}


def tensor_bytes(t: torch.Tensor) -> int:
    """Stored bytes of a tensor, looking inside tensor subclasses (torchao) that hold their data in inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(mod: torch.nn.Module) -> int:
    total = sum(tensor_bytes(p) for p in mod.parameters()) + sum(tensor_bytes(b) for b in mod.buffers())
    weight = getattr(mod, "weight", None)
    scb = getattr(weight, "SCB", None)  # bitsandbytes int8 row scales
    total += tensor_bytes(scb) if isinstance(scb, torch.Tensor) else 0
    qs = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit absmax / nested state
    while qs is not None:
        total += sum(tensor_bytes(v) for v in (qs.absmax, qs.code) if isinstance(v, torch.Tensor))
        qs = getattr(qs, "state2", None)
    return total


def step_bytes(model: LlamaForCausalLM, context: int) -> int:
    """Bytes one decode step must read: decoder weights as stored, lm_head, norms, one embedding row, the KV cache."""
    cfg = model.config
    layers = sum(module_bytes(layer) for layer in model.model.layers)
    head = module_bytes(model.lm_head) + module_bytes(model.model.norm)
    emb_row = cfg.hidden_size * model.model.embed_tokens.weight.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * 2
    return layers + head + emb_row + kv


# ---------------------------------------------------------------- weight formats


def decoder_linears(model: LlamaForCausalLM) -> list[tuple[torch.nn.Module, str]]:
    return [(getattr(layer, owner), name) for layer in model.model.layers for owner, name in LINEARS]


def swap_linears(model: LlamaForCausalLM, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> Callable[[], None]:
    """Replace every decoder Linear by make(linear); returns the function that puts the originals back."""
    originals = []
    for owner, name in decoder_linears(model):
        lin = getattr(owner, name)
        originals.append((owner, name, lin))
        setattr(owner, name, make(lin))

    def restore() -> None:
        for owner, name, lin in originals:
            setattr(owner, name, lin)

    restore.originals = [lin for _, _, lin in originals]  # type: ignore[attr-defined]
    return restore


def bnb_int8(threshold: float) -> Callable[[LlamaForCausalLM], Callable[[], None]]:
    def apply(model: LlamaForCausalLM) -> Callable[[], None]:
        import bitsandbytes as bnb

        def make(lin: torch.nn.Linear) -> torch.nn.Module:
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=threshold
            )
            w = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            q.weight = w._quantize(lin.weight.device)  # int8_vectorwise_quant where the weight lives (no host trip)
            return q.to(lin.weight.device)

        return swap_linears(model, make)

    return apply


def bnb_4bit(quant_type: str) -> Callable[[LlamaForCausalLM], Callable[[], None]]:
    def apply(model: LlamaForCausalLM) -> Callable[[], None]:
        import bitsandbytes as bnb

        def make(lin: torch.nn.Linear) -> torch.nn.Module:
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type
            )
            w = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type, module=q)
            q.weight = w._quantize(lin.weight.device)  # quantize_4bit where the weight lives (no host trip)
            return q.to(lin.weight.device)

        return swap_linears(model, make)

    return apply


def torchao(config_name: str, **kwargs: Any) -> Callable[[LlamaForCausalLM], Callable[[], None]]:
    def apply(model: LlamaForCausalLM) -> Callable[[], None]:
        import torchao.quantization as tq

        config = getattr(tq, config_name)(set_inductor_config=False, **kwargs)

        def make(lin: torch.nn.Linear) -> torch.nn.Module:
            q = torch.nn.Linear(lin.in_features, lin.out_features, bias=False, device="meta")
            q.weight = torch.nn.Parameter(lin.weight.data.clone(), requires_grad=False)
            tq.quantize_(q, config)
            return q

        return swap_linears(model, make)

    return apply


FORMATS: dict[str, tuple[str, Callable[[LlamaForCausalLM], Callable[[], None]] | None]] = {
    "bf16": ("torch nn.Linear (cuBLAS)", None),
    "bnb_int8_no_outliers": ("bitsandbytes Linear8bitLt, threshold 0 (int8 GEMM only)", bnb_int8(0.0)),
    "torchao_int8_weight_only": (
        "torchao Int8WeightOnlyConfig per-row (eager dispatch)",
        torchao("Int8WeightOnlyConfig"),
    ),
    "bnb_nf4": ("bitsandbytes Linear4bit NF4, blocksize 64, bf16 compute", bnb_4bit("nf4")),
    "bnb_fp4": ("bitsandbytes Linear4bit FP4, blocksize 64, bf16 compute", bnb_4bit("fp4")),
    "torchao_int4_tinygemm": (
        "torchao Int4WeightOnlyConfig group 128, tile_packed_to_4d (aten._weight_int4pack_mm, tinygemm)",
        torchao("Int4WeightOnlyConfig", group_size=128, int4_packing_format="tile_packed_to_4d"),
    ),
    "bnb_int8_llm_int8": ("bitsandbytes Linear8bitLt, outlier threshold 6.0 (LLM.int8)", bnb_int8(6.0)),
}

UNAVAILABLE = {
    "gptqmodel_marlin": (
        "gptqmodel publishes no binary wheel on PyPI (source only); its CUDA kernels (Marlin, ExLlama) must be compiled"
        " against the machine's torch, and the lent GPU machine has no network and a 15-minute lease, so it could not"
        " be built there. INT4 Marlin figures are therefore missing; torchao's tinygemm INT4 stands for group-wise"
        " INT4."
    ),
}


# ---------------------------------------------------------------- measurement


def hf_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -1].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(model: LlamaForCausalLM, args: argparse.Namespace, ref: torch.Tensor | None) -> dict[str, Any]:
    device = args.device
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context + 1), generator=gen).to(device)
    prompt, nxt = ids[:, :-1], ids[:, -1:]
    row: dict[str, Any] = {}

    row["prefill_ms"] = time_ms(lambda: hf_logits(model, prompt), device, reps=5, warmup=2)

    cache_state: dict[str, Any] = {}

    def hf_token() -> None:  # one HF decode step after the prompt, cache rolled back to the prompt each time
        cache = cache_state["cache"]
        extra = cache.get_seq_length() - args.context
        if extra > 0:
            cache.crop(-extra)
        with torch.no_grad():
            model(input_ids=nxt, past_key_values=cache_state["cache"], use_cache=True)

    with torch.no_grad():
        try:
            cache_state["cache"] = DynamicCache(config=model.config)
        except TypeError:  # older transformers
            cache_state["cache"] = DynamicCache()
        model(input_ids=prompt, past_key_values=cache_state["cache"], use_cache=True)
    row["hf_eager_ms"] = time_ms(hf_token, device, reps=args.reps)
    del cache_state["cache"]

    dec = StaticDecoder(model, max_len=args.context + 8)
    dec.prefill(prompt, dec.step)
    dec.token.copy_(nxt.view(1, 1))
    dec.pos.fill_(args.context)
    row["eager_ms"] = time_ms(dec.step, device, reps=args.reps)
    logits = dec.step()
    full = hf_logits(model, ids)
    row["step_vs_hf_rel_err"] = rel_err(logits, full)
    if ref is not None:
        row["logits_rel_err_vs_bf16"] = rel_err(logits, ref)

    if device == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    dec.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = dec.step()
            row["graph_ms"] = time_ms(graph.replay, device, reps=args.graph_reps, warmup=5)
            graph.replay()
            torch.cuda.synchronize()
            row["graph_vs_eager_rel_err"] = rel_err(static_out, logits)
            del graph
        except Exception as exc:  # a kernel that syncs with the host or allocates cannot be captured
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:400]
            torch.cuda.synchronize()
    return {**row, "logits": logits}


def layer_checks(model: LlamaForCausalLM, originals: list[torch.nn.Module], device: str) -> dict[str, Any]:
    """Output error of each quantized Linear of the first decoder layer against its BF16 original, batch 1 (GEMV
    kernels) and batch 8 (GEMM / dequantize paths), on random inputs: random weights make whole-model logits chaotic,
    so this is the meaningful accuracy check of a kernel."""
    gen = torch.Generator().manual_seed(2)  # CPU RNG: a failed CUDA graph capture leaves the CUDA RNG unusable
    out: dict[str, Any] = {}
    dtype = model.lm_head.weight.dtype
    for (owner, name), ref in zip(decoder_linears(model)[: len(LINEARS)], originals, strict=False):
        q = getattr(owner, name)
        for rows in (1, 8):
            x = torch.randn(1, rows, ref.in_features, generator=gen).to(device, dtype)
            with torch.no_grad():
                y, y_ref = q(x).float(), ref(x).float()
            out.setdefault(f"rows{rows}", {})[name] = {"rel_err": rel_err(y, y_ref), "nan": bool(y.isnan().any())}
    for rows in (1, 8):
        errs = [v["rel_err"] for v in out[f"rows{rows}"].values()]
        out[f"rows{rows}_max_rel_err"] = max(errs)
    return out


def linears_only(model: LlamaForCausalLM, device: str, bw: float | None, reps: int) -> dict[str, Any]:
    """The 224 decoder Linear layers alone at batch 1, captured in one CUDA graph: weight-streaming kernels without the
    norms, rotary, attention and residual kernels of a full step."""
    mods = [getattr(owner, name) for owner, name in decoder_linears(model)]
    dtype = model.lm_head.weight.dtype
    gen = torch.Generator().manual_seed(3)
    inputs = {m.in_features: torch.randn(1, 1, m.in_features, generator=gen).to(device, dtype) for m in mods}

    def run() -> None:
        with torch.no_grad():
            for m in mods:
                m(inputs[m.in_features])

    row: dict[str, Any] = {"linears_bytes": sum(module_bytes(m) for m in mods)}
    if bw:
        row["linears_roofline_ms"] = row["linears_bytes"] / bw * 1e3
    if device != "cuda":
        return row
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        row["linears_graph_ms"] = time_ms(graph.replay, device, reps=reps, warmup=5)
        if bw:
            row["linears_roofline_fraction"] = row["linears_roofline_ms"] / row["linears_graph_ms"]
        del graph
    except Exception as exc:
        row["linears_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.synchronize()
    return row


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "bitsandbytes", "torchao"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:
            env[name] = f"not importable: {type(exc).__name__}: {exc}"[:200]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
    else:
        env["device"] = platform.processor() or platform.machine()
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script, measures nothing useful")
    ap.add_argument("--context", type=int, default=280, help="prompt tokens before the timed step (OpenVLA: ~280)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--graph-reps", type=int, default=100)
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of: " + ",".join(FORMATS))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this bench measures GPU decode and runs only where a GPU is lent", file=sys.stderr)
        return 2
    unknown = set(args.formats.split(",")) - set(FORMATS)
    if unknown:
        ap.error(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    result: dict[str, Any] = {
        "bench": "gpu_decode",
        "model": "OpenVLA-7B-shaped Llama-2 backbone, random weights" if not args.tiny else "tiny 2-layer Llama",
        "config": TINY if args.tiny else OPENVLA_7B,
        "dtype": str(dtype),
        "context_tokens": args.context,
        "action_tokens": ACTION_TOKENS,
        "environment": environment(args.device),
        "formats": {},
        "unavailable": UNAVAILABLE,
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if args.device == "cuda":
        result["bandwidth"] = copy_bandwidth("cuda", 4.0)
        log(f"copy bandwidth {result['bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = LlamaConfig(**(TINY if args.tiny else OPENVLA_7B))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no FP32 copy of 7B weights
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.requires_grad_(False)
    log(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params in {time.perf_counter() - t0:.1f}s")
    save()

    ref = None
    for name in args.formats.split(","):
        backend, apply = FORMATS[name]
        log(f"{name}: {backend}")
        entry: dict[str, Any] = {"backend": backend}
        restore = None
        try:
            t0 = time.perf_counter()
            restore = apply(model) if apply else None
            sync(args.device)
            entry["convert_s"] = round(time.perf_counter() - t0, 2)
            entry["step_bytes"] = step_bytes(model, args.context)
            if restore:
                entry["layer_checks"] = layer_checks(model, restore.originals, args.device)
            bw = result.get("bandwidth", {}).get("bytes_per_s")
            entry.update(linears_only(model, args.device, bw, args.graph_reps))
            row = measure(model, args, ref)
            logits = row.pop("logits")
            if name == "bf16":
                ref = logits
            entry.update(row)
            if bw:
                entry["roofline_ms"] = entry["step_bytes"] / bw * 1e3
                if "graph_ms" in entry:
                    entry["roofline_fraction"] = entry["roofline_ms"] / entry["graph_ms"]
            best = entry.get("graph_ms", entry["eager_ms"])
            entry["action_ms"] = entry["prefill_ms"] + ACTION_TOKENS * best
            entry["action_hz"] = 1e3 / entry["action_ms"]
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:600]
            entry["traceback"] = traceback.format_exc()[-1500:]
        finally:
            if restore:
                restore()
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        result["formats"][name] = entry
        save()
        log(json.dumps({k: v for k, v in entry.items() if k != "traceback"}))

    base = result["formats"].get("bf16", {})
    for entry in result["formats"].values():
        for key in ("graph_ms", "eager_ms", "hf_eager_ms", "step_bytes"):
            if key in entry and key in base:
                entry[f"{key}_vs_bf16"] = entry[key] / base[key]
    save()
    heads = ("MB/step", "graph ms", "roof ms", "roof%", "lin ms", "lin%", "eager", "hf", "prefill", "act Hz")
    heads += ("err1", "err8")
    print(f"\n{'format':28s} " + " ".join(f"{h:>8s}" for h in heads))
    for name, e in result["formats"].items():
        if "error" in e:
            print(f"{name:28s} ERROR {e['error'][:100]}")
            continue
        nan, checks = float("nan"), e.get("layer_checks", {})
        cells = (e["step_bytes"] / 1e6, e.get("graph_ms", nan), e.get("roofline_ms", nan),
                 100 * e.get("roofline_fraction", nan), e.get("linears_graph_ms", nan),
                 100 * e.get("linears_roofline_fraction", nan), e["eager_ms"], e["hf_eager_ms"], e["prefill_ms"],
                 e["action_hz"], checks.get("rows1_max_rel_err", 0.0),
                 checks.get("rows8_max_rel_err", 0.0))  # fmt: skip
        print(f"{name:28s} " + " ".join(f"{c:8.3f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
