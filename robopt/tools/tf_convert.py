"""TensorFlow SavedModel and Keras models to ONNX with tf2onnx (the optional 'tensorflow' extra).

Conversion runs in a child Python process so TensorFlow never shares the caller's process (threads, protobuf, memory).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from robopt.errors import CorruptModelError, MissingExtraError, ResourceLimitError, UnsupportedFormatError

TensorFlowFormat = Literal["tf-savedmodel", "keras"]
DEFAULT_OPSET = 17
_EXIT_LOAD_FAILED = 3
_EXIT_CONVERT_FAILED = 4
_ERROR_PREFIX = "robopt-tf-convert-error: "
_TF_LOG_PREFIXES = ("I0000", "W0000", "E0000", "WARNING: All log messages", "To enable the following instructions")
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b[^:]*: ")
_LOAD_FAILURE_LINE = re.compile(
    r"^(OSError|IOError|FileNotFoundError)\b|Cannot parse file|SavedModel file does not exist"
)
_RELOAD_HINTS = {
    "tf-savedmodel": "check that it loads with tf.saved_model.load; re-export it with tf.saved_model.save or "
    "keras model.export(folder)",
    "keras": "check that it loads with keras.models.load_model; re-save it with model.save('model.keras')",
}
_LABELS = {"tf-savedmodel": "TensorFlow SavedModel", "keras": "Keras model"}


def missing_tensorflow_packages() -> list[str]:
    """Import names of the 'tensorflow' extra that are not installed in this environment."""
    return [name for name in ("tensorflow", "tf2onnx") if importlib.util.find_spec(name) is None]


def convert_tensorflow_to_onnx(
    path: str | Path,
    fmt: TensorFlowFormat,
    output_dir: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    timeout_s: float = 900.0,
) -> Path:
    """Convert a SavedModel folder or a .keras/.h5 file to ONNX; returns the written .onnx path.

    Raises MissingExtraError when tensorflow/tf2onnx are not installed, CorruptModelError when TensorFlow
    cannot load the model, UnsupportedFormatError when tf2onnx cannot convert it.
    """
    path = Path(path)
    if path.name == "saved_model.pb":
        path = path.parent
    if missing_tensorflow_packages():
        raise MissingExtraError(
            what=f"Loading the {_LABELS[fmt]} {path}", extra="tensorflow", package="tensorflow-cpu and tf2onnx"
        )
    out_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="robopt-tf2onnx-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / "model.onnx"
    if fmt == "tf-savedmodel":
        command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(path), "--output", str(output)]
        command += ["--opset", str(opset)]
    else:
        command = [sys.executable, "-m", "robopt.tools.tf_convert", str(path), str(output), str(opset)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        raise ResourceLimitError(
            f"converting {path} to ONNX took longer than {timeout_s:.0f} s",
            "convert it yourself with `python -m tf2onnx.convert` and pass the .onnx file",
        ) from e
    if proc.returncode == 0 and output.is_file():
        return output
    reason = _last_lines(proc.stderr or proc.stdout)
    if proc.returncode == _EXIT_LOAD_FAILED or _LOAD_FAILURE_LINE.search(reason):
        raise CorruptModelError(
            f"TensorFlow could not load the {_LABELS[fmt]} {path}: {reason}",
            _RELOAD_HINTS[fmt],
        )
    raise UnsupportedFormatError(
        f"tf2onnx could not convert the {_LABELS[fmt]} {path} to ONNX (exit {proc.returncode}): {reason}",
        "export it to ONNX yourself (python -m tf2onnx.convert --saved-model DIR --output model.onnx, or "
        "tf2onnx.convert.from_function) and pass the .onnx file",
    )


def _last_lines(text: str, n: int = 4) -> str:
    """The child's own error line when it wrote one, else its last lines without TensorFlow's start-up logging."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    ours = [line.removeprefix(_ERROR_PREFIX) for line in lines if line.startswith(_ERROR_PREFIX)]
    if ours:
        return ours[-1]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if raised:
        return raised[-1]
    lines = [line for line in lines if not line.startswith(_TF_LOG_PREFIXES)]
    return " | ".join(lines[-n:]) or "no error output"


def _convert_keras_in_this_process(source: str, output: str, opset: int) -> int:
    """Child-process side: load the Keras model and trace its call with tf.function for tf2onnx.

    tf2onnx's from_keras fails on Keras 3 models (KeyError on 'keras_tensor_N' output names), so the model
    is wrapped in a tf.function and converted with from_function instead.
    """
    import tensorflow as tf
    import tf2onnx

    try:
        import keras

        model = keras.models.load_model(source, compile=False)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        print(f"{_ERROR_PREFIX}{type(e).__name__}: {e}", file=sys.stderr)
        return _EXIT_LOAD_FAILED
    inputs = getattr(model, "inputs", None)
    if not inputs:
        print(f"{_ERROR_PREFIX}the Keras model has no defined inputs (a subclassed model never built)", file=sys.stderr)
        return _EXIT_CONVERT_FAILED
    signature = [
        tf.TensorSpec(tuple(x.shape), x.dtype, name=(x.name or f"input_{i}").split(":")[0])
        for i, x in enumerate(inputs)
    ]

    @tf.function(input_signature=signature)
    def call(*xs: tf.Tensor) -> tf.Tensor:
        return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    try:
        tf2onnx.convert.from_function(call, input_signature=signature, opset=opset, output_path=output)
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as e:
        print(f"{_ERROR_PREFIX}{type(e).__name__}: {e}", file=sys.stderr)
        return _EXIT_CONVERT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(_convert_keras_in_this_process(sys.argv[1], sys.argv[2], int(sys.argv[3])))
