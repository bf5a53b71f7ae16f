"""Routers that decide whether Skeleton-of-Thought suits a question (SoT-R, Ning et al. 2023, arXiv 2307.15337,
section 4).

- `PromptRouter` asks the model itself the paper's A/B/C question: A (a list of independent points) routes to SoT;
  B (dependent points) and C (no list) go to normal generation. It costs one short LLM call per question.
- `EmbeddingRouter` is the cheap alternative: a logistic regression on all-MiniLM-L6-v2 sentence embeddings,
  p(SoT | question) = σ(wᵀ e(question) + b), routed to SoT when p >= threshold. The paper fine-tunes RoBERTa on
  labelled LIMA questions; here the labels are the bundled `sot_questions.jsonl` (or any labelled file), and the
  model is small enough to train in a second on first use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from hayai.errors import ConfigError
from hayai.prompting.backends import Backend, GenParams
from hayai.prompting.classifier import LogisticClassifier
from hayai.prompting.embeddings import Embedder, default_embedder
from hayai.prompting.evalset import QAItem, load_sot_questions
from hayai.prompting.skeleton_of_thought import SoTPrompts

_CHOICE = re.compile(r"\b([ABC])\b")


def parse_router_choice(text: str) -> str | None:
    """The first standalone A, B or C in the reply (e.g. "A", "A.", "Answer: B"), or None."""
    match = _CHOICE.search(text.strip())
    return match.group(1) if match else None


class PromptRouter:
    """Asks the backend the A/B/C routing question; only A routes to SoT (an unparseable reply does not)."""

    def __init__(self, backend: Backend, prompts: SoTPrompts | None = None,
                 params: GenParams = GenParams(max_tokens=4)):
        self.backend = backend
        self.template = (prompts or SoTPrompts.load()).router
        self.params = params
        self.last_results: list = []

    def __call__(self, questions: Sequence[str]) -> list[bool]:
        results = self.backend.complete([self.template.messages(question=q) for q in questions], self.params)
        self.last_results = results
        return [parse_router_choice(r.text) == "A" for r in results]


class EmbeddingRouter:
    """A trained classifier on sentence embeddings: SoT when p(suits | question) >= threshold."""

    def __init__(self, classifier: LogisticClassifier, embedder: Embedder | None = None, threshold: float = 0.5):
        self.classifier = classifier
        self.embedder = embedder
        self.threshold = threshold

    @classmethod
    def fit(cls, questions: Sequence[str], labels: Sequence[bool], embedder: Embedder | None = None,
            threshold: float = 0.5, l2: float = 1e-3) -> EmbeddingRouter:
        if len(questions) != len(labels):
            raise ConfigError(f"{len(questions)} questions but {len(labels)} labels")
        embedder = embedder or default_embedder()
        x = embedder.encode(list(questions))  # [N, D]
        y = torch.tensor([float(bool(v)) for v in labels])
        return cls(LogisticClassifier.fit(x, y, l2=l2), embedder, threshold)

    @classmethod
    def from_items(cls, items: Sequence[QAItem], embedder: Embedder | None = None, **kwargs) -> EmbeddingRouter:
        """From labelled items (`extra["suits_sot"]`), e.g. `load_sot_questions("train")`."""
        labelled = [i for i in items if "suits_sot" in i.extra]
        if not labelled:
            raise ConfigError("no question carries a 'suits_sot' label")
        return cls.fit([i.question for i in labelled], [bool(i.extra["suits_sot"]) for i in labelled], embedder,
                       **kwargs)

    @classmethod
    def default(cls, embedder: Embedder | None = None) -> EmbeddingRouter:
        """Trained on every bundled labelled question."""
        return cls.from_items(load_sot_questions(), embedder)

    def probabilities(self, questions: Sequence[str]) -> torch.Tensor:
        embedder = self.embedder or default_embedder()
        return self.classifier.predict_proba(embedder.encode(list(questions)))  # [N]

    def __call__(self, questions: Sequence[str]) -> list[bool]:
        return [bool(p >= self.threshold) for p in self.probabilities(questions)]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"threshold": self.threshold, **self.classifier.to_dict()}))

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> EmbeddingRouter:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the router from {path}: {exc}") from None
        return cls(LogisticClassifier.from_dict(data, str(path)), embedder, float(data.get("threshold", 0.5)))
