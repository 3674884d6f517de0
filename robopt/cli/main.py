"""The `robopt` command line: optimize, chat, analyze, techniques, zoo, demo, sessions, history, resume, rollback,
export, backends."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from robopt.cli.backends_cmd import backends_app
from robopt.cli.export_cmd import export as export_command
from robopt.errors import RoboptError

app = typer.Typer(
    name="robopt",
    help="Optimize robotics models for edge inference: analysis, planning, compression, evaluation, rollback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Benchmark models built offline (the demo model is digits-cnn).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(backends_app, name="backends")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
LlmOpt = Annotated[
    str | None,
    typer.Option("--llm", help="Chat model spec for the agents, e.g. openai:gpt-4.1-mini (default: ROBOPT_LLM)."),
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default: ROBOPT_DATA_DIR).")]


_NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "torch_pruning", "autoround")


@app.callback()
def _quiet_libraries() -> None:
    """Third-party import-time warnings (optional kernels that cannot load here) are noise for CLI users."""
    import logging

    if not os.environ.get("ROBOPT_DEBUG"):
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def _handle_errors(fn: F) -> F:
    """Typed errors become a message, a hint and an exit code; nothing reaches the user as a raw traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except RoboptError as e:
            if as_json:
                out.print_json(json.dumps(e.to_dict()))
            else:
                err.print(f"[red]error:[/red] {e.message}")
                if e.hint:
                    err.print(f"[yellow]hint:[/yellow] {e.hint}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: the session is checkpointed; `robopt resume SESSION` continues it")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as e:  # the last line of defence against a raw traceback; ROBOPT_DEBUG shows it
            if os.environ.get("ROBOPT_DEBUG"):
                raise
            message = f"internal error: {type(e).__name__}: {e}"
            if as_json:
                out.print_json(json.dumps({"error": "internal_error", "message": message}))
            else:
                err.print(f"[red]{message}[/red]")
                err.print("[yellow]hint:[/yellow] re-run with ROBOPT_DEBUG=1 for the traceback and report it")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _context(llm: str | None = None, data_dir: Path | None = None, threads: int = 0):
    from robopt.graph.context import Context

    return Context(llm=llm, data_dir=str(data_dir) if data_dir else None, threads=threads)


