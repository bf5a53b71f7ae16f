"""The recommendation line of a suite, derived from its measurements only (never from a fixed ranking).

For each objective the suite asks for:

- speed: among techniques that ran and keep the baseline's quality (lossless, or the quality metric not worse
  than the baseline's by more than the suite's tolerance), the one with the highest speed ratio:
      "on this machine, for this model: int4 + prompt lookup, 7.1x, lossless"
  followed, when they differ, by the fastest lossless technique and by the fastest at any quality (with its
  quality cost), so a reader sees the trade-off the tolerance decided.
- memory: among the same, the one with the lowest peak memory (the faster on a tie), with its speed ratio.

When no technique beats the baseline on an objective the line says so; a failed baseline gives no
recommendation, since nothing can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence

from hayai.bench.report import SuiteResult, TechniqueResult

OBJECTIVES = ("speed", "memory")


def _quality_phrase(suite: SuiteResult, r: TechniqueResult) -> str:
    if r.lossless:
        return "lossless"
    change = suite.quality_change(r)
    if change is None:
        return "quality not measured"
    return f"{suite.quality_label} {change:+.1%}"


def _eligible(suite: SuiteResult) -> list[TechniqueResult]:
    return [r for r in suite.ran() if suite.within_tolerance(r)]


def speed_lines(suite: SuiteResult) -> list[str]:
    base = suite.baseline
    timed = [r for r in _eligible(suite) if suite.speed_ratio(r) is not None]
    if not timed:
        return [f"{suite.name}: no technique kept the baseline's quality with a measured speed"]
    best = max(timed, key=lambda r: suite.speed_ratio(r))
    ratio = suite.speed_ratio(best)
    tolerance = f"within {suite.quality_tolerance:.0%} of the baseline's {suite.quality_label}"
    if best is base or ratio <= 1.0:
        lines = [f"on this machine, for this model: keep the baseline ({base.name}); no technique was faster at the "
                 f"same quality ({tolerance})"]
    else:
        lines = [f"on this machine, for this model: {best.name}, {ratio:.1f}x, {_quality_phrase(suite, best)}"]
    lossless = [r for r in timed if r.lossless and r is not best]
    if lossless and not best.lossless:
        fast = max(lossless, key=lambda r: suite.speed_ratio(r))
        if suite.speed_ratio(fast) > 1.0:
            lines.append(f"fastest lossless: {fast.name}, {suite.speed_ratio(fast):.1f}x")
    anything = [r for r in suite.ran() if suite.speed_ratio(r) is not None]
    fastest = max(anything, key=lambda r: suite.speed_ratio(r))
    if fastest is not best and suite.speed_ratio(fastest) > ratio:
        lines.append(f"fastest at any quality: {fastest.name}, {suite.speed_ratio(fastest):.1f}x, "
                     f"{_quality_phrase(suite, fastest)} (outside the {suite.quality_tolerance:.0%} tolerance)")
    return lines


def memory_lines(suite: SuiteResult) -> list[str]:
    base = suite.baseline
    measured = [r for r in _eligible(suite) if suite.memory_ratio(r) is not None]
    if not measured:
        return [f"{suite.name}: no technique kept the baseline's quality with a measured peak memory"]
    least = min(measured, key=lambda r: (suite.memory_ratio(r), -(suite.speed_ratio(r) or 0.0)))  # ties: faster
    ratio = suite.memory_ratio(least)
    if least is base or ratio >= 1.0:
        return [f"least memory at the same quality: the baseline ({base.name})"]
    speed = suite.speed_ratio(least)
    speed_text = f", {speed:.1f}x speed" if speed is not None else ""
    return [f"least memory at the same quality: {least.name}, {ratio:.2f}x the baseline's {suite.memory_label}"
            f"{speed_text}, {_quality_phrase(suite, least)}"]


def recommend(suite: SuiteResult, objectives: Sequence[str] = ("speed",)) -> list[str]:
    """The recommendation lines for `suite` (see the module docstring)."""
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; choose from {', '.join(OBJECTIVES)}")
    base = suite.baseline
    if base is None or not base.ok:
        why = "is missing" if base is None else f"failed ({base.error})"
        return [f"{suite.name}: no recommendation: the baseline {why}, so nothing could be compared"]
    lines: list[str] = []
    for objective in objectives:
        lines += speed_lines(suite) if objective == "speed" else memory_lines(suite)
    return lines
