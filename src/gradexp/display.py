"""What a person sees in the terminal: a live progress bar and the final per-layer table.

When stdout is not a terminal, progress is printed as plain lines instead.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradexp.record import ratio
from gradexp.verdicts import describe, describe_outcome


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


class ProgressReporter:
    """Shows step, loss, total gradient norm and steps/s.

    Args:
        mode: rich (live bar), plain (a line every ~5% of the run), off, or auto
            (rich on a terminal, plain otherwise).
        total: the number of steps.
        console: where to print.
    """

    def __init__(self, mode: str, total: int, console: Console) -> None:
        if mode == "auto":
            mode = "rich" if console.is_terminal else "plain"
        self.mode, self.total, self.console = mode, total, console
        self.every = max(1, total // 20)
        self.next_line = 0
        self.bar: Progress | None = None
        if mode == "rich":
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  |g| {task.fields[gnorm]}"),
                TextColumn("{task.fields[rate]} steps/s"),
                TimeElapsedColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, loss="-", gnorm="-", rate="-")
            self.bar.start()

    def update(self, step: int, loss: float, grad_norm: float, rate: float) -> None:
        """Called on logging steps, with numbers already on the host."""
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=step + 1,
                loss=_fmt(loss),
                gnorm=_fmt(grad_norm),
                rate=f"{rate:.0f}",
            )
        elif self.mode == "plain" and (step >= self.next_line or step + 1 == self.total):
            self.next_line = step + self.every
            self.console.print(
                f"step {step + 1}/{self.total}  loss {_fmt(loss)}  |g| {_fmt(grad_norm)}"
                f"  {rate:.0f} steps/s",
                highlight=False,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


LAYER_CAPTION = (
    "|grad|: parameter-gradient norm; bwd: per-example RMS of dL/dh; fwd: RMS of h; upd/w:"
    " ||dW||/||W||; sat: saturated share of units; dead: dead share of units (last step)"
)


def layer_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str] | None]:
    """The per-layer figures of a finished run, first (step 0) and last logged step: the
    header, a row per layer, and the first-over-last row (None without layers)."""
    layers = summary["layers"]
    header = ["#", "layer"]
    for label in ("|grad|", "bwd", "fwd"):
        header += [f"{label} 0", f"{label} last"]
    header.append("upd/w")
    # Activation health, last logged step: only the columns some layer has.
    health = [
        (key, label)
        for key, label in (("sat_frac", "sat"), ("dead_frac", "dead"))
        if any(layer.get(key, {}).get("last") is not None for layer in layers)
    ]
    header += [label for _, label in health]
    rows = [
        [
            str(layer["index"]),
            layer["name"],
            *(
                _fmt(layer[k][w])
                for k in ("grad_norm", "signal_bwd", "signal_fwd")
                for w in ("first", "last")
            ),
            _fmt(layer["update_ratio"]["last"]),
            *(_fmt(layer[key]["last"]) for key, _ in health),
        ]
        for layer in layers
    ]
    total = None
    if layers:
        first, last = layers[0], layers[-1]
        cells = [
            _fmt(ratio(first[k][w], last[k][w]))
            for k in ("grad_norm", "signal_bwd", "signal_fwd")
            for w in ("first", "last")
        ]
        total = ["", "first/last", *cells, "", *("" for _ in health)]
    return header, rows, total


def layer_table(summary: dict[str, Any]) -> Table:
    """The per-layer figures of a finished run, first (step 0) and last logged step."""
    header, rows, total = layer_rows(summary)
    table = Table(
        title="per-layer gradients: first logged step (0) and last", caption=LAYER_CAPTION
    )
    for i, label in enumerate(header):
        table.add_column(label, justify="left" if i == 1 else "right", no_wrap=i == 1)
    for row in rows:
        table.add_row(*row)
    if total is not None:
        table.add_section()
        table.add_row(*total, style="bold")
    return table


def summary_markdown(summary: dict[str, Any]) -> str:
    """A finished run's summary as TensorBoard's Text tab shows it (``run/summary``): the
    status line, the options, the final metrics and the per-layer table, in Markdown.
    summary.json has the rest (theory, gradients through time, the Jacobian)."""
    from gradexp.metrics import markdown_cell, markdown_table

    kinds = ", ".join(dict.fromkeys(v["kind"] for v in summary.get("verdicts") or []))
    parts = [
        f"**{summary['status']}** after {summary['steps']} steps"
        f" ({summary.get('steps_per_s')} steps/s on {summary.get('device')})"
        + (f"; verdicts: **{kinds}** (evidence: run/verdicts)" if kinds else "")
    ]
    if summary.get("outcome"):
        parts.append(f"outcome: **{markdown_cell(describe_outcome(summary['outcome']))}**")
    if summary.get("error"):
        parts.append(f"error: {markdown_cell(summary['error'])}")
    if nf := summary.get("nonfinite"):
        parts.append(f"first non-finite: step {nf.get('step')}, layer {nf.get('layer')}")
    if summary.get("options"):
        options = summary["options"]
        parts.append(markdown_table(list(options), [list(options.values())]))
    if summary.get("metrics"):
        rows = [[k, _fmt(v)] for k, v in summary["metrics"].items()]
        parts.append(markdown_table(["metric", "final value"], rows))
    if summary.get("layers"):
        header, rows, total = layer_rows(summary)
        parts.append(markdown_table(header, rows + ([total] if total else [])))
        parts.append(LAYER_CAPTION)
    if summary.get("fold"):
        parts.append(markdown_cell(fold_line(summary["fold"])))
    for note in summary.get("notes") or []:
        parts.append(f"note: {markdown_cell(note)}")
    parts.append("The whole summary, with theory and gradients through time: summary.json.")
    return "\n\n".join(parts)


VERDICT_STYLE = {
    "healthy": "bold green",
    "vanishing": "bold yellow",
    "exploding": "bold red",
    "diverged": "bold red",
    "dead_units": "bold magenta",
    "saturated": "bold yellow",
}


def verdict_table(summary: dict[str, Any]) -> Table:
    """What happened to the gradients, in words, with the evidence (see gradexp.verdicts)."""
    table = Table(title="verdicts")
    table.add_column("verdict", no_wrap=True)
    table.add_column("layer", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("evidence")
    for v in summary.get("verdicts", []):
        table.add_row(
            f"[{VERDICT_STYLE.get(v['kind'], 'bold')}]{v['kind']}",
            v["layer"] or "-",
            "-" if v["step"] is None else str(v["step"]),
            describe(v),
        )
    return table


def status_line(summary: dict[str, Any]) -> str:
    """One plain line: status, steps, speed, final metrics, first non-finite step."""
    metrics = "  ".join(f"{k} {_fmt(v)}" for k, v in summary["metrics"].items())
    line = (
        f"status {summary['status']} after {summary['steps']} steps"
        f" ({summary['steps_per_s']} steps/s)  {metrics}"
    )
    if summary.get("nonfinite"):
        nf = summary["nonfinite"]
        line += f"  first non-finite: step {nf['step']}, layer {nf['layer']}"
    if summary.get("verdicts"):
        line += "  verdicts: " + ", ".join(dict.fromkeys(v["kind"] for v in summary["verdicts"]))
    if summary.get("outcome"):
        line += f"  outcome: {summary['outcome']['kind']}"
    return line


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The per-layer table, the verdicts and the status line."""
    console.print(layer_table(summary))
    console.print(verdict_table(summary))
    console.print(status_line(summary), highlight=False, soft_wrap=True)
    if summary.get("outcome"):
        console.print(
            f"outcome: {describe_outcome(summary['outcome'])}", highlight=False, soft_wrap=True
        )
    if summary.get("fold"):
        console.print(fold_line(summary["fold"]), highlight=False, soft_wrap=True)
    if summary.get("hessian_free"):
        console.print(hessian_free_line(summary["hessian_free"]), highlight=False, soft_wrap=True)


