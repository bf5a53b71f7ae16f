"""`hayai finetune`, `hayai generate --adapter` and `hayai merge`, in subprocesses on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from tinymodels import write_hf_checkpoint

    root = tmp_path_factory.mktemp("cli")
    checkpoint = write_hf_checkpoint(root / "tiny", tiny_tokenizer)
    data = root / "train.jsonl"
    rows = [{"instruction": f"Double {i}", "output": str(2 * i)} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, checkpoint, data


def run(root, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HAYAI_HOME": str(root / "home"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hayai", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_finetune_then_generate_with_the_adapter_then_merge(setup):
    root, checkpoint, data = setup
    out = root / "out"
    result = run(root, "finetune", "-m", str(checkpoint), "-d", str(data), "-o", str(out), "--max-steps", "3",
                 "--seq-len", "48", "--batch-size", "2", "--eval-data", str(data), "--exact-match",
                 "--max-new-tokens", "3", "--save-every", "2", "--autocast", "none")
    assert result.returncode == 0, result.stderr
    assert "estimated peak" in result.stderr and "exact match before training" in result.stderr
    assert "lora: 3 steps" in result.stdout and "exact match after" in result.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-000003").is_dir()

    adapted = run(root, "generate", "-m", str(checkpoint), "--adapter", str(out), "-n", "6", "-q", "--dtype",
                  "fp32", "Double 3")
    assert adapted.returncode == 0, adapted.stderr
    result = run(root, "merge", "-m", str(checkpoint), "--adapter", str(out), "-o", str(root / "merged"))
    assert result.returncode == 0, result.stderr
    assert (root / "merged" / "model.safetensors").is_file() and (root / "merged" / "tokenizer.json").is_file()

    resumed = run(root, "finetune", "-m", str(checkpoint), "-d", str(data), "-o", str(out), "--max-steps", "4",
                  "--seq-len", "48", "--batch-size", "2", "--autocast", "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "lora: 4 steps" in resumed.stdout


def test_a_bad_data_line_fails_with_its_line_number(setup):
    root, checkpoint, data = setup
    bad = root / "bad.jsonl"
    bad.write_text(data.read_text() + '{"instruction": "x"}\n')
    result = run(root, "finetune", "-m", str(checkpoint), "-d", str(bad), "-o", str(root / "bad-out"))
    assert result.returncode == 2
    assert f"{bad}:13: an instruction record needs an 'output'" in result.stderr
    skipped = run(root, "finetune", "-m", str(checkpoint), "-d", str(bad), "-o", str(root / "skip-out"),
                  "--skip-bad", "--max-steps", "1", "--seq-len", "48", "--autocast", "none")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 bad lines" in skipped.stderr and "line 13" in skipped.stderr


def test_memory_limit_refusal_is_one_line(setup):
    root, checkpoint, data = setup
    result = run(root, "finetune", "-m", str(checkpoint), "-d", str(data), "-o", str(root / "small"),
                 "--memory-limit", "1MB")
    assert result.returncode == 2
    assert "error: training would need about" in result.stderr and "Traceback" not in result.stderr
