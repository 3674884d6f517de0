"""Terminal rendering: a live progress display for graph events, and result/analysis tables (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from robopt.domain.analysis import AnalysisReport, SensitivityReport
from robopt.domain.criteria import format_bytes
from robopt.domain.plan import OptimizationResult
from robopt.domain.records import Measurement

NODE_TITLES = {
    "intake": "Intake",
    "analyze": "Analysis",
    "plan": "Planning",
    "optimize": "Optimization",
    "evaluate": "Evaluation",
    "rollback": "Rollback",
    "report": "Report",
}


class LiveDisplay:
    """Consumes progress events; shows one bar per running stage and a line per node, plan and attempt."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def __enter__(self) -> LiveDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def _finish_tasks(self) -> None:
        for task in self.tasks.values():
            self.progress.remove_task(task)
        self.tasks.clear()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        node = event.get("node", "")
        if kind == "session":
            verb = "resuming" if event.get("resumed") else "session"
            self.console.print(f"[bold]{verb} {event['session']}[/bold]")
        elif kind == "node" and event.get("status") == "start":
            self._finish_tasks()
            self.console.print(f"[cyan]▶ {NODE_TITLES.get(node, node)}[/cyan]")
        elif kind == "progress":
            if event.get("total"):
                key = (node, event["stage"])
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(event["stage"], total=event["total"])
                self.progress.update(self.tasks[key], completed=event.get("current", 0), total=event["total"])
            elif event.get("message"):
                self.console.print(f"  [dim]{event['message']}[/dim]")
        elif kind == "plan":
            plan = event["plan"]
            steps = " → ".join(s["technique"] for s in plan["steps"]) or "(nothing)"
            self.console.print(f"  plan ({plan['decider']}): {steps}")
            if plan.get("summary"):
                self.console.print(f"  [dim]{plan['summary']}[/dim]")
        elif kind == "step":
            self.console.print(f"  applying {event['technique']} {event['config']}")
        elif kind == "attempt":
            self._print_attempt(event)
        elif kind == "result":
            self._finish_tasks()

    def _print_attempt(self, a: dict[str, Any]) -> None:
        colour = {"accepted": "green", "rejected": "yellow", "failed": "red"}.get(a["status"], "white")
        m = a.get("measurement") or {}
        figures = ""
        if m:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in (m.get("metrics") or {}).items() if _headline(k))
            latency = f"{m['latency_ms_p50']:.3f} ms" if m.get("latency_ms_p50") is not None else "-"
            figures = f" — {format_bytes(m.get('size_bytes'))}, p50 {latency}, {metrics}"
        self.console.print(
            f"  [{colour}]{a['status']}[/{colour}] #{a['index']} {a['step']['technique']}{figures}\n"
            f"    [dim]{a.get('reason', '')}[/dim]"
        )


def _headline(metric: str) -> bool:
    """Metrics worth a place on an attempt's one-line summary (interval bounds and timings go to the table)."""
    return not any(part in metric for part in ("_ci_", "seconds", "mean_return", "latency_predicted", "episodes"))


def closed_loop_lines(base: Measurement, best: Measurement) -> list[str]:
    """Success at ideal and at real timing, before and after, with Wilson intervals and the timing behind them."""
    if "success_real" not in base.metrics or "success_real" not in best.metrics:
        return []

    def figure(m: Measurement, timing: str) -> str:
        low, high = m.metrics.get(f"success_{timing}_ci_low"), m.metrics.get(f"success_{timing}_ci_high")
        interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
        return f"{m.metrics[f'success_{timing}']:.2f}{interval}"

    def timing(m: Measurement) -> str:
        source = "predicted" if m.metrics.get("latency_predicted") else "measured"
        ticks = int(m.metrics.get("ticks_per_inference", 1))
        return f"{m.metrics.get('inference_latency_ms', float('nan')):.3g} ms {source}, {ticks} tick(s)"

    episodes = int(base.metrics.get("episodes", 0))
    rate = base.metrics.get("control_rate_hz", float("nan"))
    return [
        f"closed-loop success over {episodes} seeded episodes at {rate:g} Hz (95% Wilson intervals):",
        f"  ideal timing: {figure(base, 'ideal')} → {figure(best, 'ideal')}",
        f"  real timing:  {figure(base, 'real')} ({timing(base)}) → {figure(best, 'real')} ({timing(best)})",
    ]


