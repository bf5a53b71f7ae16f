"""Skeleton-of-Thought (Ning et al. 2023, "Skeleton-of-Thought: Prompting LLMs for Efficient Parallel
Generation", arXiv 2307.15337): ask for a short skeleton first, then expand every point in parallel.

    skeleton   = LLM(skeleton_prompt(question), prefix "1.")            -> points (i, p_i), 3-10 of 3-5 words
    expansion_i = LLM(point_prompt(question, skeleton, i), prefix "i. p_i")  for all i at once
    answer     = "\\n\\n".join("i. p_i" + expansion_i)

Latency is skeleton + max_i(expansion_i) instead of the time to write the whole answer token by token: locally
the expansions decode as one batch (a decode step costs about the same for 1 or 8 rows on memory-bound
hardware), remotely they are concurrent requests. Total tokens grow (the question and skeleton are repeated in
every point prompt), so SoT buys latency, not cost.

The prompts are data (`data/sot_prompts.json`); each is a user message plus an assistant prefix the model
continues. SoT suits questions whose answer is a list of independent points; a router (`sot_router.py`) sends the
rest (arithmetic, code, single facts) to normal generation.

Skeleton parsing (after the paper's `(\\d+)\\.\\s?(...)` extraction): one point per line that starts with a number and
"." or ")"; the first occurrence of an index (and of a point's text) wins, points are ordered by index, at most
`max_points` are kept, and anything after the numbered list (a model that starts writing the answer) is ignored.
An expansion is cut where the model starts writing another numbered point. With fewer than
`min_points` points the question is answered normally.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hayai.errors import ConfigError
from hayai.models.tokenizer import Message
from hayai.prompting.backends import Backend, GenParams, Result

_POINT_LINE = re.compile(r"^\s*(?:[-*]\s*)?\**(\d{1,3})\**\s*[.)]\s*(.*?)\s*$")
_NEXT_POINT = re.compile(r"\s\d{1,3}[.)]\s")  # "... 2. Next point" inline or on a new line


@dataclass(frozen=True)
class PromptTemplate:
    user: str
    prefill: str = ""

    def messages(self, **fields: Any) -> list[Message]:
        messages = [{"role": "user", "content": self.user.format(**fields)}]
        if self.prefill:
            messages.append({"role": "assistant", "content": self.prefill.format(**fields)})
        return messages


@dataclass(frozen=True)
class SoTPrompts:
    skeleton: PromptTemplate
    point: PromptTemplate
    router: PromptTemplate

    @classmethod
    def load(cls, path: str | Path | None = None) -> SoTPrompts:
        """The bundled prompts, or a JSON file with "skeleton", "point" and "router" entries {"user", "prefill"}."""
        source = Path(path) if path else Path(str(resources.files("hayai.prompting") / "data" / "sot_prompts.json"))
        try:
            data = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read SoT prompts from {source}: {exc}") from None
        templates = {}
        for name in ("skeleton", "point", "router"):
            entry = data.get(name)
            if not isinstance(entry, dict) or not isinstance(entry.get("user"), str):
                raise ConfigError(f"{source}: '{name}' must be an object with a 'user' string (and 'prefill')")
            templates[name] = PromptTemplate(entry["user"], entry.get("prefill", ""))
        return cls(**templates)


def parse_skeleton(text: str, max_points: int = 10) -> list[tuple[int, str]]:
    """Numbered points (index, text) of a skeleton, ordered by index; the first occurrence of an index and of a
    point's text is kept (small models repeat points)."""
    points: dict[int, str] = {}
    seen_texts: set[str] = set()
    started = False
    for line in text.splitlines():
        match = _POINT_LINE.match(line)
        if match is None:
            if started and line.strip() and len(points) >= 1 and not line.startswith((" ", "\t")):
                break  # prose after the list: the model began answering
            continue
        started = True
        index, point = int(match.group(1)), match.group(2).strip().strip("*").strip()
        key = point.lower().rstrip(".")
        if index >= 1 and point and index not in points and key not in seen_texts:
            points[index] = point
            seen_texts.add(key)
    return sorted(points.items())[:max_points]


def clean_expansion(text: str) -> str:
    """A point's expansion up to where the model starts writing the next point."""
    match = _NEXT_POINT.search(text)
    return (text[:match.start()] if match else text).strip()


def join_point(prefix: str, content: str) -> str:
    if not content:
        return prefix
    return prefix + (content if content[0] in ".,;:!?)" else " " + content)


