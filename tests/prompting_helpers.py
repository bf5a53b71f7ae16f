"""Helpers for the prompting tests: tiny local LLMs, a call-counting backend wrapper, a rule-based backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tinymodels import build_tiny_tokenizer, write_hf_checkpoint

from hayai.prompting.backends import GenParams, Price, Prompt, Result


def tiny_llm_at(directory: Path, seed: int = 0, **config_overrides):
    import hayai

    path = write_hf_checkpoint(directory, build_tiny_tokenizer(), seed=seed, **config_overrides)
    return hayai.load(str(path), dtype="fp32")


class CountingBackend:
    """Wraps a real backend and records every call it forwards (to prove cache hits make none)."""

    def __init__(self, inner):
        self.inner = inner
        self.id = inner.id
        self.calls: list[list[Prompt]] = []
        self.results: list[Result] = []

    @property
    def prompts_sent(self) -> int:
        return sum(len(c) for c in self.calls)

    def complete(self, prompts: Sequence[Prompt], params: GenParams) -> list[Result]:
        self.calls.append(list(prompts))
        results = self.inner.complete(prompts, params)
        self.results += results
        return results


def prompt_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


class RuleBackend:
    """A backend whose reply is a function of the prompt; tokens are whitespace words; cost from a Price."""

    def __init__(self, rule: Callable[[Prompt], str], id: str = "rule", price: Price = Price(1.0, 2.0, 0.5)):
        self.rule = rule
        self.id = id
        self.price = price
        self.calls: list[list[Prompt]] = []

    def complete(self, prompts: Sequence[Prompt], params: GenParams) -> list[Result]:
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            text = self.rule(p)
            n_in, n_out = len(prompt_text(p).split()), len(text.split())
            out.append(Result(text, n_in, n_out, 0.0, self.price.cost(n_in, n_out), "stop", self.id))
        return out