def _load_options(
    architecture: str | None, architecture_kwargs: str | None, trust_pickle: bool, input_shape: str | None
) -> dict[str, Any]:
    options: dict[str, Any] = {"trust_pickle": trust_pickle}
    if architecture:
        options["architecture"] = architecture
    if architecture_kwargs:
        try:
            options["architecture_kwargs"] = json.loads(architecture_kwargs)
        except json.JSONDecodeError as e:
            raise RoboptError(
                f"--architecture-kwargs is not JSON: {e}", "e.g. --architecture-kwargs '{\"hidden\": 64}'"
            ) from e
    if input_shape:
        try:
            options["input_shape"] = [int(d) for d in input_shape.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise RoboptError(f"cannot read --input-shape {input_shape!r}", "e.g. --input-shape 1,3,224,224") from None
    return options


def _run_with_display(as_json: bool, run: Callable[[Callable[[dict], None] | None], Any]) -> Any:
    from robopt.cli.display import LiveDisplay

    if as_json:
        return run(None)
    with LiveDisplay(err) as display:
        return run(display)


def _print_outcome(result: Any, as_json: bool) -> None:
    from robopt.cli.display import print_result

    if as_json:
        out.print_json(json.dumps(result.summary_json()))
    else:
        print_result(out, result)


@app.command()
@_handle_errors
def optimize(
    model: Annotated[str, typer.Argument(help="Model file/folder, a zoo name (robopt zoo list) or artifact:SHA.")],
    max_size: Annotated[str | None, typer.Option(help="e.g. 2MB, 500KB, 25% (of original) or 4x (smaller).")] = None,
    max_accuracy_drop: Annotated[str | None, typer.Option(help="e.g. 1% (one point), 0.5pt, 2%rel.")] = None,
    max_latency: Annotated[str | None, typer.Option(help="p50 latency limit on this machine, e.g. 5ms.")] = None,
    target: Annotated[
        str | None,
        typer.Option(help="Target device profile, e.g. jetson-orin-nano-8gb (closed-loop: predicted latency)."),
    ] = None,
    time_budget: Annotated[str | None, typer.Option(help="Stop starting new attempts after e.g. 10m.")] = None,
    control_rate: Annotated[
        str | None, typer.Option(help="Robot control rate for closed-loop timing, e.g. 20Hz.")
    ] = None,
    episodes: Annotated[int | None, typer.Option(help="Seeded closed-loop episodes per model, e.g. 50.")] = None,
    evaluator: Annotated[
        str | None,
        typer.Option(
            help="classification[:DATA], output-fidelity, closed-loop:TASK (reacher, fetchreach, mini-vla), "
            "perplexity, lm-eval, embedding-fidelity; default: the zoo card's, else output-fidelity."
        ),
    ] = None,
    technique: Annotated[list[str] | None, typer.Option(help="Only plan with these techniques (repeatable).")] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration data for techniques that need real inputs: .npz (one array per input name), .pt, "
            "or .txt/.jsonl text for token models; default: the evaluator's training-side data."
        ),
    ] = None,
    architecture: Annotated[
        str | None, typer.Option(help="pkg.module:Class for state dicts / bare safetensors.")
    ] = None,
    architecture_kwargs: Annotated[str | None, typer.Option(help="JSON constructor kwargs for --architecture.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow loading pickled modules (can execute code!).")] = False,
    input_shape: Annotated[str | None, typer.Option(help="Input shape with batch, e.g. 1,3,224,224.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id (default: new).")] = None,
    threads: Annotated[int, typer.Option(help="Threads for latency measurement (0 = all cores).")] = 0,
    llm: LlmOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Optimize MODEL until the criteria are met (or nothing is left to try); print before/after."""
    from robopt import api
    from robopt.domain.criteria import criteria_from_strings

    given = {
        "max_size": max_size,
        "max_accuracy_drop": max_accuracy_drop,
        "max_latency": max_latency,
        "target": target,
        "time_budget": time_budget,
        "control_rate": control_rate,
        "episodes": episodes,
    }
    # No criteria at all: a zoo model's card suggests them (intake says so); otherwise exactly what was given.
    criteria = criteria_from_strings(**given) if any(v is not None for v in given.values()) else None
    options = _load_options(architecture, architecture_kwargs, trust_pickle, input_shape)
    context = _context(llm, data_dir, threads)
    result = _run_with_display(
        as_json,
        lambda on_event: api.optimize(
            model,
            criteria,
            evaluator=evaluator,
            load_options=options,
            techniques=technique or None,
            calibration=calibration,
            session=session,
            context=context,
            on_event=on_event,
        ),
    )
    _print_outcome(result, as_json)


@app.command()
@_handle_errors
def chat(
    request: Annotated[
        str, typer.Argument(help='e.g. "shrink digits-cnn to under 100 KB and lose at most 1% accuracy"')
    ],
    evaluator: Annotated[str | None, typer.Option(help="Evaluator override, as for optimize.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id (default: new).")] = None,
    llm: LlmOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Optimize from a natural-language request (the LLM parses it when configured, rules otherwise)."""
    from robopt import api

    context = _context(llm, data_dir)
    result = _run_with_display(
        as_json,
        lambda on_event: api.chat(request, evaluator=evaluator, session=session, context=context, on_event=on_event),
    )
    _print_outcome(result, as_json)


