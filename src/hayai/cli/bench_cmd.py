"""`hayai bench`: which technique helps this model on this machine, measured, tabled and plotted."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hayai.cli.app import app, err, out


class _BenchDisplay:
    """Renders `BenchEvent`s: one bar over all techniques, one for the current technique's stage."""

    def __init__(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=err, transient=False)
        self.overall = self.progress.add_task("[bold]bench", total=None)
        self.current = self.progress.add_task("", total=None, visible=False)

    def __enter__(self) -> _BenchDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event) -> None:
        p = self.progress
        if event.kind == "stage":
            p.console.print(f"[dim]• {escape(event.message)}[/]")
        elif event.kind == "start":
            p.update(self.overall, total=event.total, completed=event.index - 1)
            p.update(self.current, description=f"  {event.suite}: {event.technique}", completed=0, total=None,
                     visible=True)
        elif event.kind == "progress":
            p.update(self.current, description=f"  {event.suite}: {event.technique} — {event.stage}",
                     completed=event.done, total=event.stage_total or None)
        elif event.kind == "done":
            p.update(self.overall, total=event.total, completed=event.index)
            p.update(self.current, visible=False)
            r = event.result
            if r is not None and r.status != "ok":
                style = "red" if r.status == "failed" else "dim"
                p.console.print(f"[{style}]  {escape(r.name)}: {r.status}: {escape(r.error or '')}[/]", soft_wrap=True)


def new_report_dir(parent: Path) -> Path:
    """A new folder `hayai-bench-YYYYMMDD-HHMMSS` (with a counter if it exists) under `parent`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = parent / f"hayai-bench-{stamp}"
    n = 2
    while path.exists():
        path = parent / f"hayai-bench-{stamp}-{n}"
        n += 1
    return path


@app.command()
def bench(
    model: str = typer.Argument(None, help="Store name, known name or HF checkpoint dir (default: the default "
                                "model)."),
    data: Path = typer.Option(None, "--data", "-d", help="JSONL records (chat, instruction, prompt/completion or "
                              "text) or a plain text file; default: small sets bundled with hayai."),
    suite: str = typer.Option("all", "--suite", "-s", help="generate, finetune or all."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: under 5 minutes on 2 cores for the default "
                               "model."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Report directory (default: a new hayai-bench-* folder "
                                 "here)."),
    only: str = typer.Option(None, "--only", help="Comma-separated techniques to run besides the baselines, e.g. "
                             "int4,lookup,lora (see the report for the names)."),
    draft_model: str = typer.Option(None, "--draft-model", help="A small model sharing the tokenizer, for "
                                    "speculative decoding with a draft model."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Relative quality change still counted as the same "
                                    "quality in the recommendation (0.02 = 2%)."),
    exact_match: bool = typer.Option(False, "--exact-match", help="Finetune suite: also the exact match of greedy "
                                     "answers on the held-out records."),
    details: bool = typer.Option(False, "--details", help="Also print the table of further measures."),
    dtype: str = typer.Option("auto", "--dtype", help="Baseline dtype: auto, fp32, bf16 or fp16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
) -> None:
    """Run the techniques hayai has against the plain baseline on your model and data; write report.md,
    results.json and Pareto-front plots, and recommend one per suite."""
    from hayai.bench.report import rich_details_table, rich_table, status_lines, write_report
    from hayai.bench.suites import SUITES, BenchOptions, run_bench

    if suite not in (*SUITES, "all"):
        raise typer.BadParameter(f"--suite must be one of {', '.join(SUITES)} or all, not {suite!r}")
    keys = tuple(k.strip() for k in only.split(",") if k.strip()) if only else None
    options = BenchOptions(model=model, data=str(data) if data else None,
                           suites=SUITES if suite == "all" else (suite,), quick=quick, device=device, dtype=dtype,
                           threads=threads, tolerance=tolerance, draft_model=draft_model, exact_match=exact_match,
                           only=keys)
    directory = out_dir or new_report_dir(Path.cwd())
    with _BenchDisplay() as display:
        report = run_bench(options, display)
    paths = write_report(report, directory)
    for s in report.suites:
        out.print(rich_table(s))
        for status, line in status_lines(s):
            out.print(f"[{'red' if status == 'failed' else 'dim'}]{status}: {escape(line)}[/]")
        if details:
            out.print(rich_details_table(s))
        for line in s.recommendation:
            out.print(f"[bold green]{line}[/]")
        out.print()
    out.print(f"report: {paths['report']}  ({report.seconds:.0f} s)")