def _change(before: float | None, after: float | None, better: str, worse: str) -> str:
    """'3.20x smaller' / '1.37x slower': the factor between two measurements, always >= 1, with its direction."""
    if not before or not after:
        return "-"
    ratio = before / after
    if abs(ratio - 1) < 0.005:
        return "unchanged"
    return f"{ratio:.2f}x {better}" if ratio > 1 else f"{1 / ratio:.2f}x {worse}"


def measurement_rows(m: Measurement) -> dict[str, str]:
    rows = {
        "size": format_bytes(m.size_bytes),
        "parameters": f"{m.param_count:,}" if m.param_count is not None else "-",
        "latency p50": f"{m.latency_ms_p50:.3f} ms" if m.latency_ms_p50 is not None else "-",
        "latency p95": f"{m.latency_ms_p95:.3f} ms" if m.latency_ms_p95 is not None else "-",
        "peak memory": format_bytes(m.peak_memory_bytes),
    }
    for name, value in m.metrics.items():
        rows[name] = f"{value:.4f}" if isinstance(value, float) else str(value)
    return rows


def result_table(result: OptimizationResult) -> Table:
    base, best = result.baseline.measurement, result.best.measurement
    table = Table(title=f"robopt session {result.session}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    before, after = measurement_rows(base), measurement_rows(best)
    before.pop("samples", None)
    changes = {
        "size": _change(base.size_bytes, best.size_bytes, "smaller", "larger"),
        "parameters": _change(base.param_count, best.param_count, "fewer", "more"),
        "latency p50": _change(base.latency_ms_p50, best.latency_ms_p50, "faster", "slower"),
        "latency p95": _change(base.latency_ms_p95, best.latency_ms_p95, "faster", "slower"),
        "peak memory": _change(base.peak_memory_bytes, best.peak_memory_bytes, "less", "more"),
    }
    for name in before:
        change = changes.get(name)
        if change is None and name in base.metrics and name in best.metrics:
            change = f"{best.metrics[name] - base.metrics[name]:+.4f}"
        table.add_row(name, before[name], after.get(name, "-"), change or "-")
    return table


def chain_table(result: OptimizationResult) -> Table:
    """The chain from the baseline to the best model with what was measured after each step."""
    base = result.baseline.measurement
    metric = base.primary_metric
    table = Table(title="chain: " + " → ".join(a.step.technique for a in result.chain()))
    for col in ("step", "technique", "size", "x smaller", "latency p50", metric or "metric"):
        table.add_column(col, justify="left" if col == "technique" else "right", overflow="fold")

    def row(label: str, name: str, m: Measurement) -> None:
        value = m.metrics.get(metric) if metric else None
        table.add_row(
            label,
            name,
            format_bytes(m.size_bytes),
            f"{base.size_bytes / max(m.size_bytes, 1):.2f}",
            f"{m.latency_ms_p50:.3f} ms" if m.latency_ms_p50 is not None else "-",
            f"{value:.4f}" if isinstance(value, float) else "-",
        )

    row("-", "baseline", base)
    for a in result.chain():
        if a.measurement is not None:
            row(str(a.index), a.step.technique, a.measurement)
    return table


def print_result(console: Console, result: OptimizationResult) -> None:
    console.print(result_table(result))
    for line in closed_loop_lines(result.baseline.measurement, result.best.measurement):
        console.print(line, soft_wrap=True)
    for check in result.checks:
        mark = "[green]✓[/green]" if check.met else "[red]✗[/red]"
        value = "-" if check.value is None else f"{check.value:g}"
        detail = f" — {check.detail}" if check.detail else ""
        console.print(f"  {mark} {check.name}: {value} (limit {check.limit:g}){detail}", soft_wrap=True)
    steps = result.chain()
    if steps:
        console.print(chain_table(result))
    else:
        console.print("chain: (no step accepted)")
    accepted = sum(a.status == "accepted" for a in result.attempts)
    console.print(
        f"attempts: {len(result.attempts)} ({accepted} accepted); stopped: {result.stop_reason}", soft_wrap=True
    )
    verdict = "[green]criteria met[/green]" if result.criteria_met else "[red]criteria NOT met[/red]"
    console.print(f"{verdict}; best model: {result.artifact}", soft_wrap=True)
    for event in result.decider_events:
        if not event.ok:
            console.print(f"[yellow]{event.agent}: {event.decider} decider rejected: {event.detail}[/yellow]")


def analysis_table(report: AnalysisReport) -> Table:
    table = Table(title=f"analysis of {report.source}", show_header=False)
    table.add_column("")
    table.add_column("")
    shapes = report.input_spec.inputs if report.input_spec else []
    rows = {
        "format": f"{report.source_format or report.format}",
        "architecture": f"{report.architecture} ({report.architecture_evidence})",
        "parameters": f"{report.param_count:,}",
        "size on disk": format_bytes(report.size_on_disk_bytes),
        "size in memory": format_bytes(report.size_in_memory_bytes),
        "FLOPs": f"{report.flops:,}" if report.flops is not None else "-",
        "inputs": ", ".join(f"{t.name} {t.shape} {t.dtype}" for t in shapes) or "-",
        "outputs": ", ".join(str(s) for s in report.output_shapes) or "-",
        "latency p50 / p95": f"{report.latency_ms_p50:.3f} / {report.latency_ms_p95:.3f} ms"
        if report.latency_ms_p50 is not None and report.latency_ms_p95 is not None
        else "-",
        "peak memory": format_bytes(report.peak_memory_bytes),
        "layers": ", ".join(f"{k} x{v}" for k, v in sorted(report.layer_census.items(), key=lambda kv: -kv[1])),
    }
    for k, v in rows.items():
        table.add_row(k, v)
    for k, v in report.unmeasured.items():
        table.add_row(f"[dim]{k} not measured[/dim]", f"[dim]{v}[/dim]")
    return table


def sensitivity_table(report: SensitivityReport, top: int = 12) -> Table:
    """The most sensitive layers first: output SQNR (dB) with that layer alone quantized, per bit width."""

    def db(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    bits = report.bits
    table = Table(
        title="per-layer sensitivity: output SQNR (dB) with that layer alone quantized",
        caption=f"HQQ g{report.group_size}, {report.samples} calibration samples ({report.seconds:.1f} s): "
        f"{report.calibration_source}. Predicted with every layer at b bits: "
        + ", ".join(f"{b}-bit {db(report.uniform_sqnr_db.get(b))} dB" for b in bits)
        + (f"; {len(report.layers) - top} less sensitive layers not shown" if len(report.layers) > top else ""),
    )
    for col in ("layer", "role", "params", *(f"{b}-bit" for b in bits)):
        table.add_column(col)
    for layer in report.layers[:top]:
        table.add_row(layer.name, layer.role, f"{layer.params:,}", *(db(layer.sqnr_db.get(b)) for b in bits))
    return table


def techniques_table(report: AnalysisReport) -> Table:
    table = Table(title="techniques")
    for col in ("technique", "family", "applies", "size after", "speed-up", "note / reason"):
        table.add_column(col)
    for t in report.techniques:
        applies = "[green]yes[/green]" if t.applicable else "[red]no[/red]"
        size = f"x{t.expected_size_ratio:.2f}" if t.expected_size_ratio is not None else "-"
        speed = f"x{t.expected_speedup:.2f}" if t.expected_speedup is not None else "-"
        table.add_row(t.technique, t.family, applies, size, speed, t.note if t.applicable else t.reason)
    return table


def print_shape_report(console: Console, report: dict[str, Any]) -> None:
    """A shape-only model: parameters per component, memory per precision, predictions per device."""
    params = report["params"]
    console.print(f"[bold]{report['model']}[/bold]: {report['description']}", soft_wrap=True)
    parts = ", ".join(f"{name} {count / 1e6:,.1f}M" for name, count in params["components"].items())
    console.print(f"parameters: {params['total']:,} ({parts})", soft_wrap=True)
    console.print(f"FLOPs per action: {report['flops']['action']:.3g}", soft_wrap=True)
    table = Table(title="roofline predictions (batch 1, lower bounds on latency)", box=box.SIMPLE_HEAD)
    widths = {"device": 26, "dtype": 5, "GB": 5, "fits": 4, "ms/tok": 7, "ms/act": 7, "Hz": 6}
    for column, width in widths.items():
        left = column in ("device", "dtype")
        table.add_column(column, justify="left" if left else "right", no_wrap=True, min_width=width)
    for device, info in report["devices"].items():
        for precision, p in info["precisions"].items():
            table.add_row(
                device,
                precision,
                f"{p['memory_required_bytes'] / 1e9:.1f}",
                "yes" if p["fits"] else "[red]no[/red]",
                f"{p['decode_token_ms']:.1f}",
                f"{p['action_ms']:.0f}",
                f"{p['control_rate_hz']:.2f}",
            )
    console.print(table)
    console.print(f"[dim]{report['basis']} {report['precisions_note']}[/dim]", soft_wrap=True)
