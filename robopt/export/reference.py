"""What to export: an artifact (sha256 prefix, artifact:SHA or path) or a session's best model, and what is known
about where it came from (the zoo card's class and kwargs, the Hugging Face folder holding the tokenizer)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robopt.domain.records import ArtifactRef
from robopt.errors import SessionNotFoundError
from robopt.export.errors import ExportError
from robopt.export.job import ArchitectureHint
from robopt.graph.context import Context
from robopt.memory.artifacts import ArtifactStore

ARTIFACT_PREFIX = "artifact:"
_SHA_PREFIX = re.compile(r"^[0-9a-f]{4,64}$")


@dataclass
class ExportSource:
    """The artifact to export and its origin."""

    ref: ArtifactRef
    store: ArtifactStore
    description: str
    architecture: ArchitectureHint | None = None
    tokenizer_dir: Path | None = None


def _find_artifacts(store: ArtifactStore, prefix: str) -> list[ArtifactRef]:
    if not store.root.is_dir():
        return []
    return [store.get(p.name) for p in sorted(store.root.iterdir()) if p.name.startswith(prefix) and p.is_dir()]


def _hint_from_card(card: dict[str, Any] | None) -> ArchitectureHint | None:
    if not card or card.get("kind", "module") != "module":
        return None
    kwargs = dict(card.get("architecture_kwargs") or {})
    return ArchitectureHint(card["architecture"], kwargs, f"zoo card {card['name']}")


def _from_session(session: str, context: Context, store: ArtifactStore) -> ExportSource:
    from robopt.runner import session_state

    values = session_state(session, context).values
    result = values.get("result") or {}
    artifact = (result.get("best") or {}).get("artifact") or (values.get("current") or {}).get("artifact")
    if artifact is None:
        raise ExportError(f"session {session} has no accepted model yet", f"resume it first: robopt resume {session}")
    ingested = values.get("ingested") or {}
    card = ingested.get("card")
    tokenizer = ((card or {}).get("evaluator") or {}).get("options", {}).get("model_dir")
    if ingested.get("source_format") == "hf-folder":
        tokenizer = ingested.get("source")
    ref = ArtifactRef.model_validate(artifact)
    which = "best" if result else "current"
    return ExportSource(
        ref=store.get(ref.sha256),
        store=store,
        description=f"session {session} ({which} model, artifact {ref.sha256[:12]})",
        architecture=_hint_from_card(card),
        tokenizer_dir=Path(tokenizer) if tokenizer else None,
    )


def resolve_export_source(reference: str, context: Context | None = None) -> ExportSource:
    """An artifact path, `artifact:SHA`, a bare sha256 prefix (4+ hex digits) or a session id."""
    from robopt.export.exporter import artifact_from_path

    context = context or Context()
    store = ArtifactStore(context.settings().artifacts_dir)
    if Path(reference).expanduser().exists():
        ref, path_store = artifact_from_path(reference)
        return ExportSource(ref=ref, store=path_store, description=f"artifact {ref.sha256[:12]} at {reference}")
    prefix = reference.removeprefix(ARTIFACT_PREFIX).lower()
    if reference.startswith(ARTIFACT_PREFIX) or _SHA_PREFIX.match(prefix):
        matches = _find_artifacts(store, prefix)
        if len(matches) == 1:
            return ExportSource(ref=matches[0], store=store, description=f"artifact {matches[0].sha256[:12]}")
        if len(matches) > 1:
            raise ExportError(f"{len(matches)} artifacts start with {prefix!r}", "give more digits of the sha256")
        if reference.startswith(ARTIFACT_PREFIX):
            raise ExportError(f"no artifact {prefix!r} in {store.root}", "`robopt history SESSION` lists artifacts")
    try:
        return _from_session(reference, context, store)
    except SessionNotFoundError:
        raise ExportError(
            f"{reference!r} is neither a stored artifact (sha256 prefix) nor a session in "
            f"{context.settings().data_dir}",
            "`robopt sessions` lists sessions, `robopt history SESSION` their artifacts; or pass --data-dir",
        ) from None


def _shapes_agree(model: nn.Module, candidate: nn.Module) -> bool:
    """Every weight both hold has the same shape (quantized layers hold packed weights under other keys)."""
    mine = {k: v.shape for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    theirs = {k: v.shape for k, v in candidate.state_dict().items() if isinstance(v, torch.Tensor)}
    shared = mine.keys() & theirs.keys()
    return bool(shared) and all(mine[k] == theirs[k] for k in shared)


def zoo_architecture_hint(model: nn.Module) -> ArchitectureHint | None:
    """The zoo entry whose class this module is (and whose kwargs build weights of its shapes, when several
    entries share the class, like the MLP policies): its constructor kwargs."""
    from robopt import zoo
    from robopt.tools.architectures import build_architecture
    from robopt.zoo.cards import get_entry

    class_path = f"{type(model).__module__}:{type(model).__qualname__}"
    entries = [get_entry(n) for n in zoo.list_entries()]
    entries = [e for e in entries if e.kind == "module" and e.architecture == class_path]
    for entry in entries:
        if len(entries) == 1 or _shapes_agree(model, build_architecture(entry.architecture, entry.architecture_kwargs)):
            return ArchitectureHint(class_path, dict(entry.architecture_kwargs), f"zoo entry {entry.name}")
    return None