@app.command()
@_handle_errors
def analyze(
    model: Annotated[str, typer.Argument(help="Model file/folder or zoo name.")],
    architecture: Annotated[str | None, typer.Option(help="pkg.module:Class for state dicts.")] = None,
    architecture_kwargs: Annotated[str | None, typer.Option(help="JSON constructor kwargs.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow loading pickled modules (can execute code!).")] = False,
    input_shape: Annotated[str | None, typer.Option(help="Input shape with batch, e.g. 1,3,224,224.")] = None,
    threads: Annotated[int, typer.Option(help="Threads for latency measurement (0 = all cores).")] = 0,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration data for the per-layer sensitivity (.npz, .pt, .txt/.jsonl); default: the zoo card "
            "evaluator's training-side data, else random inputs (said in the report)."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Profile MODEL: parameters, size, FLOPs, layers, family, shapes, latency, memory, per-layer quantization
    sensitivity, applicable techniques."""
    from robopt import api
    from robopt.cli.display import analysis_table, sensitivity_table, techniques_table
    from robopt.progress import Progress

    options = _load_options(architecture, architecture_kwargs, trust_pickle, input_shape)
    context = _context(None, data_dir, threads)
    if api.shape_only_zoo_name(model):
        from robopt.cli.display import print_shape_report

        with err.status("predicting..."):
            shape = api.shape_report(model, context=context)
        out.print_json(json.dumps(shape)) if as_json else print_shape_report(out, shape)
        return
    if as_json:
        report = api.analyze(model, load_options=options, context=context, calibration=calibration)
        out.print_json(report.model_dump_json())
        return
    with err.status("analysing..."):
        report = api.analyze(
            model,
            load_options=options,
            context=context,
            progress=Progress(emit=lambda e: None, node="analyze"),
            calibration=calibration,
        )
    out.print(analysis_table(report))
    if report.layer_sensitivity is not None:
        out.print(sensitivity_table(report.layer_sensitivity))
    out.print(techniques_table(report))


@app.command()
@_handle_errors
def techniques(as_json: JsonOpt = False) -> None:
    """Every registered technique: family, config schema, and whether it is available here (and why not)."""
    from rich.table import Table

    from robopt.tools.registry import technique_table

    rows = technique_table()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="registered techniques")
    for col in ("name", "family", "available", "backend / reason", "config"):
        table.add_column(col)
    for r in rows:
        props = r["config_schema"].get("properties", {})
        config = ", ".join(f"{k}={v.get('default', '?')}" for k, v in props.items())
        status = "[green]yes[/green]" if r["available"] else "[red]no[/red]"
        table.add_row(r["name"], r["family"], status, r["backend"] if r["available"] else r["reason"], config)
    out.print(table)


@zoo_app.command("list")
@_handle_errors
def zoo_list(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """The zoo's entries: kind, family, the evaluator on their card, and what they are."""
    from rich.table import Table

    from robopt import zoo
    from robopt.zoo.cards import get_entry

    entries = [get_entry(name) for name in zoo.list_entries()]
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "kind": e.kind,
                        "family": e.family,
                        "evaluator": f"{e.evaluator.name}:{e.evaluator.dataset or ''}".rstrip(":"),
                        "suggested_criteria": e.suggested_criteria,
                        "description": e.description,
                    }
                    for e in entries
                ]
            )
        )
        return
    table = Table(title="zoo (robopt zoo build NAME; robopt optimize NAME)")
    for column in ("name", "kind", "evaluator", "description"):
        table.add_column(column, no_wrap=column != "description")
    for e in entries:
        evaluator = f"{e.evaluator.name}:{e.evaluator.dataset or ''}".rstrip(":")
        table.add_row(e.name, e.kind, evaluator, e.description)
    out.print(table)


