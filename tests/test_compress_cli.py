"""`hayai compress` end to end (tiny checkpoint; the default model under the integration mark) and the
perplexity it reports, against transformers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tinymodels import hf_llama, native_from

from hayai.compress.quality import perplexity
from hayai.errors import ConfigError, DataError


def run(*args, home=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    if home is not None:
        env["HAYAI_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "hayai", "compress", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_perplexity_matches_transformers_loss():
    hf = hf_llama(seed=3)
    native = native_from(hf)
    ids = torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [math.exp(float(hf(ids[None, s:s + 16], labels=ids[None, s:s + 16]).loss)) for s in (0, 16)]
        tail = ids[32:]
        nll_tail = float(hf(tail[None], labels=tail[None]).loss) * (len(tail) - 1)
    nll = sum(math.log(p) * 15 for p in expected) + nll_tail
    assert perplexity(native, ids, window=16) == pytest.approx(math.exp(nll / (15 + 15 + len(tail) - 1)), rel=1e-4)


def test_compress_a_tiny_checkpoint(tiny_checkpoint, hayai_home, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Hello world! " * 20)
    report_path = tmp_path / "report.json"
    result = run(str(tiny_checkpoint), "--prune", "0.5", "--bits", "4", "--data", str(text), "--max-tokens", "96",
                 "--window", "48", "--layers", "--json", str(report_path), home=hayai_home)
    assert result.returncode == 0, result.stderr
    for stage in ("original", "pruned", "shared", "huffman"):
        assert stage in result.stdout
    report = json.loads(report_path.read_text())
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["original", "pruned", "shared", "huffman"]
    assert stages[0]["bytes"] > stages[1]["bytes"] > stages[2]["bytes"] >= stages[3]["bytes"]
    assert all(math.isfinite(s["quality"]) and s["quality"] > 1 for s in stages)
    assert stages[3]["quality"] == stages[2]["quality"]
    for layer in report["layers"]:
        assert layer["codes"] <= 16 and layer["nonzero"] == layer["numel"] - round(0.5 * layer["numel"])


@pytest.mark.parametrize(("args", "error", "needle"), [
    (("--prune", "1.5"), ConfigError, "--prune must be in [0, 1)"),
    (("--bits", "0"), ConfigError, "--bits must be in 1..16"),
    (("--scope", "model"), ConfigError, "--scope must be"),
    (("--data", "/nonexistent/text.txt"), DataError, "/nonexistent/text.txt: cannot read"),
])
def test_bad_options_raise_errors_naming_the_option(tiny_checkpoint, hayai_home, args, error, needle):
    from typer.testing import CliRunner

    from hayai.cli import app

    result = CliRunner().invoke(app, ["compress", str(tiny_checkpoint), *args])
    assert isinstance(result.exception, error) and needle in str(result.exception)


@pytest.mark.integration
def test_compress_the_default_model_first_layer(tmp_path):
    report_path = tmp_path / "report.json"
    result = run("--prune", "0.5", "--bits", "4", "--include", "model.layers.0.mlp.*", "--max-tokens", "64",
                 "--window", "64", "--json", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["model"] == "smollm2-135m-instruct"
    assert [layer["name"] for layer in report["layers"]] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    original, _, shared, huffman = report["stages"]
    assert original["bytes"] - huffman["bytes"] > 0.8 * 3 * 576 * 1536 * 4  # those weights shrank > 5x
    assert 1 < original["quality"] < 100  # a sane perplexity on English prose
    assert shared["quality"] < 10 * original["quality"]  # one MLP compressed one-shot: degraded, not destroyed
