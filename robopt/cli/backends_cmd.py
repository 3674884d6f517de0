"""`robopt backends`: optional backends that live in their own environments (list them, install one).

Registered in robopt/cli/main.py with `app.add_typer(backends_app, name="backends")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from robopt.errors import RoboptError

backends_app = typer.Typer(
    help="Optional backends in their own environments (e.g. gptqmodel for the gptq technique).", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default: ROBOPT_DATA_DIR).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _fail(e: RoboptError, as_json: bool) -> typer.Exit:
    if as_json:
        out.print_json(json.dumps(e.to_dict()))
    else:
        err.print(f"[red]error:[/red] {e.message}")
        if e.hint:
            err.print(f"[yellow]hint:[/yellow] {e.hint}")
    return typer.Exit(e.exit_code)


def _rows(data_dir: Path | None) -> list[dict[str, object]]:
    from robopt.tools.isolated_env import backend_dir, backend_names, backend_status, get_backend

    rows = []
    for name in backend_names():
        status = backend_status(name, data_dir)
        rows.append(
            {
                "name": name,
                "description": get_backend(name).description,
                "installed": status.installed,
                "available": status.available,
                "reason": status.reason,
                "environment": str(backend_dir(name, data_dir)),
                "probe": status.record.get("probe", {}),
                "install_timings_s": status.record.get("install_timings_s", {}),
            }
        )
    return rows


@backends_app.command("list")
def list_backends(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Each optional backend: installed or not, whether it runs here, and why not."""
    try:
        rows = _rows(data_dir)
    except RoboptError as e:
        raise _fail(e, as_json) from None
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="optional backends")
    for col in ("name", "available", "reason / versions", "environment"):
        table.add_column(col)
    for r in rows:
        status = "[green]yes[/green]" if r["available"] else "[red]no[/red]"
        versions = {k: v for k, v in dict(r["probe"]).items() if not k.endswith("_s")}
        detail = ", ".join(f"{k} {v}" for k, v in versions.items()) if r["available"] else str(r["reason"])
        table.add_row(str(r["name"]), status, detail, str(r["environment"]))
    out.print(table)


@backends_app.command("install")
def install(
    name: Annotated[str, typer.Argument(help="Backend to install (see `robopt backends list`).")],
    reinstall: Annotated[bool, typer.Option(help="Delete the environment first and build it again.")] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create NAME's environment (a venv with robopt's torch pinned, plus its packages; minutes) and check that it
    runs on this machine."""
    from robopt.progress import Progress
    from robopt.tools.isolated_env import install_backend

    def show(event: dict[str, object]) -> None:
        if not as_json and event.get("message"):
            err.print(f"{event.get('stage')}: {event['message']}", highlight=False, markup=False)

    try:
        status = install_backend(name, data_dir=data_dir, progress=Progress(emit=show), reinstall=reinstall)
    except RoboptError as e:
        raise _fail(e, as_json) from None
    result = {"name": name, "available": status.available, "reason": status.reason, **status.record}
    if as_json:
        out.print_json(json.dumps(result))
    elif status.available:
        out.print(f"[green]{name} installed and working[/green]: {status.record.get('probe', {})}")
    else:
        out.print(f"[red]{name} installed but not usable here[/red]: {status.reason}")
    if not status.available:
        raise typer.Exit(1)
