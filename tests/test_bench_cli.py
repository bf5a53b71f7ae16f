"""`hayai bench` end to end in a subprocess, on a tiny model in an isolated store: the report lists exactly the
techniques that ran, a failing technique is reported with its error, the files are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tinymodels import build_tiny_tokenizer, write_tiny_gguf


def run(home, cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HAYAI_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hayai", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf", build_tiny_tokenizer())
    assert run(home, home, "pull", str(gguf)).returncode == 0
    return home


@pytest.mark.slow
def test_bench_both_suites_with_a_failing_technique(home, tmp_path):
    result = run(home, tmp_path, "bench", "tiny", "--quick", "--only", "lookup,draft,lora", "--draft-model",
                 "no-such-model", "--dtype", "fp32", "--threads", "1")
    assert result.returncode == 0, result.stderr
    folders = list(tmp_path.glob("hayai-bench-*"))
    assert len(folders) == 1  # a new folder under the current directory
    out = folders[0]
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "generate_speed_quality.png",
                                               "generate_memory_speed.png", "finetune_speed_quality.png",
                                               "finetune_memory_speed.png"}
    data = json.loads((out / "results.json").read_text())
    rows = {s["name"]: {r["name"]: r for r in s["results"]} for s in data["suites"]}
    # exactly the baseline, the selected techniques, the failure and the combination's verdict
    assert list(rows["generate"]) == ["fp32 (baseline)", "prompt lookup", "draft model (no-such-model)",
                                      "best format + best decoding"]
    assert list(rows["finetune"]) == ["full AdamW (baseline)", "LoRA r=8"]
    failed = rows["generate"]["draft model (no-such-model)"]
    assert failed["status"] == "failed" and "ModelNotFoundError: unknown model 'no-such-model'" in failed["error"]
    assert rows["generate"]["best format + best decoding"]["status"] == "skipped"
    lookup = rows["generate"]["prompt lookup"]
    assert lookup["status"] == "ok" and lookup["lossless"] is True and lookup["speed_ratio"] > 0
    lora = rows["finetune"]["LoRA r=8"]
    assert lora["status"] == "ok" and lora["memory_bytes"] > 0 and lora["quality"] > 1
    assert lora["metrics"]["trainable_parameters"] < rows["finetune"]["full AdamW (baseline)"]["metrics"][
        "trainable_parameters"]
    report = (out / "report.md").read_text()
    assert "| draft model (no-such-model) |" in report and "failed: ModelNotFoundError" in report
    for suite in data["suites"]:
        assert suite["recommendation"] and all(line in report for line in suite["recommendation"])
    # the terminal shows the same tables, and where the report went
    assert "prompt lookup" in result.stdout and "LoRA r=8" in result.stdout and "report: " in result.stdout
    assert "no-such-model" in result.stderr  # the failure is also said while running


def test_bench_rejects_bad_options(home, tmp_path):
    bad_suite = run(home, tmp_path, "bench", "tiny", "--suite", "speed")
    assert bad_suite.returncode == 2 and "--suite" in bad_suite.stderr
    bad_only = run(home, tmp_path, "bench", "tiny", "--only", "int5")
    assert bad_only.returncode == 2 and "unknown technique int5" in bad_only.stderr
    assert not list(tmp_path.glob("hayai-bench-*"))  # nothing written for a refused run
