"""Built-in compression techniques: importing this package registers each of them in the technique registry."""

from robopt.tools.techniques import (  # noqa: F401  (imported for their @register_technique side effect)
    onnx_dynamic_int8,
    prune_structured,
    prune_unstructured,
    quantize_dynamic_int8,
    weight_only,
)
