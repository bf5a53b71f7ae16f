"""Batch Prompting (Cheng, Kasai & Yu 2023, "Batch Prompting: Efficient Inference with Large Language Model
APIs", arXiv 2301.08721): K questions share one prompt, so the exemplars are paid for once per K questions.

Prompt (exemplars batched the same way, groups separated by a blank line; the model continues after "A[1]:"):

    Q[1]: What is the capital of Italy?
    Q[2]: What is 3 + 4?
    A[1]: Rome
    A[2]: 7

    Q[1]: <test question 1>
    ...
    Q[K]: <test question K>
    A[1]:

With E exemplars and questions of q tokens, a prompt costs about E·(q + a) + K·q tokens for K answers, so the
prompt tokens per question fall roughly as 1/K (the paper's "almost inverse linear" cost).

The answer parser is keyed on the index with a regular expression (`A[i]: text` up to the next `A[j]:` or line
end), so index 10 and above parse correctly (the original extractor sliced a fixed 6 characters), duplicates keep
the first answer, indices out of range are ignored, and answers may come in any order. Questions whose answers are
missing or empty are asked again alone (K = 1, same exemplars).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from hayai.errors import ConfigError
from hayai.prompting.backends import Backend, GenParams, Result

_ANSWER = re.compile(r"A\s*\[\s*(\d+)\s*\]\s*:[ \t]*(.*?)[ \t]*(?=A\s*\[\s*\d+\s*\]\s*:|\n|$)")


def format_group(questions: Sequence[str], answers: Sequence[str] | None = None) -> str:
    """One group: Q[1..n] lines, then A[1..n] lines when answers are given."""
    lines = [f"Q[{i}]: {q.strip()}" for i, q in enumerate(questions, 1)]
    if answers is not None:
        lines += [f"A[{i}]: {a.strip()}" for i, a in enumerate(answers, 1)]
    return "\n".join(lines)


def format_batch_prompt(questions: Sequence[str], exemplars: Sequence[tuple[str, str]], k: int,
                        instruction: str = "") -> str:
    """The whole prompt for one batch of questions; the exemplars are grouped k at a time."""
    if k < 1:
        raise ConfigError(f"the batch size k must be >= 1, got {k}")
    blocks = [instruction.strip()] if instruction.strip() else []
    for start in range(0, len(exemplars), k):
        group = exemplars[start:start + k]
        blocks.append(format_group([q for q, _ in group], [a for _, a in group]))
    blocks.append(format_group(questions) + "\nA[1]:")
    return "\n\n".join(blocks)


def parse_batch_answers(text: str, n: int) -> list[str | None]:
    """Answers 1..n from a completion that may start right after "A[1]:" (prepend it first); None = missing."""
    answers: list[str | None] = [None] * n
    for match in _ANSWER.finditer(text):
        index, answer = int(match.group(1)), match.group(2).strip()
        if 1 <= index <= n and answers[index - 1] is None and answer:
            answers[index - 1] = answer
    return answers


@dataclass
class BatchAnswers:
    answers: list[str | None]  # one per question, None if the model never answered it
    results: list[Result] = field(default_factory=list)  # every backend result: the batches, then the retries
    retried: list[int] = field(default_factory=list)  # questions asked again alone

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.results)


def batch_prompt(backend: Backend, questions: Sequence[str], exemplars: Sequence[tuple[str, str]], k: int, *,
                 answer_tokens: int = 16, params: GenParams | None = None, instruction: str = "",
                 retry_missing: bool = True) -> BatchAnswers:
    """Answer `questions` k at a time. All batches go to the backend in one call (one decoding batch locally,
    concurrent requests remotely); then the questions left unanswered go in one more call, one per prompt.

    `params` defaults to greedy decoding with room for `answer_tokens` per question, stopping at a blank line.
    """
    if not questions:
        return BatchAnswers([])
    groups = [list(range(s, min(s + k, len(questions)))) for s in range(0, len(questions), max(k, 1))]
    prompts = [format_batch_prompt([questions[i] for i in g], exemplars, k, instruction) for g in groups]
    # Stop at a blank line, a new question, or an answer index past the batch.
    call = params or GenParams(max_tokens=answer_tokens * k + 4, stop=("\n\n", "\nQ[", f"\nA[{k + 1}]"))
    results = backend.complete(prompts, call)
    answers: list[str | None] = [None] * len(questions)
    for group, result in zip(groups, results, strict=True):
        for i, answer in zip(group, parse_batch_answers("A[1]:" + result.text, len(group)), strict=True):
            answers[i] = answer
    out = BatchAnswers(answers, list(results))
    missing = [i for i, a in enumerate(answers) if a is None]
    if retry_missing and missing:
        single = params or GenParams(max_tokens=answer_tokens + 4, stop=("\n\n", "\nQ["))
        retry_prompts = [format_batch_prompt([questions[i]], exemplars, 1, instruction) for i in missing]
        retry_results = backend.complete(retry_prompts, single)
        for i, result in zip(missing, retry_results, strict=True):
            out.answers[i] = parse_batch_answers("A[1]:" + result.text, 1)[0]
        out.results += retry_results
        out.retried = missing
    return out
