"""Shared fixtures: tiny random models and tokenizers, an isolated model store, the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import build_tiny_tokenizer, write_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def hayai_home(tmp_path, monkeypatch) -> Path:
    """An empty model store for this test."""
    home = tmp_path / "hayai-home"
    monkeypatch.setenv("HAYAI_HOME", str(home))
    return home


@pytest.fixture()
def tiny_checkpoint(tmp_path, tiny_tokenizer) -> Path:
    return write_hf_checkpoint(tmp_path / "tiny-llama", tiny_tokenizer)


@pytest.fixture()
def tiny_llm(tiny_checkpoint):
    import hayai

    return hayai.load(str(tiny_checkpoint), dtype="fp32")


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct) in fp32; `make test` pulls it into the store first."""
    import hayai

    return hayai.load(dtype="fp32")
