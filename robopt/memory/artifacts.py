"""Content-addressed, write-once model artifacts: written to a temp dir, hashed, renamed into place, made read-only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from robopt.domain.records import ArtifactFormat, ArtifactRef, InputSpec
from robopt.errors import ArtifactIntegrityError
from robopt.tools.picklable import make_picklable

_PAYLOAD_NAME: dict[str, str] = {"torch-module": "model.pt", "torchscript": "model.ts", "onnx": "model.onnx"}
MANIFEST = "manifest.json"


def hash_payload(directory: Path) -> str:
    """sha256 over the payload files of an artifact directory (names and bytes, sorted; manifest excluded)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


class ArtifactStore:
    """Model artifacts under `root/<sha256>/` with a `manifest.json` beside the payload.

    Artifacts are never modified: payload files are read-only, and a second write of the same content
    returns the existing artifact. Full-module pickles are only ever written by this store and are
    verified against their content hash before they are unpickled.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing -------------------------------------------------------------------------------
    def put_module(
        self,
        module: nn.Module,
        *,
        parent: str | None = None,
        technique: str | None = None,
        input_spec: InputSpec | None = None,
    ) -> ArtifactRef:
        """Store a torch model: TorchScript modules as TorchScript archives, eager modules as full pickles."""
        if isinstance(module, torch.jit.ScriptModule):
            return self._put("torchscript", lambda p: torch.jit.save(module, str(p)), parent, technique, input_spec)
        make_picklable(module)
        return self._put("torch-module", lambda p: torch.save(module, p), parent, technique, input_spec)

    def put_onnx(
        self,
        model_proto: object,
        *,
        parent: str | None = None,
        technique: str | None = None,
        input_spec: InputSpec | None = None,
    ) -> ArtifactRef:
        """Store an onnx.ModelProto (weights inline below 2 GB, else in a side `model.onnx.data` file)."""
        import onnx

        def write(path: Path) -> None:
            large = model_proto.ByteSize() > 1_800_000_000  # type: ignore[attr-defined]
            onnx.save_model(
                model_proto, str(path), save_as_external_data=large, location="model.onnx.data" if large else None
            )

        return self._put("onnx", write, parent, technique, input_spec)

    def _put(
        self,
        fmt: ArtifactFormat,
        write: Callable[[Path], None],
        parent: str | None,
        technique: str | None,
        input_spec: InputSpec | None,
    ) -> ArtifactRef:
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(exist_ok=True)
        tmp = tmp_root / uuid.uuid4().hex
        tmp.mkdir()
        try:
            payload = tmp / _PAYLOAD_NAME[fmt]
            write(payload)
            _fsync_tree(tmp)
            sha = hash_payload(tmp)
            final = self.root / sha
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            ref = ArtifactRef(
                sha256=sha,
                path=str(final / payload.name),
                format=fmt,
                size_bytes=size,
                parent=parent,
                technique=technique,
                input_spec=input_spec,
            )
            if final.exists():
                return self.get(sha)
            (tmp / MANIFEST).write_text(ref.model_dump_json(indent=2))
            for p in tmp.rglob("*"):
                if p.is_file():
                    p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, final)
            return ref
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- reading -------------------------------------------------------------------------------
    def get(self, sha256: str) -> ArtifactRef:
        manifest = self.root / sha256 / MANIFEST
        if not manifest.is_file():
            raise ArtifactIntegrityError(
                f"artifact {sha256[:12]} is not in the store at {self.root}",
                "the data directory may have changed; check ROBOPT_DATA_DIR",
            )
        return ArtifactRef.model_validate(json.loads(manifest.read_text()))

    def verify(self, ref: ArtifactRef) -> None:
        """Raise ArtifactIntegrityError unless the payload still hashes to its address."""
        directory = Path(ref.path).parent
        if not directory.is_dir():
            raise ArtifactIntegrityError(f"artifact {ref.sha256[:12]} is missing ({directory})")
        actual = hash_payload(directory)
        if actual != ref.sha256:
            raise ArtifactIntegrityError(
                f"artifact {ref.sha256[:12]} was modified on disk (now hashes to {actual[:12]})",
                "restore it from a backup or re-run the optimization; robopt never edits artifacts",
            )

    def load(self, ref: ArtifactRef, *, verify: bool = True) -> nn.Module:
        """A fresh, independent model object from the artifact (callers may modify it freely)."""
        if verify:
            self.verify(ref)
        if ref.format == "torchscript":
            return torch.jit.load(ref.path, map_location="cpu")
        if ref.format == "onnx":
            from robopt.tools.onnx_module import OnnxModule

            return OnnxModule(ref.path)
        # Written by this store and hash-verified above: unpickling our own full-module artifact is safe.
        with warnings.catch_warnings():
            # quantized modules' packed params still use TypedStorage internally; nothing for the user to do
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return torch.load(ref.path, map_location="cpu", weights_only=False)

    def list(self) -> list[ArtifactRef]:
        return [self.get(p.name) for p in sorted(self.root.iterdir()) if (p / MANIFEST).is_file()]
