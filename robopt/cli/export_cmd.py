"""`robopt export`: write an artifact or a session's best model in a format that loads without robopt, verified.

Registered in robopt/cli/main.py with `app.command("export")(_handle_errors(export))`, which turns robopt errors
into a message, a hint and an exit code like every other command.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax

out = Console()
err = Console(stderr=True)


class FormatChoice(StrEnum):
    auto = "auto"
    torchscript = "torchscript"
    state_dict = "state-dict"
    hf = "hf"
    onnx = "onnx"


def export(
    artifact_or_session: Annotated[
        str,
        typer.Argument(help="Artifact sha256 (prefix, or artifact:SHA), artifact path, or a session id (its best)."),
    ],
    out_dir: Annotated[Path, typer.Argument(help="New (or empty) folder to write the export to.")],
    fmt: Annotated[
        FormatChoice,
        typer.Option(
            "--format",
            help="auto (hf for transformers models, onnx for ONNX artifacts, else torchscript), torchscript, "
            "state-dict (weights + plain-PyTorch architecture), hf (save_pretrained folder) or onnx.",
        ),
    ] = FormatChoice.auto,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Data directory (default: ROBOPT_DATA_DIR).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")] = False,
) -> None:
    """Export a model so it loads WITHOUT robopt (TorchScript, state dict, Hugging Face folder or ONNX), then load
    it in a fresh process and check it reproduces the artifact's outputs."""
    from robopt.export import export as export_model
    from robopt.graph.context import Context
    from robopt.progress import Progress

    context = Context(data_dir=str(data_dir) if data_dir else None)
    if as_json:
        result = export_model(artifact_or_session, out_dir, fmt.value, context=context)
        out.print_json(json.dumps(result.model_dump(mode="json")))
        return
    with err.status("exporting...") as status:

        def show(event: dict) -> None:
            if event.get("message"):
                status.update(f"export: {event['message']}")

        result = export_model(
            artifact_or_session, out_dir, fmt.value, context=context, progress=Progress(emit=show, node="export")
        )
    verified = (
        f"[green]verified[/green] without robopt: max |diff| = {result.max_abs_diff:.3g}"
        if result.verified and result.max_abs_diff is not None
        else "[yellow]not verified[/yellow]"
    )
    out.print(f"[bold]{result.format}[/bold] export of artifact {result.artifact[:12]} -> {result.path}")
    out.print(f"  {verified}")
    out.print(f"  files: {', '.join(result.files)}")
    for note in result.notes:
        out.print(f"  note: {note}")
    out.print("  load it (no robopt needed):")
    out.print(Syntax(result.load_snippet, "python", theme="ansi_dark", background_color="default"))