@zoo_app.command("build")
@_handle_errors
def zoo_build(
    name: Annotated[str, typer.Argument(help="Zoo entry, e.g. digits-cnn.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build (train offline) a zoo model into the data directory and print its model card."""
    from robopt import zoo
    from robopt.cli.display import LiveDisplay
    from robopt.progress import Progress

    settings = _context(None, data_dir).settings()
    if as_json:
        path, card = zoo.build(name, settings.zoo_dir, force=force)
    else:
        with LiveDisplay(err) as display:
            path, card = zoo.build(name, settings.zoo_dir, force=force, progress=Progress(emit=display, node="zoo"))
    if as_json:
        out.print_json(json.dumps({"path": str(path), "card": card.model_dump(mode="json")}))
    else:
        out.print(f"[bold]{card.name}[/bold]: {card.description}")
        out.print(f"  weights: {path}")
        out.print(f"  metrics: {card.metrics}")
        out.print(
            f"  evaluator: {card.evaluator.name} ({card.evaluator.dataset}); "
            f"suggested criteria: {card.suggested_criteria}"
        )


DEMO_MODEL = "digits-cnn"
DEMO_CRITERIA = {"max_size": "3x", "max_accuracy_drop": "1%"}


@app.command()
@_handle_errors
def demo(
    data_dir: DataDirOpt = None,
    llm: LlmOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build digits-cnn and optimize it: at least 3x smaller, at most 1 point of accuracy lost."""
    from robopt import api
    from robopt.domain.criteria import criteria_from_strings

    criteria = criteria_from_strings(**DEMO_CRITERIA)
    if not as_json:
        err.print(f"[bold]robopt demo[/bold]: {DEMO_MODEL}, criteria: {criteria.describe()}")
    context = _context(llm, data_dir)
    result = _run_with_display(
        as_json, lambda on_event: api.optimize(DEMO_MODEL, criteria, context=context, on_event=on_event)
    )
    _print_outcome(result, as_json)
    if not result.criteria_met:
        raise typer.Exit(1)


@app.command()
@_handle_errors
def sessions(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Sessions in the database, newest first."""
    from rich.table import Table

    from robopt.runner import list_sessions

    rows = list_sessions(_context(None, data_dir))
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title="sessions")
    for col in ("session", "model", "status", "attempts", "criteria met", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["session"], str(r["model"]), r["status"], str(r["attempts"]), str(r["criteria_met"]), str(r["updated_at"])
        )
    out.print(table)


@app.command()
@_handle_errors
def history(
    session: Annotated[str, typer.Argument(help="Session id.")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Checkpoints and attempts of SESSION with their metrics."""
    from rich.table import Table

    from robopt import api
    from robopt.domain.criteria import format_bytes
    from robopt.runner import session_state

    context = _context(None, data_dir)
    rows = api.history(session, context=context)
    attempts = session_state(session, context).values.get("attempts") or []
    if as_json:
        out.print_json(json.dumps({"checkpoints": rows, "attempts": attempts}, default=str))
        return
    table = Table(title=f"checkpoints of {session}")
    for col in ("checkpoint", "step", "next", "attempts", "accepted model", "size", "metrics"):
        table.add_column(col)
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k != "samples")
        table.add_row(
            r["checkpoint"],
            str(r["step"]),
            ",".join(r["next"]) or "END",
            str(r["attempts"]),
            (r["artifact"] or "-")[:12],
            format_bytes(r["size_bytes"]),
            metrics,
        )
    out.print(table)
    table = Table(title="attempts")
    for col in ("#", "technique", "config", "status", "size", "metrics", "reason"):
        table.add_column(col)
    for a in attempts:
        m = a.get("measurement") or {}
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in (m.get("metrics") or {}).items() if k != "samples")
        table.add_row(
            str(a["index"]),
            a["step"]["technique"],
            json.dumps(a["step"]["config"]),
            a["status"],
            format_bytes(m.get("size_bytes")),
            metrics,
            a["reason"],
        )
    out.print(table)


@app.command()
@_handle_errors
def resume(
    session: Annotated[str, typer.Argument(help="Session id.")],
    from_checkpoint: Annotated[
        str | None, typer.Option("--from", help="Continue from this checkpoint instead of the last (forks).")
    ] = None,
    llm: LlmOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue SESSION from its last checkpoint (after a crash, kill or Ctrl-C)."""
    from robopt import api

    context = _context(llm, data_dir)
    result = _run_with_display(
        as_json, lambda on_event: api.resume(session, context=context, on_event=on_event, checkpoint=from_checkpoint)
    )
    _print_outcome(result, as_json)


@app.command()
@_handle_errors
def rollback(
    session: Annotated[str, typer.Argument(help="Session id.")],
    to: Annotated[str, typer.Option("--to", help="Checkpoint id (or unique prefix) from `robopt history`.")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore the model accepted at a checkpoint as SESSION's result."""
    from robopt import api

    result = api.rollback(session, to, context=_context(None, data_dir))
    _print_outcome(result, as_json)


app.command("export")(_handle_errors(export_command))


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="robopt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