def hessian_free_line(hf: dict[str, Any]) -> str:
    """optim=hessian_free over the run, one line."""
    cg, damping = hf["cg_iters"], hf["damping"]
    rho = "-" if hf["rho_median"] is None else _fmt(hf["rho_median"])
    overflowed = hf.get("cg_stopped", {}).get("nonfinite", 0)
    warning = (
        f"; on {overflowed} steps a curvature product overflowed (no update: an exploding Jacobian)"
        if overflowed
        else ""
    )
    return (
        f"hessian-free: {hf['steps']} steps, CG iterations median {_fmt(cg['median'])}"
        f" (max {cg['max']}), lambda {_fmt(damping['first'])} -> {_fmt(damping['last'])},"
        f" rho median {rho}, line-search step median {_fmt(hf['rate_median'])},"
        f" {hf['rejected_steps']} steps rejected; {hf['products']} curvature products on"
        f" {hf['curvature_batch']} examples, {hf['evaluations']} loss evaluations{warning}"
    )


def fold_line(fold: dict[str, Any]) -> str:
    """norm=batch: the folded model against the trained one, one line."""
    acc = fold.get("acc/test")
    acc_part = f", acc/test {_fmt(acc)}" if acc is not None and not math.isnan(acc) else ""
    left = f" ({fold['remaining']} left in place)" if fold.get("remaining") else ""
    return (
        f"BatchNorm folded into {fold['folded']} layers{left}: loss/test"
        f" {_fmt(fold['loss/test'])}{acc_part}, max |output difference|"
        f" {_fmt(fold['max_abs_diff'])}, inference speedup {fold['speedup']:.2f}x"
    )
