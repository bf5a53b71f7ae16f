"""hayai.bench.report and recommend on synthetic results: Pareto fronts, ratios, failures, files written."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from hayai.bench.recommend import recommend
from hayai.bench.report import (
    BenchReport,
    Detail,
    SuiteResult,
    TechniqueResult,
    memory_speed_front,
    pareto_front,
    read_results,
    rich_table,
    speed_quality_front,
    status_lines,
    write_report,
)
from hayai.errors import ConfigError

GB = 10**9


def test_pareto_front_by_hand():
    points = [(1, 1), (2, 3), (3, 2), (2, 2), (0, 4), (3, 2)]
    # (1,1) and (2,2) are dominated by (2,3); the two (3,2) are equal and both stay
    assert pareto_front(points) == [4, 1, 2, 5]
    # minimise the first coordinate instead
    assert pareto_front([(1, 1), (2, 3), (0.5, 0.5)], (False, True)) == [2, 0, 1]
    assert pareto_front([]) == []


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        for maximize in itertools.product((True, False), repeat=2):
            s = [(p[0] if maximize[0] else -p[0], p[1] if maximize[1] else -p[1]) for p in pts]
            expected = {i for i, a in enumerate(s)
                        if not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in s)}
            assert set(pareto_front(pts, maximize)) == expected


def generate_suite() -> SuiteResult:
    return SuiteResult("generate", results=[
        TechniqueResult("bf16", "baseline", speed=20.0, memory_bytes=1 * GB, quality=10.0, lossless=True,
                        metrics={"tokens_per_forward": 1.0}),
        TechniqueResult("int8", "weights", speed=34.0, memory_bytes=int(0.6 * GB), quality=10.1, lossless=False,
                        metrics={"greedy_agreement": "2/3"}),
        TechniqueResult("int4", "weights", speed=60.0, memory_bytes=int(0.4 * GB), quality=11.0, lossless=False),
        TechniqueResult("prompt lookup", "decoding", speed=30.0, memory_bytes=1 * GB, quality=10.0, lossless=True,
                        metrics={"tokens_per_forward": 2.5}),
        TechniqueResult("int8 + prompt lookup", "combination", speed=50.0, memory_bytes=int(0.6 * GB),
                        quality=10.1, lossless=False),
        TechniqueResult.failed("nf4", RuntimeError("kernel exploded"), "weights"),
        TechniqueResult.skipped("draft model", "no --draft-model given", "decoding"),
    ], details=[Detail("tokens_per_forward", "tokens/forward")])


def test_ratios_and_tolerance():
    s = generate_suite()
    r = {t.name: t for t in s.results}
    assert s.speed_ratio(r["int4"]) == 3.0 and s.memory_ratio(r["int4"]) == pytest.approx(0.4)
    assert s.quality_change(r["int8"]) == pytest.approx(0.01)
    assert s.within_tolerance(r["int8"]) and not s.within_tolerance(r["int4"])  # +10% perplexity
    assert s.speed_ratio(r["nf4"]) is None and not s.within_tolerance(r["nf4"])
    higher = SuiteResult("x", quality_higher_is_better=True, results=[
        TechniqueResult("base", "baseline", quality=0.50), TechniqueResult("a", quality=0.495),
        TechniqueResult("b", quality=0.40), TechniqueResult("c", quality=0.90)])
    assert [higher.within_tolerance(t) for t in higher.results] == [True, True, False, True]


def test_fronts_use_only_techniques_that_ran():
    s = generate_suite()
    assert [t.name for t in speed_quality_front(s)] == ["prompt lookup", "int8 + prompt lookup", "int4"]
    assert [t.name for t in memory_speed_front(s)] == ["int4"]


def test_recommendation_is_derived_from_the_numbers():
    s = generate_suite()
    lines = recommend(s, ("speed", "memory"))
    assert lines[0] == "on this machine, for this model: int8 + prompt lookup, 2.5x, perplexity +1.0%"
    assert lines[1] == "fastest lossless: prompt lookup, 1.5x"
    assert lines[2].startswith("fastest at any quality: int4, 3.0x, perplexity +10.0%")
    assert lines[3].startswith("least memory at the same quality: int8 + prompt lookup, 0.60x")
    # change the numbers, the recommendation follows: a lossless technique that is fastest wins outright
    s.results.append(TechniqueResult("magic", "decoding", speed=200.0, memory_bytes=GB, quality=10.0, lossless=True))
    assert recommend(s) == ["on this machine, for this model: magic, 10.0x, lossless"]


def test_recommendation_when_nothing_helps_or_the_baseline_failed():
    s = SuiteResult("generate", results=[TechniqueResult("bf16", "baseline", speed=20.0, quality=10.0),
                                         TechniqueResult("slow", speed=10.0, quality=10.0, lossless=True)])
    assert "keep the baseline (bf16)" in recommend(s)[0]
    s.results[0] = TechniqueResult.failed("bf16", "out of memory", "baseline")
    assert recommend(s) == ["generate: no recommendation: the baseline failed (out of memory), so nothing could "
                            "be compared"]


def test_report_lists_exactly_the_techniques_and_failures(tmp_path):
    suite = generate_suite()
    suite.recommendation = recommend(suite)
    report = BenchReport("tiny", {"cpu": "test cpu", "cpu_cores_physical": 2, "isa": [], "memory_bytes": 8 * GB,
                                  "torch": "2.x", "threads": 2, "gpus": []}, [suite], {"quick": True},
                         {"energy": "unavailable (test)"}, "2025-01-01T00:00:00", 12.0)
    paths = write_report(report, tmp_path / "out")
    md = paths["report"].read_text()
    data = json.loads(paths["results"].read_text())
    names = [r["name"] for r in data["suites"][0]["results"]]
    assert names == [t.name for t in suite.results]
    for name in names:
        assert f"| {name} |" in md
    assert "failed: RuntimeError: kernel exploded" in md and "skipped: no --draft-model given" in md
    failed = next(r for r in data["suites"][0]["results"] if r["name"] == "nf4")
    assert failed["status"] == "failed" and failed["speed_ratio"] is None
    assert data["suites"][0]["results"][2]["speed_ratio"] == 3.0
    assert suite.recommendation[0] in md and "energy: unavailable (test)" in md
    assert paths["generate_speed_quality"].stat().st_size > 1000 and paths["generate_memory_speed"].exists()
    assert "generate_speed_quality.png" in md
    back = read_results(paths["results"])
    assert [t.name for t in back.suite("generate").results] == names
    assert back.suite("generate").results[5].error == "RuntimeError: kernel exploded"


def test_rich_table_and_bad_status():
    from rich.console import Console

    console = Console(width=200, record=True)
    suite = generate_suite()
    console.print(rich_table(suite))
    text = console.export_text()
    assert "int8 + prompt lookup" in text and "nf4 (failed)" in text and "3.00x" in text
    assert status_lines(suite) == [("failed", "nf4: RuntimeError: kernel exploded"),
                                   ("skipped", "draft model: no --draft-model given")]
    with pytest.raises(ConfigError):
        TechniqueResult("x", status="maybe")
