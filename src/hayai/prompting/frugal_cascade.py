"""FrugalGPT LLM cascade (Chen, Zaharia & Zou 2023, "FrugalGPT: How to Use Large Language Models While Reducing
Cost and Improving Performance", arXiv 2305.05176).

A cascade is an ordered chain of stages s_1 .. s_d (a backend plus a prompt) with thresholds τ_1 .. τ_{d-1}:

    for j = 1 .. d:   a_j = s_j(q);   spent += cost_j(q)
                      if j == d or g_j(q, a_j) >= τ_j:  return a_j, spent        (the last stage always accepts)

g_j(q, a) ∈ [0, 1] is a scorer: the estimated probability that stage j's answer is correct. Here it is a
logistic regression (`classifier.py`) on all-MiniLM-L6-v2 embeddings of the pair,
φ(q, a) = [e("Q: q\\nA: a"); e(a)] (768 dims), trained on labelled data — the paper fine-tunes DistilBERT on the
same kind of labels. Labels come from running every stage on training questions with known answers.

Training (the paper's `LLMCascade.train`):
1. run every stage on every training question; record correctness L[n, s] and cost C[n, s];
2. fit a scorer per stage; the threshold search uses out-of-fold scores (k-fold cross-fitting), so it does not
   trust a scorer on the very answers it was fitted to;
3. for every chain (ordered choice of 1 .. max_depth stages) search the thresholds on a grid of score quantiles,
   maximising accuracy  (1/n) Σ_n L[n, stop(n)]  subject to the mean cost  (1/n) Σ_n Σ_{j <= stop(n)} C[n, j]
   <= budget; the best (accuracy, then lower cost) chain wins. FrugalGPT searches the same quantile
   parametrisation with scipy's brute-force optimiser over chains of exactly the maximum depth; here shorter
   chains, including every single stage, are candidates too, so the cascade never does worse on the training
   data than the best single stage within the budget.

Prompt adaptation (the paper's cheaper prompts) is a property of a stage: the same backend with fewer exemplars
is a cheaper stage. Completions can be cached (`cache.CachedBackend`), keyed by backend, parameters and prompt.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hayai.errors import ConfigError
from hayai.prompting.backends import Backend, GenParams, Prompt, Result
from hayai.prompting.classifier import LogisticClassifier
from hayai.prompting.embeddings import Embedder, default_embedder
from hayai.prompting.evalset import QAItem, is_correct

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# Stages and scorers
# ---------------------------------------------------------------------------------------------------------------


def few_shot_prompt(question: str, exemplars: Sequence[tuple[str, str]]) -> str:
    """ "Q: ..\\nA: ..\\n\\n" per exemplar, then "Q: <question>\\nA:" (answers stop at the end of the line)."""
    shots = "".join(f"Q: {q.strip()}\nA: {a.strip()}\n\n" for q, a in exemplars)
    return f"{shots}Q: {question.strip()}\nA:"


@dataclass
class Stage:
    """A backend with a prompt: few-shot raw text, or (chat=True) the same text as one user message."""

    backend: Backend
    exemplars: Sequence[tuple[str, str]] = ()
    params: GenParams = field(default_factory=lambda: GenParams(max_tokens=16, stop=("\n",)))
    chat: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        self.exemplars = [tuple(e) for e in self.exemplars]
        if not self.name:
            self.name = f"{self.backend.id}/e{len(self.exemplars)}"

    def prompt(self, question: str) -> Prompt:
        text = few_shot_prompt(question, self.exemplars)
        return [{"role": "user", "content": "Answer the last question in a few words.\n\n" + text}] if self.chat \
            else text

    def answer(self, questions: Sequence[str]) -> list[Result]:
        return self.backend.complete([self.prompt(q) for q in questions], self.params)


def pair_features(embedder: Embedder, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """φ(q, a) = [e("Q: q\\nA: a"); e(a)]  -> [N, 2D]."""
    pairs = [f"Q: {q.strip()}\nA: {a.strip()}" for q, a in zip(questions, answers, strict=True)]
    return torch.cat([embedder.encode(pairs), embedder.encode([a.strip() or "(empty)" for a in answers])], dim=1)


@dataclass
class AnswerScorer:
    """g(q, a): the probability that an answer is correct, from a classifier on pair embeddings."""

    classifier: LogisticClassifier
    embedder: Embedder | None = None

    @classmethod
    def fit(cls, features: torch.Tensor, labels: Sequence[bool], embedder: Embedder | None = None,
            l2: float = 1e-2) -> AnswerScorer:
        y = torch.tensor([float(v) for v in labels])
        return cls(LogisticClassifier.fit(features, y, l2=l2), embedder)

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        features = pair_features(self.embedder or default_embedder(), questions, answers)
        return self.classifier.predict_proba(features).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Training data: every stage on every training question
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StageRuns:
    """Stage outputs on training questions: answers [n][s], correct L [n, s], cost C [n, s]."""

    stage_names: list[str]
    questions: list[str]
    answers: list[list[str]]
    correct: np.ndarray  # [n, s] bool
    cost: np.ndarray  # [n, s] float

    def accuracy(self) -> np.ndarray:
        return self.correct.mean(axis=0)  # [s]

    def mean_cost(self) -> np.ndarray:
        return self.cost.mean(axis=0)  # [s]


def collect_runs(stages: Sequence[Stage], items: Sequence[QAItem],
                 metric: Callable[[str, Sequence[str]], bool] = is_correct,
                 progress: Progress | None = None) -> StageRuns:
    """Run every stage on every item (one backend call per stage) and grade the answers."""
    if not items:
        raise ConfigError("the cascade needs training questions")
    if any(not i.answers for i in items):
        raise ConfigError("every training question needs an answer")
    questions = [i.question for i in items]
    answers, correct, cost = [], [], []
    for done, stage in enumerate(stages):
        results = stage.answer(questions)
        answers.append([r.text.strip() for r in results])
        correct.append([metric(r.text, i.answers) for r, i in zip(results, items, strict=True)])
        cost.append([r.cost for r in results])
        if progress:
            progress(done + 1, len(stages))
    return StageRuns([s.name for s in stages], questions, [list(a) for a in zip(*answers, strict=True)],
                     np.array(correct, dtype=bool).T, np.array(cost, dtype=float).T)


def out_of_fold_scores(runs: StageRuns, features: Sequence[torch.Tensor], folds: int = 5,
                       seed: int = 0) -> np.ndarray:
    """Scores [n, s] where item i's score comes from a scorer fitted without item i (k-fold cross-fitting)."""
    n = len(runs.questions)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    scores = np.zeros((n, len(runs.stage_names)))
    for s, x in enumerate(features):
        for k in range(folds):
            held = order[k::folds]
            kept = np.setdiff1d(order, held)
            clf = LogisticClassifier.fit(x[kept], torch.tensor(runs.correct[kept, s], dtype=torch.float32), l2=1e-2)
            scores[held, s] = clf.predict_proba(x[held]).numpy()
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Threshold search
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ChainPlan:
    """A chain of stage indices with thresholds (len(chain) - 1 of them) and its training-set figures."""

    chain: list[int]
    thresholds: list[float]
    accuracy: float
    mean_cost: float


