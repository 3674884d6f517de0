"""Architecture family detection (cnn, mlp-policy, transformer-encoder, decoder-llm, VLA) from a model's structure.

The rules, checked in this order; the first that matches wins:

1. vision-language-action: a vision encoder (a convolution, a patch embedding, or a submodule named
   vision*/visual*/image*/img*/vit*/patch_embed*) AND a language/transformer backbone (an embedding
   table AND attention blocks) AND an action head (a submodule whose name contains "action").
   An HF config whose model_type or architectures name a known VLA (openvla, prismatic, pi0, smolvla,
   ...ForActionPrediction) also counts.
2. decoder-llm: an HF config whose architectures end in ForCausalLM/LMHeadModel or that says
   is_decoder, a root class named ...ForCausalLM, or structurally an embedding + attention + `lm_head`.
3. transformer-encoder: an HF config of an encoder model type (bert, roberta, vit, ...) or an
   encoder-task head (ForMaskedLM, ForSequenceClassification, ...), or any attention block
   (MultiheadAttention, TransformerEncoderLayer, or a class named *Attention*).
4. cnn: convolutions are at least 30% of the parameterized layers, or hold at least 30% of the parameters.
5. mlp-policy: every layer is a linear layer (quantized variants included), an activation, a
   normalization, dropout, flatten/unflatten or identity, with at least one linear layer.
6. unknown: anything else; the evidence lists the layer types that did not fit.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from robopt.domain.analysis import ArchitectureFamily

if TYPE_CHECKING:
    from robopt.tools.analysis import LayerInfo

_VISION_NAME = re.compile(r"(^|[._])(vision|visual|image|img|vit|patch_embed|pixel)", re.IGNORECASE)
_ACTION_NAME = re.compile(r"action", re.IGNORECASE)
_LM_HEAD_NAME = re.compile(r"(^|\.)lm_head$")
_ATTENTION_CLASSES = {"MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer"}

_VLA_MODEL_TYPES = {"openvla", "prismatic", "pi0", "pi0fast", "smolvla", "octo", "rt1", "rt2"}
_ENCODER_MODEL_TYPES = frozenset(
    [
        "bert",
        "roberta",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "xlm-roberta",
        "mpnet",
        "camembert",
        "modernbert",
        "ernie",
        "mobilebert",
        "squeezebert",
        "funnel",
        "layoutlm",
        "vit",
        "deit",
        "beit",
        "dinov2",
        "swin",
        "siglip_vision_model",
        "clip_vision_model",
        "data2vec-vision",
        "wav2vec2",
        "hubert",
    ]
)
_ENCODER_HEADS = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForImageClassification",
    "ForPreTraining",
)
_DECODER_HEADS = ("ForCausalLM", "LMHeadModel")

_ACTIVATIONS = frozenset(
    [
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "RReLU",
        "ELU",
        "SELU",
        "CELU",
        "GELU",
        "SiLU",
        "Mish",
        "Tanh",
        "Sigmoid",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "Softplus",
        "Softsign",
        "Softmax",
        "LogSoftmax",
        "Tanhshrink",
        "Threshold",
        "GLU",
        "LogSigmoid",
        "Softmin",
    ]
)
_NORMS = frozenset(
    ["LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "GroupNorm", "InstanceNorm1d", "LocalResponseNorm"]
)
_PASSIVE = {"Dropout", "Dropout1d", "AlphaDropout", "Flatten", "Unflatten", "Identity", "QuantStub", "DeQuantStub"}

CNN_SHARE = 0.3


def is_linear_kind(kind: str) -> bool:
    """Linear layers and their quantized forms (DynamicQuantizedLinear, Linear4bit, Linear8bitLt, QLinear...)."""
    return "Linear" in kind


def is_conv_kind(kind: str) -> bool:
    return "Conv" in kind


def is_embedding_kind(kind: str) -> bool:
    # Rotary/positional "embeddings" without a table are not token embeddings.
    return "Embedding" in kind and "Rotary" not in kind


def hf_config_of(module: nn.Module, hf_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The explicit config, else the module's own HF `config` (transformers models carry one)."""
    if hf_config is not None:
        return dict(hf_config)
    config = getattr(module, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def detect_family(module: nn.Module, hf_config: Mapping[str, Any] | None = None) -> tuple[ArchitectureFamily, str]:
    """The architecture family of `module` and a one-line evidence string (see the module docstring for rules)."""
    from robopt.tools.analysis import module_tree, walk_layers  # analysis imports this module

    layers, _ = walk_layers(module)
    return classify_family(layers, module_tree(module), hf_config_of(module, hf_config), type(module).__name__)


def classify_family(
    layers: Sequence[LayerInfo],
    modules: Sequence[tuple[str, str]],
    hf_config: Mapping[str, Any] | None,
    root_class: str,
) -> tuple[ArchitectureFamily, str]:
    """Apply the rules to already-collected facts: census layers, every (name, kind) in the tree, the HF config."""
    names = [name for name, _ in modules if name]
    kinds = Counter(kind for _, kind in modules)
    layer_kinds = Counter(layer.kind for layer in layers if layer.in_census)

    attention = sorted(k for k in kinds if k in _ATTENTION_CLASSES or "Attention" in k)
    embeddings = sorted(k for k in layer_kinds if is_embedding_kind(k))
    convs = sorted(k for k in layer_kinds if is_conv_kind(k))
    vision_names = [n for n in names if _VISION_NAME.search(n)]
    action_names = [n for n in names if _ACTION_NAME.search(n.rsplit(".", 1)[-1])]
    lm_head = any(_LM_HEAD_NAME.search(n) for n in names)

    model_type = str((hf_config or {}).get("model_type") or "").lower()
    architectures = [str(a) for a in (hf_config or {}).get("architectures") or []]

    # 1. vision-language-action
    vision = bool(convs or vision_names or any("PatchEmbed" in k or "Vision" in k for k in kinds))
    backbone = bool(embeddings and attention)
    if vision and backbone and action_names:
        what = f"convolutions ({', '.join(convs)})" if convs else f"submodule {_first(vision_names)}"
        return (
            "vision-language-action",
            f"vision encoder ({what}) + language backbone ({_first(embeddings)} + {_first(attention)}) "
            f"+ action head ({_first(action_names)})",
        )
    if model_type in _VLA_MODEL_TYPES or any("ActionPrediction" in a or "VLA" in a for a in architectures):
        return "vision-language-action", f"HF config model_type={model_type!r} architectures={architectures}"

    # 2. decoder-llm
    if any(a.endswith(_DECODER_HEADS) for a in architectures):
        return "decoder-llm", f"HF config architectures={architectures}"
    if (hf_config or {}).get("is_decoder") and not (hf_config or {}).get("is_encoder_decoder"):
        return "decoder-llm", f"HF config is_decoder=True (model_type={model_type!r})"
    if root_class.endswith(_DECODER_HEADS):
        return "decoder-llm", f"model class {root_class}"
    if backbone and lm_head:
        return "decoder-llm", f"{_first(embeddings)} + attention ({_first(attention)}) + lm_head"

    # 3. transformer-encoder
    if model_type in _ENCODER_MODEL_TYPES:
        return "transformer-encoder", f"HF config model_type={model_type!r} (an encoder model type)"
    if any(a.endswith(_ENCODER_HEADS) for a in architectures):
        return "transformer-encoder", f"HF config architectures={architectures} (an encoder task head)"
    if attention:
        count = sum(kinds[k] for k in attention)
        return "transformer-encoder", f"{count} attention modules ({', '.join(attention)}) without an lm_head"

    # 4. cnn
    weighted = [layer for layer in layers if layer.in_census and layer.params > 0]
    conv_layers = [layer for layer in weighted if is_conv_kind(layer.kind)]
    if conv_layers:
        total_params = sum(layer.params for layer in weighted) or 1
        layer_share = len(conv_layers) / len(weighted)
        param_share = sum(layer.params for layer in conv_layers) / total_params
        if layer_share >= CNN_SHARE or param_share >= CNN_SHARE:
            return (
                "cnn",
                f"{len(conv_layers)} of {len(weighted)} parameterized layers are convolutions "
                f"({param_share:.1%} of parameters)",
            )

    # 5. mlp-policy
    linear = [k for k in layer_kinds if is_linear_kind(k)]
    other = sorted(k for k in layer_kinds if not (is_linear_kind(k) or _is_activation_or_norm(k) or k in _PASSIVE))
    if linear and not other:
        count = sum(layer_kinds[k] for k in linear)
        return "mlp-policy", f"only linear layers ({count}) with activations/normalization"

    # 6. unknown
    if not layer_kinds:
        return "unknown", "no layers found"
    return "unknown", f"no rule matched; unclassified layer types: {', '.join(other or sorted(layer_kinds))}"


def _is_activation_or_norm(kind: str) -> bool:
    # HF wraps activations and norms in its own classes (GELUActivation, LlamaRMSNorm).
    return kind in _ACTIVATIONS or kind in _NORMS or kind.endswith("Activation") or "Norm" in kind


def _first(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] + (f" +{len(items) - 1} more" if len(items) > 1 else "") if items else "-"


# ---- ONNX ------------------------------------------------------------------------------------

_ONNX_CONV = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "NhwcConv"}
_ONNX_MATMUL = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedMatMul", "QGemm"}
_ONNX_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention", "PackedAttention"}
_ONNX_ELEMENTWISE = frozenset(
    [
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Gelu",
        "FastGelu",
        "Tanh",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Softsign",
        "Mish",
        "Softmax",
        "LogSoftmax",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Clip",
        "Neg",
        "Exp",
        "Sqrt",
        "Pow",
        "Erf",
        "ReduceMean",
        "LayerNormalization",
        "BatchNormalization",
        "RMSNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "Identity",
        "Flatten",
        "Reshape",
        "Transpose",
        "Cast",
        "Constant",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Slice",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Dropout",
        "Max",
        "Min",
        "Expand",
        "ConstantOfShape",
    ]
)


