"""Benchmark results, their Pareto fronts, and the report directory: report.md, results.json, PNG plots.

A suite (`SuiteResult`) holds one `TechniqueResult` per technique it tried, the plain baseline first. Every
technique is listed: one that ran (`status="ok"`), one that raised (`"failed"`, with its error), one that could
not apply here (`"skipped"`, with the reason). Ratios are against the baseline measured in the same run:

    speed ratio  = speed / baseline speed            (> 1: faster)
    memory ratio = peak memory / baseline peak       (< 1: less memory)
    quality Δ    = (quality − baseline) / baseline   (sign per the metric: lower perplexity or loss is better)

Pareto front (the survey of efficient NLP methods, Treviso et al. 2023, recommends comparing methods by their
fronts instead of single numbers): a technique is on the front when no other technique is at least as good on
both axes and strictly better on one. `write_report` draws two fronts, speed vs quality and memory vs speed, one
point per technique, front points joined and labelled.

This module builds rich `Table`s for the CLI to print but prints nothing itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hayai.errors import ConfigError

STATUSES = ("ok", "failed", "skipped")


@dataclass
class TechniqueResult:
    """One technique's measurements (None where not measured)."""

    name: str
    kind: str = ""  # "baseline", "weights", "decoding", "combination", "finetune", ...
    status: str = "ok"
    error: str | None = None
    description: str = ""
    speed: float | None = None  # the suite's speed metric (tokens/s)
    memory_bytes: int | None = None  # the suite's memory metric (peak RSS, or CUDA peak on GPUs)
    quality: float | None = None  # the suite's quality metric (perplexity, eval loss, exact match)
    lossless: bool | None = None  # greedy output identical to the baseline's on every prompt (None: n/a)
    metrics: dict[str, Any] = field(default_factory=dict)  # every other measure (see the suite's details)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigError(f"technique status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, name: str, error: BaseException | str, kind: str = "", description: str = "",
               **metrics: Any) -> TechniqueResult:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return cls(name, kind, "failed", text.strip() or "failed", description, metrics=metrics)

    @classmethod
    def skipped(cls, name: str, reason: str, kind: str = "", description: str = "") -> TechniqueResult:
        return cls(name, kind, "skipped", reason, description)


@dataclass
class Detail:
    """An extra column of the details table: metrics[key] rendered with a format name (see `format_value`)."""

    key: str
    label: str
    format: str = "float"


@dataclass
class SuiteResult:
    name: str
    speed_label: str = "tokens/s"
    memory_label: str = "peak RSS"
    quality_label: str = "perplexity"
    quality_higher_is_better: bool = False
    quality_tolerance: float = 0.02  # relative change of quality still counted as "same quality"
    results: list[TechniqueResult] = field(default_factory=list)
    details: list[Detail] = field(default_factory=list)
    recommendation: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> TechniqueResult | None:
        return next((r for r in self.results if r.kind == "baseline"), None)

    def ran(self) -> list[TechniqueResult]:
        return [r for r in self.results if r.ok]

    def speed_ratio(self, r: TechniqueResult) -> float | None:
        base = self.baseline
        if base is None or not base.ok or not r.ok or not base.speed or r.speed is None:
            return None
        return r.speed / base.speed

    def memory_ratio(self, r: TechniqueResult) -> float | None:
        base = self.baseline
        if base is None or not base.ok or not r.ok or not base.memory_bytes or r.memory_bytes is None:
            return None
        return r.memory_bytes / base.memory_bytes

    def quality_change(self, r: TechniqueResult) -> float | None:
        """Relative change of the quality metric against the baseline (raw sign: + means the number grew)."""
        base = self.baseline
        if base is None or not base.ok or base.quality is None or r.quality is None or not r.ok:
            return None
        return (r.quality - base.quality) / abs(base.quality) if base.quality else None

    def within_tolerance(self, r: TechniqueResult) -> bool:
        """Same quality as the baseline: lossless, or the quality metric not worse by more than the tolerance.

        Lossy output with no quality figure is not assumed to be fine."""
        if not r.ok:
            return False
        if r.lossless:
            return True
        change = self.quality_change(r)
        if change is None:
            return r.kind == "baseline"
        worse = -change if self.quality_higher_is_better else change
        return worse <= self.quality_tolerance


