"""Fast decode modes on the default model (SmolLM2-135M-Instruct): exactness on real text."""

from __future__ import annotations

import pytest
import torch

import hayai
from hayai.decode.strategies import SpeculateOptions, build_strategy
from hayai.quant import quantize_model

pytestmark = pytest.mark.integration

PROMPTS = [
    "Add a docstring to this function and return the full code.\n\ndef average(values):\n    total = 0\n"
    "    for v in values:\n        total = total + v\n    return total / len(values)\n",
    "Explain how a refrigerator keeps food cold.",
]
STRATEGIES = {
    "lookup": SpeculateOptions(),
    "self-early-exit": SpeculateOptions(exit_layer=15),
    "self-int4": SpeculateOptions(self_quant="int4"),
    "lookahead": SpeculateOptions(),
    "jacobi": SpeculateOptions(),
}


@pytest.fixture(scope="module")
def int4_llm():
    llm = hayai.load(dtype="bf16")
    quantize_model(llm.model, "int4", group_size=64, embeddings=True)
    llm.engine.refresh_weight_bytes()
    return llm


def _strategy(name, model):
    base = name.split("-")[0]
    return build_strategy(base, model, options=STRATEGIES[name])


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_lossless_strategies_equal_plain_greedy_in_fp32(default_llm, name):
    for text in PROMPTS:
        ids = default_llm.prompt_ids(text)
        plain = default_llm.engine.generate(ids, max_new_tokens=40, stop_token_ids=set())
        fast = default_llm.engine.generate(ids, max_new_tokens=40, stop_token_ids=set(),
                                           strategy=_strategy(name, default_llm.model))
        assert fast.token_ids == plain.token_ids, name
        assert fast.stats.target_forwards <= plain.stats.target_forwards
        if name in ("lookup", "self-int4"):  # these reliably keep more than one token per pass here
            assert fast.stats.target_forwards < plain.stats.target_forwards


def greedy_gap(model, prompt: list[int], output: list[int]) -> float:
    """How far each output token is from the argmax of one uncached pass over prompt + output (logits)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output]))[0, len(prompt) - 1: len(prompt) - 1 + len(output)].float()
    chosen = logits[torch.arange(len(output)), torch.tensor(output)]
    return float((logits.max(dim=-1).values - chosen).max())


@pytest.mark.parametrize("name", ["lookup", "self-early-exit", "lookahead"])
def test_int4_speculation_is_greedy_decoding_of_the_same_weights(int4_llm, name):
    """bf16 activations (the fast int4 path): a k-token verification pass and k one-token passes round
    differently, so a near-tie can flip and the texts then diverge. What must hold is that every emitted token
    is the target's greedy choice up to that rounding: within a small logit gap of the argmax of one uncached
    pass over the whole output (a rollback or position bug yields gaps of several logits)."""
    for text in PROMPTS:
        ids = int4_llm.prompt_ids(text)
        plain = int4_llm.engine.generate(ids, max_new_tokens=48, stop_token_ids=set()).token_ids
        fast = int4_llm.engine.generate(ids, max_new_tokens=48, stop_token_ids=set(),
                                        strategy=_strategy(name, int4_llm.model)).token_ids
        assert greedy_gap(int4_llm.model, ids, fast) < 0.5
        assert greedy_gap(int4_llm.model, ids, plain) < 0.5
        assert fast[:8] == plain[:8]


def test_quantized_store_entry_loads_without_requantizing(tmp_path):
    from hayai.models.loading import load_model, quantize_to_store
    from hayai.models.store import ModelStore
    from hayai.quant import Int4Linear

    store = ModelStore(tmp_path / "models")
    entry = quantize_to_store(str(hayai.load(dtype="fp32").info.path), "int4", group_size=64, name="smol-int4",
                              dtype=torch.bfloat16, store=store)
    model, tokenizer, _ = load_model("smol-int4", dtype=torch.bfloat16, store=store)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
    reference = hayai.load(dtype="bf16").model
    quantize_model(reference, "int4", group_size=64, embeddings=True)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        assert torch.equal(model(ids), reference(ids))
    fp32_bytes = hayai.load(dtype="fp32").info.path.joinpath("model.safetensors").stat().st_size
    assert entry.size_bytes < 0.3 * fp32_bytes  # ~4.6 bits per weight instead of 32
