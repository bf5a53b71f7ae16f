"""The generation engine: greedy equals recomputation, streaming, stop conditions, context limits, sampling."""

from __future__ import annotations

import pytest
import torch

from hayai.decode.engine import StopChecker
from hayai.decode.sampling import SamplingParams, probabilities, select, warp
from hayai.errors import ConfigError, ContextOverflowError


def greedy_reference(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_recomputing_each_step(tiny_llm):
    prompt = tiny_llm.prompt_ids("Hello world", raw=True)
    completion = tiny_llm.engine.generate(prompt, max_new_tokens=24, stop_token_ids=set())
    assert completion.token_ids == greedy_reference(tiny_llm.model, prompt, 24)
    assert completion.finish_reason == "length" and completion.stats.generated_tokens == 24
    assert completion.stats.target_forwards == 23  # the last token needs no forward pass


def test_streamed_pieces_concatenate_to_the_completion(tiny_llm):
    stream = tiny_llm.stream("The quick brown fox", max_tokens=30, raw=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.completion.text
    assert stream.completion.text == tiny_llm.tokenizer.decode(stream.completion.token_ids)
    assert tiny_llm.last_completion is stream.completion


def test_end_of_sequence_token_stops_generation(tiny_llm):
    prompt = tiny_llm.prompt_ids("Hello", raw=True)
    reference = greedy_reference(tiny_llm.model, prompt, 12)
    cut = next(i for i in range(1, 12) if reference[i] not in reference[:i])
    completion = tiny_llm.engine.generate(prompt, max_new_tokens=12, stop_token_ids={reference[cut]})
    assert completion.token_ids == reference[:cut] and completion.finish_reason == "stop"


def test_stop_string_truncates_text(tiny_llm):
    full = tiny_llm.generate("Hello world", raw=True, max_tokens=30)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    stream = tiny_llm.stream("Hello world", raw=True, max_tokens=30, stop=[stop])
    text = "".join(stream)
    assert text == full[: full.index(stop)] and stream.completion.finish_reason == "stop"


def test_stop_checker_holds_back_partial_matches():
    checker = StopChecker(["END", "###"])
    assert checker.push("hello E") == ("hello ", False)
    assert checker.push("N") == ("", False)
    assert checker.push("x more #") == ("ENx more ", False)
    assert checker.push("## tail") == ("", True)
    assert checker.text == "hello ENx more "


def test_stop_checker_releases_held_text_at_the_end():
    checker = StopChecker(["STOP"])
    assert checker.push("abc ST") == ("abc ", False)
    assert checker.flush() == "ST"


def test_prompt_over_the_context_window_is_refused_or_truncated(tiny_llm):
    context = tiny_llm.model.config.max_position_embeddings
    prompt = list(range(5, 5 + 100)) * 2  # 200 tokens, context is 128
    with pytest.raises(ContextOverflowError, match="context window of 128"):
        tiny_llm.engine.generate(prompt, max_new_tokens=8)
    completion = tiny_llm.engine.generate(prompt, max_new_tokens=8, truncate=True, stop_token_ids=set())
    assert completion.stats.prompt_tokens == context - 8 and len(completion.token_ids) == 8


def test_invalid_requests_are_config_errors(tiny_llm):
    with pytest.raises(ConfigError):
        tiny_llm.engine.generate([], max_new_tokens=4)
    with pytest.raises(ConfigError):
        tiny_llm.engine.generate([5], max_new_tokens=0)
    with pytest.raises(ConfigError):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError):
        SamplingParams(top_p=0)


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(tiny_llm):
    def run(seed):
        return tiny_llm.generate("Hello", raw=True, max_tokens=20, temperature=1.5, seed=seed)

    assert run(1) == run(1)
    assert len({run(s) for s in range(4)}) > 1


def test_stats_are_consistent(tiny_llm):
    tiny_llm.generate("Hello world", raw=True, max_tokens=12)
    stats = tiny_llm.last_completion.stats
    assert stats.prompt_tokens == len(tiny_llm.prompt_ids("Hello world", raw=True))
    assert stats.peak_memory_bytes > 0 and stats.weight_bytes_per_forward > 0
    assert "prefill:" in stats.summary() and "decode:" in stats.summary()


# ---- sampling --------------------------------------------------------------------------------------------------
def brute_force_filter(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    probs = logits.softmax(-1)
    order = sorted(range(len(logits)), key=lambda i: -logits[i].item())
    kept = order[:top_k] if top_k else order
    mass, chosen = 0.0, []
    for i in kept:
        if mass >= top_p:
            break
        chosen.append(i)
        mass += probs[i].item() / probs[kept].sum().item()
    return set(chosen)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (1, 0.9)])
def test_top_k_top_p_keep_the_right_tokens(top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, 2.5])
    kept = torch.isfinite(warp(logits, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)))
    assert set(torch.nonzero(kept).flatten().tolist()) == brute_force_filter(logits, top_k, top_p)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 2.0]])
    params = SamplingParams(temperature=0.8, top_k=4)
    expected = probabilities(logits, params)[0]
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = select(logits.expand(n, -1), params, g)
    counts = torch.bincount(draws, minlength=5).float()
    assert counts[2] == 0  # filtered by top-k
    observed = counts[expected > 0]
    exp = expected[expected > 0] * n
    chi2 = ((observed - exp) ** 2 / exp).sum().item()
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_greedy_probabilities_are_one_hot():
    logits = torch.tensor([[0.1, 3.0, 2.9]])
    assert probabilities(logits, SamplingParams()).tolist() == [[0.0, 1.0, 0.0]]
    assert select(logits, SamplingParams()).tolist() == [1]


# ---- batched generation ----------------------------------------------------------------------------------------
def test_batched_greedy_equals_one_at_a_time(tiny_llm):
    texts = ["Hello world", "The quick brown fox jumps over", "def add(a, b):", "Small", "naïve café"]
    prompts = [tiny_llm.prompt_ids(t, raw=True) for t in texts]
    alone = [tiny_llm.engine.generate(p, max_new_tokens=16) for p in prompts]
    batched = tiny_llm.engine.generate_batch(prompts, max_new_tokens=16)
    for a, b in zip(alone, batched, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason


def test_batched_rows_stop_independently(tiny_llm):
    prompts = [tiny_llm.prompt_ids(t, raw=True) for t in ["Hello world", "The quick brown fox", "Small models"]]
    reference = [greedy_reference(tiny_llm.model, p, 10) for p in prompts]
    stop_ids = {reference[0][3]}  # the first row ends early on this "end" token; others may too, or not
    batched = tiny_llm.engine.generate_batch(prompts, max_new_tokens=10, stop_token_ids=stop_ids)
    for ref, completion in zip(reference, batched, strict=True):
        cut = next((i for i, t in enumerate(ref) if t in stop_ids), None)
        assert completion.token_ids == (ref if cut is None else ref[:cut])
        assert completion.finish_reason == ("length" if cut is None else "stop")


def test_batched_sampling_per_row_seeds_reproduce_single_runs(tiny_llm):
    prompts = [tiny_llm.prompt_ids(t, raw=True) for t in ["Hello", "The quick"]]
    params = [SamplingParams(temperature=1.3, seed=7), SamplingParams(temperature=0.9, top_p=0.9, seed=11)]
    alone = [tiny_llm.engine.generate(p, max_new_tokens=12, sampling=s, stop_token_ids=set())
             for p, s in zip(prompts, params, strict=True)]
    batched = tiny_llm.engine.generate_batch(prompts, max_new_tokens=12, sampling=params, stop_token_ids=set())
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
