"""FastCoT early answers: stop a chain of thought after a budget and answer from exact + approximate tokens.

Zhang et al. 2023, "Fast Chain-of-Thought: A Glance of Future from Parallel Decoding Leads to Answers Faster"
(arXiv 2311.08263). Each forward pass decodes autoregressively and refines a window of future tokens
Jacobi-style at once (`hayai.decode.jacobi`): the verified prefix grows exactly as greedy decoding would,
and the window holds approximate tokens of the reasoning still to come. When the budget of forward passes
is spent, the answer trigger (e.g. "Therefore, the answer is") is appended after

    prompt + exact reasoning tokens + approximate tokens          (the "glance of the future")

and the answer is decoded greedily. This is **not lossless**: the answer depends on approximate tokens and
on the reasoning being cut short, so it trades accuracy for time; `benchmarks/decode.py` reports the answers
next to those of the full chain of thought and of a chain of thought truncated at the same budget without the
approximate tokens (`use_approximate=False`). The paper varies the window size with position; here it is
fixed (the paper reports results robust to its size).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hayai.decode.draft_length import DraftLength
from hayai.decode.engine import Engine, GenerationStats
from hayai.decode.jacobi import Jacobi
from hayai.decode.sampling import SamplingParams
from hayai.decode.speculative import SpeculativeDecoding
from hayai.errors import ConfigError


@dataclass
class EarlyAnswer:
    exact: list[int]  # reasoning tokens, identical to greedy decoding
    approximate: list[int]  # unverified Jacobi guesses that followed them when the budget ran out
    answer: list[int]  # tokens decoded after prompt + exact + approximate + trigger
    answer_text: str
    reasoning_forwards: int  # target passes spent on the reasoning (after prefill)
    finished: bool  # the reasoning reached an end-of-sequence token within the budget
    seconds: float  # wall time, reasoning and answer


def early_answer(engine: Engine, prompt_ids: Sequence[int], trigger_ids: Sequence[int], *, budget: int,
                 window: int = 8, use_approximate: bool = True, answer_tokens: int = 32,
                 stop_token_ids: frozenset[int] | None = None) -> EarlyAnswer:
    """Reason for at most `budget` forward passes, then answer after the trigger (see the module docstring)."""
    if budget < 0:
        raise ConfigError(f"FastCoT budget must be >= 0 forward passes, got {budget}")
    if not trigger_ids:
        raise ConfigError("FastCoT needs a non-empty answer trigger")
    eos = engine.tokenizer.eos_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
    model = engine.model
    prompt = list(prompt_ids)
    source = Jacobi(window, stop_token_ids=eos)
    strategy = SpeculativeDecoding(source, DraftLength(window, schedule="constant", maximum=window))
    most = 1 + budget * (window + 1)  # tokens the reasoning can produce within the budget
    engine.check_fits(len(prompt), most + window + len(trigger_ids) + answer_tokens)
    stats = GenerationStats()
    exact: list[int] = []
    finished = False
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = model.new_cache(1, len(prompt) + most + strategy.extra_cache_slots)
        strategy.start(model, cache, torch.tensor([prompt], device=model.device), SamplingParams(), None, stats)
        while not finished and len(exact) < most and (not exact or stats.target_forwards < budget):
            for token in strategy.step(most - len(exact)):
                if token in eos:
                    finished = True
                    break
                exact.append(token)
    approximate = [] if finished or not use_approximate else [t for t in source.guesses if t not in eos]
    completion = engine.generate(prompt + exact + approximate + list(trigger_ids), max_new_tokens=answer_tokens,
                                 stop_token_ids=eos)
    return EarlyAnswer(exact, approximate, completion.token_ids, completion.text, stats.target_forwards, finished,
                       time.perf_counter() - t0)
