"""The `hayai` command end to end, in subprocesses, on a tiny model in an isolated store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tinymodels import build_tiny_tokenizer, write_tiny_gguf


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf", build_tiny_tokenizer())
    result = run(home, "pull", str(gguf))
    assert result.returncode == 0, result.stderr
    return home


def run(home, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HAYAI_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hayai", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=120)


def test_generate_streams_only_the_answer_to_stdout(home):
    result = run(home, "generate", "-m", "tiny", "--raw", "-n", "12", "--dtype", "fp32", "Hello world")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "tok/s" not in result.stdout
    assert "prefill:" in result.stderr and "decode: " in result.stderr and "GB/s" in result.stderr
    again = run(home, "generate", "-m", "tiny", "--raw", "-n", "12", "--dtype", "fp32", "-q", "Hello world")
    assert again.stdout == result.stdout and "prefill" not in again.stderr


def test_generate_reads_the_prompt_from_stdin(home):
    piped = run(home, "generate", "-m", "tiny", "--raw", "-n", "8", "-q", "--dtype", "fp32", "-", stdin="Hello world")
    direct = run(home, "generate", "-m", "tiny", "--raw", "-n", "8", "-q", "--dtype", "fp32", "Hello world")
    assert piped.returncode == 0 and piped.stdout == direct.stdout


@pytest.mark.parametrize("args,needle", [
    (("generate", "-m", "no-such-model", "hi"), "unknown model 'no-such-model'"),
    (("generate", "-m", "tiny", "-n", "1000", "hi"), "context window"),
    (("generate", "-m", "tiny", "--temperature", "-1", "hi"), "temperature must be >= 0"),
    (("rm", "no-such-model"), "no model named"),
    (("pull", "/nonexistent/file.gguf"), "unknown model"),
])
def test_bad_input_is_one_line_and_exit_code_2(home, args, needle):
    result = run(home, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")


def test_traceback_flag_shows_the_traceback(home):
    result = run(home, "--traceback", "generate", "-m", "no-such-model", "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_corrupt_weights_are_reported_by_file_name(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "bad.gguf", build_tiny_tokenizer())
    assert run(tmp_path, "pull", str(gguf)).returncode == 0
    weights = tmp_path / "models" / "bad" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    result = run(tmp_path, "generate", "-m", "bad", "hi")
    assert result.returncode == 2 and "model.safetensors: sha256 mismatch" in result.stderr


def test_chat_answers_each_line_of_a_piped_conversation(home):
    result = run(home, "chat", "-m", "tiny", "-n", "6", "-t", "0", "--dtype", "fp32",
                 stdin="Hello\nHow are you?\n/reset\nHello\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("prefill:") == 3  # one speed report per answer
    assert "conversation cleared" in result.stderr


def test_models_rm_and_doctor(home, tmp_path):
    listing = run(home, "models")
    assert listing.returncode == 0 and "tiny" in listing.stdout
    doctor = run(home, "doctor")
    assert doctor.returncode == 0 and "torch" in doctor.stdout and "threads" in doctor.stdout
    gguf = write_tiny_gguf(tmp_path / "extra.gguf", build_tiny_tokenizer())
    assert run(home, "pull", str(gguf), "--name", "extra").returncode == 0
    assert run(home, "rm", "extra").returncode == 0
    assert "extra" not in run(home, "models").stdout
