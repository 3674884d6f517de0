"""tiny-lm: a small Llama-architecture causal LM with its own byte-level BPE, trained offline on stdlib sources.

The training text is the Python standard library's own code and docstrings (robopt.evaluation.text_corpus);
a fixed set of modules is held out for the perplexity and lm-eval evaluators.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from robopt.domain.records import InputSpec, TensorSpec
from robopt.evaluation.base import EvaluatorSpec
from robopt.evaluation.text_corpus import CORPUS_NAME, TRAIN_MODULES, corpus_text, module_source
from robopt.progress import Progress
from robopt.tools.threads import torch_threads
from robopt.zoo.cards import ZooEntry, register_entry

VOCAB_SIZE = 2048
SPECIAL_TOKEN = "<|endoftext|>"  # begin/end of a document and padding; id 0
MAX_POSITIONS = 256
# Linear dimensions are multiples of 32 so every weight-only quantizer (AutoRound included) takes every layer.
MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": MAX_POSITIONS,
}
TRAIN_STEPS = 600
BATCH_SIZE = 16
SEQUENCE_LENGTH = 128
LEARNING_RATE = 4e-3
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.1


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE trained on the training modules, wrapped as a transformers PreTrainedTokenizerFast.

    Byte-level: every string encodes (no unknown tokens); the BPE trainer is deterministic for a fixed input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([module_source(name) for name in TRAIN_MODULES], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=MAX_POSITIONS,
    )


def tiny_lm_config(tokenizer: Any) -> Any:
    """The LlamaConfig of tiny-lm for `tokenizer` (vocabulary size and special token ids)."""
    from transformers import LlamaConfig

    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
        tie_word_embeddings=False,
        **MODEL_CONFIG,
    )


def untrained_tiny_lm(seed: int, tokenizer: Any) -> Any:
    """A freshly initialized tiny-lm (the baseline that training must beat); global RNG state is preserved."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_lm_config(tokenizer)).eval()


def training_tokens(tokenizer: Any) -> torch.Tensor:
    """The training modules as one stream of token ids, each module closed by the end-of-text token."""
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    ids: list[int] = []
    for name in TRAIN_MODULES:
        ids.extend(tokenizer(module_source(name), add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(special)
    return torch.tensor(ids, dtype=torch.long)


def train_tiny_lm(seed: int, progress: Progress, tokenizer: Any, steps: int = TRAIN_STEPS) -> Any:
    """Train tiny-lm with AdamW (warm-up, cosine decay) on random windows of the training stream.

    Single-threaded with fixed seeds, so the same seed gives the same weights; one progress event per step.
    """
    tokens = training_tokens(tokenizer)
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        model = untrained_tiny_lm(seed, tokenizer).train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LEARNING_RATE,
            betas=(0.9, 0.95),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
        order = torch.Generator().manual_seed(seed)
        progress.update("train", 0, steps)
        for step in range(1, steps + 1):
            starts = torch.randint(0, len(tokens) - SEQUENCE_LENGTH, (BATCH_SIZE,), generator=order)
            batch = torch.stack([tokens[s : s + SEQUENCE_LENGTH] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            progress.update("train", step, steps, message=f"loss {loss.item():.3f}")
    return model.eval()


def _lr_factor(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    done = (step - WARMUP_STEPS) / max(steps - WARMUP_STEPS, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def build_tiny_lm_folder(seed: int, progress: Progress, out_dir: Path) -> None:
    """Train the tokenizer and the model, and save both with save_pretrained into `out_dir`."""
    progress.message("tokenizer", f"training a {VOCAB_SIZE}-token byte-level BPE on {len(corpus_text('train'))} chars")
    tokenizer = train_tokenizer()
    model = train_tiny_lm(seed, progress, tokenizer)
    progress.message("save", f"saving tiny-lm to {out_dir}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


register_entry(
    ZooEntry(
        name="tiny-lm",
        description="Small Llama-architecture causal LM (2 layers, hidden 128, 2k byte-level BPE, 1M parameters) "
        "trained offline on the Python standard library's sources; judged by perplexity on held-out stdlib modules.",
        architecture="transformers:LlamaForCausalLM",
        kind="hf-folder",
        family="decoder-llm",
        input_spec=InputSpec(
            inputs=[TensorSpec(name="input_ids", shape=[1, 64], dtype="int64", high=VOCAB_SIZE)], source="zoo"
        ),
        evaluator=EvaluatorSpec(name="perplexity", dataset=CORPUS_NAME, options={"model_dir": None}),
        suggested_criteria={"max_size": "50%", "max_accuracy_drop": "5%rel"},
        seed=0,
        build_folder=build_tiny_lm_folder,
    )
)
