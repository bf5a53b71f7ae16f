"""FrugalGPT cascade: stops at the first stage whose score passes, spends exactly what the backends reported,
searches thresholds under the budget, and trains end to end; cached reruns make no backend call."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from prompting_helpers import CountingBackend, RuleBackend, tiny_llm_at

from hayai.errors import ConfigError
from hayai.prompting.backends import LocalBackend, Price
from hayai.prompting.cache import CachedBackend, CompletionCache
from hayai.prompting.classifier import LogisticClassifier
from hayai.prompting.embeddings import default_embedder
from hayai.prompting.evalset import load_eval_set
from hayai.prompting.frugal_cascade import (
    AnswerScorer,
    Cascade,
    CascadeStrategy,
    Stage,
    few_shot_prompt,
    search_cascade,
    search_thresholds,
    simulate,
    train_cascade,
)


def random_runs(n=40, s=3, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, s))
    correct = rng.random((n, s)) < np.array([0.4, 0.6, 0.9])[:s]
    cost = np.array([1.0, 3.0, 10.0])[:s] * (1 + 0.2 * rng.random((n, s)))
    return scores, correct, cost


def test_simulate_equals_an_explicit_loop():
    scores, correct, cost = random_runs()
    chain, taus = [2, 0, 1], [0.5, 0.3]
    stop, right, spent = simulate(chain, taus, scores, correct, cost)
    for n in range(scores.shape[0]):
        total = 0.0
        for j, s in enumerate(chain):
            total += cost[n, s]
            if j == len(chain) - 1 or scores[n, s] >= taus[j]:
                break
        assert stop[n] == j and right[n] == correct[n, chain[j]] and spent[n] == pytest.approx(total)


def test_threshold_search_is_optimal_on_its_grid_and_respects_the_budget():
    scores, correct, cost = random_runs()
    budget = 6.0
    plan = search_thresholds([0, 2], scores, correct, cost, budget, grid_size=40)
    assert plan.mean_cost <= budget
    # brute force over every distinct score as a threshold
    best = max(
        (float(r.mean()), -float(c.mean()))
        for tau in np.concatenate([[0.0, 2.0], scores[:, 0]])
        for _, r, c in [simulate([0, 2], [tau], scores, correct, cost)] if c.mean() <= budget)
    assert plan.accuracy == pytest.approx(best[0])


def test_cascade_search_never_loses_to_a_single_stage_within_budget():
    scores, correct, cost = random_runs(seed=1)
    for budget in (1.3, 4.0, 8.0, 20.0):
        plan = search_cascade(scores, correct, cost, budget, max_depth=3)
        singles = [correct[:, s].mean() for s in range(3) if cost[:, s].mean() <= budget]
        assert plan.mean_cost <= budget and plan.accuracy >= max(singles)
    with pytest.raises(ConfigError, match="budget"):
        search_cascade(scores, correct, cost, 0.5)


@pytest.fixture(scope="module")
def tiny_stages(tmp_path_factory):
    a = LocalBackend.of(tiny_llm_at(tmp_path_factory.mktemp("a"), seed=0), name="tiny-a", price=Price(1, 2))
    b = LocalBackend.of(tiny_llm_at(tmp_path_factory.mktemp("b"), seed=1), name="tiny-b", price=Price(10, 20, 0.01))
    return CountingBackend(a), CountingBackend(b)


QUESTIONS = ["What is 1 + 2?", "Capital of Spain?", "Opposite of hot?", "What is 3 + 3?", "Sky colour?",
             "Capital of Peru?", "What is 9 - 4?", "Opposite of up?"]


def test_run_stops_at_the_first_passing_stage_and_spends_what_the_backends_reported(tiny_stages):
    a, b = tiny_stages
    exemplars = [("Q?", "A")]
    stage_a, stage_b = Stage(a, exemplars), Stage(b, exemplars, name="big")
    embedder = default_embedder()
    torch.manual_seed(0)
    scorer = AnswerScorer(LogisticClassifier(torch.randn(2 * embedder.dim), 0.0), embedder)
    first = [r.text.strip() for r in stage_a.answer(QUESTIONS)]
    scores = scorer.score(QUESTIONS, first)
    tau = float(np.median(scores))
    a.calls.clear(), a.results.clear()
    cascade = Cascade([stage_a, stage_b], [tau], [scorer])
    out = cascade.run(QUESTIONS)
    passed = [i for i in range(len(QUESTIONS)) if scores[i] >= tau]
    assert 0 < len(passed) < len(QUESTIONS)
    assert len(a.calls) == 1 and len(a.calls[0]) == len(QUESTIONS)
    assert b.calls[-1] == [stage_b.prompt(QUESTIONS[i]) for i in range(len(QUESTIONS)) if i not in passed]
    reported_b = iter(b.results[-len(QUESTIONS) + len(passed):])
    for i, answer in enumerate(out):
        assert answer.scores == [pytest.approx(float(scores[i]), abs=1e-6)]
        expected_cost = a.results[i].cost
        if i in passed:
            assert answer.stage == 0 and answer.answer == first[i]
        else:
            result_b = next(reported_b)
            assert answer.stage == 1 and answer.stage_name == "big" and answer.answer == result_b.text.strip()
            expected_cost += result_b.cost
        assert answer.cost == pytest.approx(expected_cost)
        assert answer.cost > 0


def test_cached_rerun_makes_no_backend_call(tiny_stages):
    a, b = tiny_stages
    cache = CompletionCache()
    stages = [Stage(CachedBackend(a, cache), [("Q?", "A")]), Stage(CachedBackend(b, cache), [("Q?", "A")])]
    cascade = Cascade(stages, [1.1], [AnswerScorer(LogisticClassifier(torch.zeros(768), 0.0))])  # never accepts
    first = cascade.run(QUESTIONS[:3])
    sent = a.prompts_sent + b.prompts_sent
    second = cascade.run(QUESTIONS[:3])
    assert a.prompts_sent + b.prompts_sent == sent
    assert [x.answer for x in first] == [x.answer for x in second]
    assert all(r.cached for x in second for r in x.results)


def oracle_rule(correct_tasks: set[str]):
    """Knows the answer for some tasks of the bundled set, says 'unsure' otherwise."""
    items = {i.question: i for i in load_eval_set()}

    def rule(prompt: str) -> str:
        question = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0]
        item = items[question]
        return " " + item.answer if item.task in correct_tasks else " unsure"

    return rule


def test_training_finds_a_cheaper_cascade_with_the_best_accuracy(tmp_path):
    tasks = ["arithmetic", "capitals"]
    train, test = load_eval_set("train", tasks), load_eval_set("test", tasks)[::2]
    cheap = Stage(RuleBackend(oracle_rule({"arithmetic"}), "cheap", Price(0, 0, 1.0)), name="cheap")
    big = Stage(RuleBackend(oracle_rule(set(tasks)), "big", Price(0, 0, 10.0)), name="big")
    cascade, strategy = train_cascade([cheap, big], train, budget=8.0, max_depth=2)
    assert strategy.chain == ["cheap", "big"] and strategy.train_accuracy >= 0.95
    out = cascade.run([i.question for i in test])
    acc = np.mean([o.answer == i.answer for o, i in zip(out, test, strict=True)])
    mean_cost = np.mean([o.cost for o in out])
    assert acc >= 0.95 and mean_cost < 8.0  # the big stage alone: accuracy 1.0 at cost 10
    strategy.save(tmp_path / "s.json")
    loaded = Cascade.from_strategy(CascadeStrategy.load(tmp_path / "s.json"), [cheap, big])
    assert [o.answer for o in loaded.run([i.question for i in test])] == [o.answer for o in out]


def test_strategy_files_are_checked(tmp_path):
    (tmp_path / "bad.json").write_text('{"chain": ["a", "b"], "thresholds": [], "scorers": {}}')
    with pytest.raises(ConfigError, match=r"bad\.json"):
        CascadeStrategy.load(tmp_path / "bad.json")
    strategy = CascadeStrategy(["x", "y"], [0.5], {"x": LogisticClassifier(torch.zeros(2), 0.0)}, 1.0)
    with pytest.raises(ConfigError, match="not configured"):
        Cascade.from_strategy(strategy, [Stage(RuleBackend(str), [], name="x")])


def test_prompt_adaptation_fewer_exemplars_is_a_cheaper_stage():
    shots = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    assert few_shot_prompt("Q?", shots[:1]) == "Q: q1\nA: a1\n\nQ: Q?\nA:"
    backend = RuleBackend(lambda p: " x")
    small, large = Stage(backend, shots[:1]), Stage(backend, shots)
    assert small.name != large.name
    assert small.answer(["Q?"])[0].cost < large.answer(["Q?"])[0].cost
    assert list(itertools.chain(small.exemplars)) == [("q1", "a1")]