@dataclass
class BenchReport:
    model: str
    hardware: dict[str, Any]
    suites: list[SuiteResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)  # bandwidth limit, energy availability, ...
    created: str = ""
    seconds: float = 0.0

    def suite(self, name: str) -> SuiteResult:
        for s in self.suites:
            if s.name == name:
                return s
        raise KeyError(name)

    # ---- JSON ------------------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for suite_data, suite in zip(data["suites"], self.suites, strict=True):
            for row, r in zip(suite_data["results"], suite.results, strict=True):
                row["speed_ratio"] = suite.speed_ratio(r)
                row["memory_ratio"] = suite.memory_ratio(r)
                row["quality_change"] = suite.quality_change(r)
                row["same_quality"] = suite.within_tolerance(r)
        return _json_safe(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        suites = []
        for s in data.get("suites", []):
            results = [TechniqueResult(**_known(TechniqueResult, r)) for r in s.get("results", [])]
            details = [Detail(**d) for d in s.get("details", [])]
            suites.append(SuiteResult(**(_known(SuiteResult, s) | {"results": results, "details": details})))
        return cls(**(_known(cls, data) | {"suites": suites}))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---- Pareto fronts -----------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the points no other point dominates, ordered by the first coordinate.

    j dominates i when j is at least as good on both coordinates and strictly better on one ("good" per
    `maximize`). Equal points do not dominate each other, so both stay on the front."""
    signs = tuple(1.0 if m else -1.0 for m in maximize)
    scored = [(p[0] * signs[0], p[1] * signs[1]) for p in points]

    def dominated(i: int) -> bool:
        a = scored[i]
        return any(b[0] >= a[0] and b[1] >= a[1] and (b[0] > a[0] or b[1] > a[1]) for b in scored)

    front = [i for i in range(len(points)) if not dominated(i)]
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def speed_quality_front(suite: SuiteResult) -> list[TechniqueResult]:
    rows = [r for r in suite.ran() if r.speed is not None and r.quality is not None]
    front = pareto_front([(r.speed, r.quality) for r in rows], (True, suite.quality_higher_is_better))
    return [rows[i] for i in front]


def memory_speed_front(suite: SuiteResult) -> list[TechniqueResult]:
    rows = [r for r in suite.ran() if r.speed is not None and r.memory_bytes is not None]
    front = pareto_front([(r.memory_bytes, r.speed) for r in rows], (False, True))
    return [rows[i] for i in front]


# ---- formatting --------------------------------------------------------------------------------------------------
def format_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.{2 if abs(value) < 10 else 1 if abs(value) < 100 else 0}f} {unit}"
    return f"{int(n)} B"


def format_value(value: Any, kind: str = "float") -> str:
    """Render one metric: kinds float, int, ratio (2.31x), percent, bytes, flops, seconds, bool, text."""
    if value is None:
        return "—"
    if kind == "text" or isinstance(value, str):
        return str(value)
    if kind == "bool" or isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "bytes":
        return format_bytes(value)
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "percent":
        return f"{value:.1%}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "flops":
        for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
            if abs(value) >= size:
                return f"{value / size:.2f} {unit}"
        return f"{value:.0f} FLOP"
    if kind == "seconds":
        return f"{value:.2f} s" if value >= 0.1 else f"{value * 1e3:.1f} ms"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def quality_text(suite: SuiteResult, r: TechniqueResult) -> str:
    if r.quality is None:
        return "—"
    change = suite.quality_change(r)
    value = format_value(r.quality)
    if change is None or r.kind == "baseline":
        return value
    return f"{value} ({change:+.1%})"


def lossless_text(r: TechniqueResult) -> str:
    agreement = r.metrics.get("greedy_agreement")
    if r.kind == "baseline" and r.ok and r.lossless is not None:
        return "reference"
    if r.lossless is None:
        return "—"
    if r.lossless:
        return "yes"
    return f"no ({agreement})" if agreement else "no"


def status_text(r: TechniqueResult, width: int | None = None) -> str:
    if r.ok:
        return "ok"
    text = f"{r.status}: {r.error}" if r.error else r.status
    text = " ".join(text.split())
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def table_rows(suite: SuiteResult, error_width: int | None = None) -> list[list[str]]:
    """The main table's rows: technique, speed, speed ratio, memory, memory ratio, quality, lossless, status."""
    rows = []
    for r in suite.results:
        rows.append([
            r.name, format_value(r.speed), format_value(suite.speed_ratio(r), "ratio"), format_bytes(r.memory_bytes),
            format_value(suite.memory_ratio(r), "ratio"), quality_text(suite, r), lossless_text(r),
            status_text(r, error_width),
        ])
    return rows


def table_header(suite: SuiteResult) -> list[str]:
    return ["technique", suite.speed_label, "speed ratio", suite.memory_label, "memory ratio", suite.quality_label,
            "lossless", "status"]


def details_rows(suite: SuiteResult) -> list[list[str]]:
    return [[r.name, *(format_value(r.metrics.get(d.key), d.format) for d in suite.details)]
            for r in suite.results if r.ok]


def rich_table(suite: SuiteResult) -> Any:
    """The suite's main table as a `rich.table.Table`: the speed-quality front bold, failed techniques red and
    skipped ones dim, marked after their name. Errors and skip reasons would not fit a terminal: see
    `status_lines`."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"{suite.name} suite", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    header = ["technique", suite.speed_label, "speed", suite.memory_label, "memory", suite.quality_label, "change",
              "lossless"]
    for i, name in enumerate(header):  # on narrow terminals the technique and lossless columns wrap
        table.add_column(name, justify="right" if 1 <= i <= 6 else "left", no_wrap=i not in (0, 7),
                         min_width=12 if i == 0 else None)
    front = {r.name for r in speed_quality_front(suite)}
    for r in suite.results:
        style = "red" if r.status == "failed" else "dim" if r.status == "skipped" else (
            "bold" if r.name in front else None)
        change = suite.quality_change(r)
        table.add_row(r.name if r.ok else f"{r.name} ({r.status})", format_value(r.speed),
                      format_value(suite.speed_ratio(r), "ratio"), format_bytes(r.memory_bytes),
                      format_value(suite.memory_ratio(r), "ratio"), format_value(r.quality),
                      "" if change is None or r.kind == "baseline" else f"{change:+.1%}", lossless_text(r),
                      style=style)
    return table


def status_lines(suite: SuiteResult) -> list[tuple[str, str]]:
    """(status, "technique: error or reason") for every technique that did not run."""
    return [(r.status, f"{r.name}: {' '.join((r.error or '').split())}") for r in suite.results if not r.ok]


def rich_details_table(suite: SuiteResult) -> Any:
    from rich.table import Table

    table = Table(title=f"{suite.name}: more measures", title_justify="left")
    table.add_column("technique")
    for d in suite.details:
        table.add_column(d.label, justify="right")
    for row in details_rows(suite):
        table.add_row(*row)
    return table


# ---- report.md -----------------------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: BenchReport, plots: dict[str, str] | None = None) -> str:
    from hayai.bench.hardware import one_line

    lines = [f"# hayai bench: {report.model}", ""]
    lines.append(f"- hardware: {one_line(report.hardware)}")
    for key, value in report.environment.items():
        lines.append(f"- {key}: {value}")
    for key, value in report.settings.items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- created: {report.created}, took {report.seconds:.0f} s")
    lines.append("")
    for suite in report.suites:
        lines += [f"## {suite.name}", ""]
        for text in suite.recommendation:
            lines.append(f"**{text}**  ")
        if suite.recommendation:
            lines.append("")
        base = suite.baseline
        lines.append(f"Ratios against the baseline ({base.name if base else 'none'}) measured in the same run; "
                     f"quality within {suite.quality_tolerance:.0%} of the baseline counts as the same quality.")
        lines.append("")
        lines += _md_table(table_header(suite), table_rows(suite))
        if suite.details and suite.ran():
            lines += ["", "More measures:", ""]
            lines += _md_table(["technique", *(d.label for d in suite.details)], details_rows(suite))
        for note in suite.notes:
            lines.append(f"\n- {note}")
        for key in ("speed_quality", "memory_speed"):
            name = f"{suite.name}_{key}"
            if plots and name in plots:
                lines += ["", f"![{name}]({plots[name]})"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---- plots ---------------------------------------------------------------------------------------------------------
def _plot_front(path: Path, rows: list[TechniqueResult], x: Callable[[TechniqueResult], float],
                y: Callable[[TechniqueResult], float], front: list[TechniqueResult], xlabel: str, ylabel: str,
                title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    on_front = {r.name for r in front}
    for r in rows:
        marker = "*" if r.kind == "baseline" else "o"
        ax.scatter([x(r)], [y(r)], marker=marker, s=90 if r.name in on_front else 40,
                   color="tab:red" if r.name in on_front else "tab:gray", zorder=3)
        ax.annotate(r.name, (x(r), y(r)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(front) > 1:
        ax.plot([x(r) for r in front], [y(r) for r in front], color="tab:red", linewidth=1.2, zorder=2,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_suite(suite: SuiteResult, directory: Path, model: str = "") -> dict[str, str]:
    """Draw the suite's two fronts; returns {plot name: file name} for those with at least one point."""
    made = {}
    rows = [r for r in suite.ran() if r.speed is not None and r.quality is not None]
    if rows:
        name = f"{suite.name}_speed_quality"
        direction = "higher" if suite.quality_higher_is_better else "lower"
        _plot_front(directory / f"{name}.png", rows, lambda r: r.speed, lambda r: r.quality,
                    speed_quality_front(suite), suite.speed_label, f"{suite.quality_label} ({direction} is better)",
                    f"{model} {suite.name}: speed vs quality")
        made[name] = f"{name}.png"
    rows = [r for r in suite.ran() if r.speed is not None and r.memory_bytes is not None]
    if rows:
        name = f"{suite.name}_memory_speed"
        _plot_front(directory / f"{name}.png", rows, lambda r: r.memory_bytes / 1e9, lambda r: r.speed,
                    memory_speed_front(suite), f"{suite.memory_label} (GB)", suite.speed_label,
                    f"{model} {suite.name}: memory vs speed")
        made[name] = f"{name}.png"
    return made


def write_report(report: BenchReport, directory: str | Path) -> dict[str, Path]:
    """Write report.md, results.json and the PNG fronts into `directory` (created); returns their paths.

    Without matplotlib the plots are left out and report.md says so."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    try:
        for suite in report.suites:
            plots.update(plot_suite(suite, directory, report.model))
    except ImportError:
        report.environment.setdefault("plots", "not drawn: matplotlib is not installed (pip install 'hayai[bench]')")
    paths = {"results": directory / "results.json", "report": directory / "report.md"}
    paths["results"].write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    paths["report"].write_text(render_markdown(report, plots), encoding="utf-8")
    paths.update({name: directory / file for name, file in plots.items()})
    return paths


def read_results(path: str | Path) -> BenchReport:
    """A report back from its results.json."""
    path = Path(path)
    try:
        return BenchReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
