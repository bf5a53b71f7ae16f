"""`hayai sot`, `hayai batch` and `hayai cascade train|run` end to end in subprocesses on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tinymodels import build_tiny_tokenizer, write_hf_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # A long context: the SoT prompts are long in the tiny tokenizer.
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"), build_tiny_tokenizer(), max_position_embeddings=4096)


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hayai", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_batch_prints_one_json_line_per_question(tiny, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                                   for i in range(5)))
    result = run("batch", questions, "-m", tiny, "--dtype", "fp32", "-k", "2", "--n-exemplars", "2",
                 "--answer-tokens", "4")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [x["question"] for x in lines] == [f"What is {i} + 1?" for i in range(5)]
    assert "K=2" in result.stderr and "accuracy" in result.stderr


def test_sot_answers_and_reports(tiny):
    result = run("sot", "What are some tips for better sleep?", "-m", tiny, "--dtype", "fp32", "--point-tokens",
                 "4", "--max-points", "3", "--skeleton-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "SoT:" in result.stderr or "without SoT" in result.stderr


def test_cascade_train_then_run(tiny, tmp_path):
    stages = tmp_path / "stages.toml"
    stages.write_text(
        f'[prices]\n"cheap" = {{input = 1, output = 2}}\n\n'
        f'[[stage]]\nname = "cheap"\nbackend = "local"\nmodel = "{tiny}"\nexemplars = 1\nmax_tokens = 4\n'
        f'price = {{input = 1, output = 2}}\n\n'
        f'[[stage]]\nname = "dear"\nbackend = "local"\nmodel = "{tiny}"\nexemplars = 2\nmax_tokens = 4\n'
        f'price = {{input = 10, output = 20}}\n')
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} + 2?", "answer": str(i + 2)}) for i in range(8)))
    strategy = tmp_path / "cascade.json"
    train = run("cascade", "train", "--data", data, "--stages", stages, "--budget", "1", "-o", strategy,
                "--dtype", "fp32", "--cache", tmp_path / "cache.sqlite")
    assert train.returncode == 0, train.stderr
    saved = json.loads(strategy.read_text())
    assert saved["chain"] and saved["train_cost"] <= 1
    ran = run("cascade", "run", "--file", data, "--stages", stages, "--strategy", strategy, "--dtype", "fp32")
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert len(lines) == 8 and all(x["stage"] in ("cheap", "dear") and x["cost"] > 0 for x in lines)


@pytest.mark.parametrize("args,needle", [
    (("batch", "/nonexistent/q.jsonl"), "cannot read"),
    (("sot", "q", "--router", "maybe"), "--router must be"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle):
    result = run(*args)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_bad_stage_file_names_the_stage(tmp_path):
    stages = tmp_path / "s.toml"
    stages.write_text('[[stage]]\nname = "x"\nmodel = "m"\nbogus = 1\n')
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    result = run("cascade", "train", "--data", tmp_path / "d.jsonl", "--stages", stages, "--budget", "1")
    assert result.returncode == 2 and "stage 1" in result.stderr and "bogus" in result.stderr