@dataclass
class SoTAnswer:
    question: str
    text: str
    used_sot: bool  # False: routed to (or fell back on) normal generation
    points: list[tuple[int, str]] = field(default_factory=list)
    skeleton: Result | None = None
    expansions: list[Result] = field(default_factory=list)
    normal: Result | None = None
    skeleton_seconds: float = 0.0
    expand_seconds: float = 0.0

    @property
    def results(self) -> list[Result]:
        return [r for r in (self.skeleton, *self.expansions, self.normal) if r is not None]

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.results)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)


Router = Callable[[Sequence[str]], list[bool]]


class SkeletonOfThought:
    """Answer questions with SoT over any backend; `router` (questions -> suits SoT?) gates it per question."""

    def __init__(self, backend: Backend, *, prompts: SoTPrompts | None = None, router: Router | None = None,
                 max_points: int = 10, min_points: int = 2,
                 skeleton_params: GenParams = GenParams(max_tokens=96, stop=("\n\n",)),
                 point_params: GenParams = GenParams(max_tokens=64, stop=("\n\n",)),
                 normal_params: GenParams = GenParams(max_tokens=384)):
        if not 1 <= min_points <= max_points:
            raise ConfigError(f"need 1 <= min_points <= max_points, got {min_points} and {max_points}")
        self.backend = backend
        self.prompts = prompts or SoTPrompts.load()
        self.router = router
        self.max_points, self.min_points = max_points, min_points
        self.skeleton_params, self.point_params, self.normal_params = skeleton_params, point_params, normal_params

    def __call__(self, question: str) -> SoTAnswer:
        return self.answer_many([question])[0]

    def answer_many(self, questions: Sequence[str]) -> list[SoTAnswer]:
        """Skeletons of all routed questions in one backend call, then every point of every question in one."""
        suits = self.router(questions) if self.router else [True] * len(questions)
        answers = [SoTAnswer(q, "", used_sot=s) for q, s in zip(questions, suits, strict=True)]
        sot = [a for a in answers if a.used_sot]
        if sot:
            self._skeletons(sot)
        for answer in sot:
            if len(answer.points) < self.min_points:
                answer.used_sot = False
        expanding = [a for a in sot if a.used_sot]
        if expanding:
            self._expand(expanding)
        normal = [a for a in answers if not a.used_sot]
        if normal:
            results = self.backend.complete([[{"role": "user", "content": a.question}] for a in normal],
                                            self.normal_params)
            for answer, result in zip(normal, results, strict=True):
                answer.normal, answer.text = result, result.text.strip()
        return answers

    def _skeletons(self, answers: list[SoTAnswer]) -> None:
        template = self.prompts.skeleton
        t0 = time.perf_counter()
        results = self.backend.complete([template.messages(question=a.question) for a in answers],
                                        self.skeleton_params)
        elapsed = time.perf_counter() - t0
        prefix = template.prefill.format(question="")
        for answer, result in zip(answers, results, strict=True):
            text = result.text
            # A server that ignores the prefill answers from scratch; do not add the prefix twice.
            skeleton = text if text.lstrip().startswith(prefix.strip()) else prefix + text
            answer.skeleton, answer.skeleton_seconds = result, elapsed
            answer.points = parse_skeleton(skeleton, self.max_points)

    def _expand(self, answers: list[SoTAnswer]) -> None:
        template = self.prompts.point
        requests, owners = [], []
        for answer in answers:
            skeleton = "\n".join(f"{i}. {p}" for i, p in answer.points)
            for i, point in answer.points:
                requests.append(template.messages(question=answer.question, skeleton=skeleton, index=i,
                                                  point=point))
                owners.append((answer, i, point))
        t0 = time.perf_counter()
        results = self.backend.complete(requests, self.point_params)
        elapsed = time.perf_counter() - t0
        parts: dict[int, list[str]] = {}
        for (answer, i, point), result in zip(owners, results, strict=True):
            prefix = template.prefill.format(question=answer.question, skeleton="", index=i, point=point)
            content = clean_expansion(result.text)
            if content.startswith(prefix):  # the server ignored the prefill and restated the point
                content = content[len(prefix):].lstrip()
            answer.expansions.append(result)
            answer.expand_seconds = elapsed
            parts.setdefault(id(answer), []).append(join_point(prefix, content))
        for answer in answers:
            answer.text = "\n\n".join(parts[id(answer)])
