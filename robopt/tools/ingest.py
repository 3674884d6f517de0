"""Turn a model reference (path, zoo name or stored artifact) into a validated, immutable baseline artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robopt.domain.records import ArtifactRef
from robopt.errors import ModelNotFoundError, UnsupportedFormatError
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress
from robopt.tools.loading import LoadOptions, load_model

ARTIFACT_PREFIX = "artifact:"


@dataclass
class IngestedModel:
    """The baseline artifact and where it came from."""

    artifact: ArtifactRef
    source: str
    source_format: str
    hf_config: dict[str, Any] | None = None
    card: dict[str, Any] | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact.model_dump(mode="json"),
            "source": self.source,
            "source_format": self.source_format,
            "hf_config": self.hf_config,
            "card": self.card,
        }


def _find_artifact(store: ArtifactStore, sha_prefix: str) -> ArtifactRef:
    matches = [ref for ref in store.list() if ref.sha256.startswith(sha_prefix)]
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        raise ModelNotFoundError(
            f"{found} stored artifacts match {ARTIFACT_PREFIX}{sha_prefix}",
            "give a longer sha256 prefix; `robopt history SESSION` lists the artifacts of a session",
        )
    return matches[0]


def ingest_model(
    reference: str,
    *,
    store: ArtifactStore,
    zoo_dir: Path,
    options: LoadOptions | None = None,
    progress: Progress | None = None,
) -> IngestedModel:
    """Validate and load the model, then store it as the run's baseline artifact."""
    from robopt import zoo

    progress = progress or Progress()
    options = options or LoadOptions()
    if reference.startswith(ARTIFACT_PREFIX):
        ref = _find_artifact(store, reference.removeprefix(ARTIFACT_PREFIX))
        store.verify(ref)
        return IngestedModel(artifact=ref, source=reference, source_format=ref.format)

    path = Path(reference).expanduser()
    card = None
    if not path.exists():
        if reference not in zoo.list_entries():
            raise ModelNotFoundError(
                f"no model file or directory at {reference!r}, and no zoo model of that name",
                f"give a path to a model file/folder, or a zoo name: {', '.join(zoo.list_entries())}",
            )
        progress.message("zoo", f"resolving zoo model {reference}")
        path, card = zoo.resolve(reference, zoo_dir, progress=progress)
        if card.kind == "shape-only":
            raise UnsupportedFormatError(
                f"zoo model {reference!r} is shape-only: its architecture is built on the meta device with no "
                "weights, so it can be analyzed but not run or optimized",
                f"`robopt analyze {reference}` reports its size, memory and predicted latency; "
                "optimize a runnable zoo model instead (robopt zoo list)",
            )
        update: dict[str, Any] = {"input_spec": options.input_spec or card.input_spec}
        if card.kind == "module":
            update["architecture"] = options.architecture or card.architecture
            update["architecture_kwargs"] = options.architecture_kwargs or card.architecture_kwargs
        options = options.model_copy(update=update)

    progress.message("load", f"validating and loading {path}")
    loaded = load_model(path, options)
    if loaded.onnx_path is not None:
        import onnx

        ref = store.put_onnx(onnx.load(str(loaded.onnx_path)), input_spec=loaded.input_spec)
    else:
        ref = store.put_module(loaded.module, input_spec=loaded.input_spec)
    hf_config = loaded.metadata.get("hf_config") if isinstance(loaded.metadata, dict) else None
    return IngestedModel(
        artifact=ref,
        source=str(path),
        source_format=loaded.format,
        hf_config=hf_config,
        card=card.model_dump(mode="json") if card is not None else None,
    )