def simulate(chain: Sequence[int], thresholds: Sequence[float], scores: np.ndarray, correct: np.ndarray,
             cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each item stops [n], whether its answer is correct [n] and what it spent [n]."""
    n = scores.shape[0]
    stop = np.full(n, len(chain) - 1)
    undecided = np.ones(n, dtype=bool)
    for j, (s, tau) in enumerate(zip(chain[:-1], thresholds, strict=True)):
        accept = undecided & (scores[:, s] >= tau)
        stop[accept] = j
        undecided &= ~accept
    steps = np.arange(len(chain))[None, :] <= stop[:, None]  # [n, d] stages each item visited
    spent = (cost[:, chain] * steps).sum(axis=1)
    right = correct[np.arange(n), np.asarray(chain)[stop]]
    return stop, right, spent


def _grid(values: np.ndarray, size: int) -> np.ndarray:
    """Candidate thresholds: quantiles of the observed scores, plus 'accept all' (0) and 'accept none' (> 1)."""
    quantiles = np.quantile(values, np.linspace(0, 1, size)) if size > 0 else np.array([])
    return np.unique(np.concatenate([[0.0, 1.0 + 1e-9], quantiles]))


def search_thresholds(chain: Sequence[int], scores: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                      budget: float, grid_size: int = 24) -> ChainPlan | None:
    """The best thresholds for one chain under the budget (None if even the cheapest setting overspends)."""
    grids = [_grid(scores[:, s], grid_size) for s in chain[:-1]]
    best: ChainPlan | None = None
    for taus in itertools.product(*grids):
        _, right, spent = simulate(chain, taus, scores, correct, cost)
        acc, mean_cost = float(right.mean()), float(spent.mean())
        if mean_cost > budget + 1e-12:
            continue
        if best is None or (acc, -mean_cost) > (best.accuracy, -best.mean_cost):
            best = ChainPlan(list(chain), [float(t) for t in taus], acc, mean_cost)
    return best


def search_cascade(scores: np.ndarray, correct: np.ndarray, cost: np.ndarray, budget: float, max_depth: int = 3,
                   grid_size: int = 24) -> ChainPlan:
    """The best chain and thresholds over every ordered choice of 1 .. max_depth stages."""
    stages = range(correct.shape[1])
    best: ChainPlan | None = None
    for depth in range(1, max_depth + 1):
        for chain in itertools.permutations(stages, depth):
            plan = search_thresholds(chain, scores, correct, cost, budget, grid_size)
            if plan and (best is None or (plan.accuracy, -plan.mean_cost) > (best.accuracy, -best.mean_cost)):
                best = plan
    if best is None:
        cheapest = float(cost.mean(axis=0).min())
        raise ConfigError(f"budget {budget:g} per question is below the cheapest stage's mean cost "
                          f"({cheapest:g}); raise the budget")
    return best


# ---------------------------------------------------------------------------------------------------------------
# The cascade
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CascadeAnswer:
    question: str
    answer: str
    stage: int  # position in the chain where it stopped
    stage_name: str
    scores: list[float] = field(default_factory=list)  # scores of the answers it rejected or accepted
    results: list[Result] = field(default_factory=list)  # every backend result it paid for

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.results)


@dataclass
class CascadeStrategy:
    """What training produces: the chain (stage names), thresholds and scorers; saved as JSON."""

    chain: list[str]
    thresholds: list[float]
    scorers: dict[str, LogisticClassifier]
    budget: float
    train_accuracy: float = 0.0
    train_cost: float = 0.0
    stage_stats: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "thresholds": self.thresholds, "budget": self.budget,
                "train_accuracy": self.train_accuracy, "train_cost": self.train_cost,
                "stage_stats": self.stage_stats,
                "scorers": {name: clf.to_dict() for name, clf in self.scorers.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> CascadeStrategy:
        try:
            chain, thresholds = list(data["chain"]), [float(t) for t in data["thresholds"]]
            scorers = {k: LogisticClassifier.from_dict(v, source) for k, v in data["scorers"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: not a cascade strategy ({exc})") from None
        if len(thresholds) != len(chain) - 1 or any(name not in scorers for name in chain[:-1]):
            raise ConfigError(f"{source}: a chain of {len(chain)} stages needs {len(chain) - 1} thresholds and "
                              f"a scorer for each stage but the last")
        return cls(chain, thresholds, scorers, float(data.get("budget", 0.0)), float(data.get("train_accuracy", 0)),
                   float(data.get("train_cost", 0)), dict(data.get("stage_stats", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CascadeStrategy:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the cascade strategy {path}: {exc}") from None
        return cls.from_dict(data, str(path))


class Cascade:
    """Run a chain of stages: each question stops at the first stage whose answer scores >= its threshold."""

    def __init__(self, stages: Sequence[Stage], thresholds: Sequence[float], scorers: Sequence[AnswerScorer]):
        if len(stages) < 1:
            raise ConfigError("a cascade needs at least one stage")
        if len(thresholds) != len(stages) - 1 or len(scorers) < len(stages) - 1:
            raise ConfigError(f"{len(stages)} stages need {len(stages) - 1} thresholds and scorers, got "
                              f"{len(thresholds)} and {len(scorers)}")
        self.stages, self.thresholds, self.scorers = list(stages), list(thresholds), list(scorers)

    @classmethod
    def from_strategy(cls, strategy: CascadeStrategy, stages: Sequence[Stage],
                      embedder: Embedder | None = None) -> Cascade:
        by_name = {s.name: s for s in stages}
        missing = [n for n in strategy.chain if n not in by_name]
        if missing:
            raise ConfigError(f"the strategy uses stages {missing} that are not configured "
                              f"(configured: {sorted(by_name)})")
        return cls([by_name[n] for n in strategy.chain], strategy.thresholds,
                   [AnswerScorer(strategy.scorers[n], embedder) for n in strategy.chain[:-1]])

    def run(self, questions: Sequence[str]) -> list[CascadeAnswer]:
        """All pending questions go to a stage in one backend call; only the rejected ones go on."""
        out = [CascadeAnswer(q, "", -1, "") for q in questions]
        pending = list(range(len(questions)))
        last = len(self.stages) - 1
        for j, stage in enumerate(self.stages):
            if not pending:
                break
            asked = [questions[i] for i in pending]
            results = stage.answer(asked)
            answers = [r.text.strip() for r in results]
            scores = self.scorers[j].score(asked, answers) if j < last else [None] * len(pending)
            still = []
            for i, result, answer, score in zip(pending, results, answers, scores, strict=True):
                record = out[i]
                record.results.append(result)
                if score is not None:
                    record.scores.append(float(score))
                if j == last or score >= self.thresholds[j]:
                    record.answer, record.stage, record.stage_name = answer, j, stage.name
                else:
                    still.append(i)
            pending = still
        return out


@dataclass
class CascadeTraining:
    """Everything training computed, so a cost-accuracy curve needs one collection pass for many budgets."""

    stages: list[Stage]
    runs: StageRuns
    features: list[torch.Tensor]
    oof_scores: np.ndarray  # [n, s]
    scorers: list[AnswerScorer]

    def strategy(self, budget: float, max_depth: int = 3, grid_size: int = 24) -> CascadeStrategy:
        plan = search_cascade(self.oof_scores, self.runs.correct, self.runs.cost, budget, max_depth, grid_size)
        names = [self.stages[s].name for s in plan.chain]
        stats = {name: {"accuracy": float(a), "mean_cost": float(c)}
                 for name, a, c in zip(self.runs.stage_names, self.runs.accuracy(), self.runs.mean_cost(),
                                       strict=True)}
        return CascadeStrategy(names, plan.thresholds,
                               {self.stages[s].name: self.scorers[s].classifier for s in plan.chain[:-1]},
                               budget, plan.accuracy, plan.mean_cost, stats)

    def cascade(self, budget: float, max_depth: int = 3) -> Cascade:
        return Cascade.from_strategy(self.strategy(budget, max_depth), self.stages, self.scorers[0].embedder)


def prepare_cascade(stages: Sequence[Stage], items: Sequence[QAItem], *, embedder: Embedder | None = None,
                    folds: int = 5, metric: Callable[[str, Sequence[str]], bool] = is_correct,
                    progress: Progress | None = None) -> CascadeTraining:
    """Steps 1-2 of training: run the stages, embed the answers, fit scorers and out-of-fold scores."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}")
    embedder = embedder or default_embedder()
    runs = collect_runs(stages, items, metric, progress)
    features = [pair_features(embedder, runs.questions, [a[s] for a in runs.answers]) for s in range(len(stages))]
    scorers = [AnswerScorer.fit(x, runs.correct[:, s], embedder) for s, x in enumerate(features)]
    return CascadeTraining(list(stages), runs, features, out_of_fold_scores(runs, features, folds), scorers)


def train_cascade(stages: Sequence[Stage], items: Sequence[QAItem], budget: float, *, max_depth: int = 3,
                  embedder: Embedder | None = None, folds: int = 5,
                  metric: Callable[[str, Sequence[str]], bool] = is_correct,
                  progress: Progress | None = None) -> tuple[Cascade, CascadeStrategy]:
    """Train a cascade under an average cost budget per question (in the backends' price units)."""
    training = prepare_cascade(stages, items, embedder=embedder, folds=folds, metric=metric, progress=progress)
    strategy = training.strategy(budget, max_depth)
    return Cascade.from_strategy(strategy, stages, embedder or training.scorers[0].embedder), strategy