def detect_family_onnx(
    op_census: Mapping[str, int], initializer_names: Iterable[str] = ()
) -> tuple[ArchitectureFamily, str]:
    """Family of an ONNX graph from its op counts, helped by weight names (exporters keep torch parameter names).

    Attention = a fused attention op, or Softmax with at least two MatMuls. Op types alone cannot tell a
    decoder from an encoder, so decoder-llm needs an `lm_head` weight (or GroupQueryAttention), and
    vision-language-action needs an `action` weight plus convolutions or vision-named weights.
    """
    ops = {k: v for k, v in op_census.items() if v}
    names = list(initializer_names)
    convs = sum(ops.get(k, 0) for k in _ONNX_CONV)
    matmuls = sum(ops.get(k, 0) for k in _ONNX_MATMUL)
    fused_attention = sorted(k for k in ops if k in _ONNX_ATTENTION)
    attention = bool(fused_attention) or (ops.get("Softmax", 0) >= 1 and ops.get("MatMul", 0) >= 2)
    embedding = ops.get("Gather", 0) > 0
    vision = convs > 0 or any(_VISION_NAME.search(n) for n in names)
    action = [n for n in names if _ACTION_NAME.search(n)]
    lm_head = [n for n in names if "lm_head" in n]

    if attention and embedding and vision and action:
        return "vision-language-action", f"attention + Gather embedding + vision ops/weights + {action[0]}"
    if attention and (lm_head or "GroupQueryAttention" in ops):
        return "decoder-llm", f"attention ops + {lm_head[0] if lm_head else 'GroupQueryAttention'}"
    if attention:
        what = ", ".join(fused_attention) or f"Softmax x{ops['Softmax']} + MatMul x{ops['MatMul']}"
        return "transformer-encoder", f"attention pattern ({what}) without an lm_head weight"
    if convs and convs / max(convs + matmuls, 1) >= CNN_SHARE:
        return "cnn", f"{convs} convolution ops of {convs + matmuls} conv/matmul ops"
    unknown_ops = sorted(k for k in ops if k not in _ONNX_MATMUL | _ONNX_ELEMENTWISE)
    if matmuls and not unknown_ops:
        return "mlp-policy", f"only matmul/gemm ops ({matmuls}) with elementwise/normalization ops"
    if not ops:
        return "unknown", "the graph has no nodes"
    return "unknown", f"no rule matched; op types: {', '.join(unknown_ops or sorted(ops))}"
