"""Magnitude pruning: exact sparsity, the right weights removed, and zeros that survive retraining."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hayai.compress.pruning import MagnitudePruner, iterative_prune, keep_largest, sparsity_schedule
from hayai.errors import ConfigError


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def train_steps(model, optimizer, steps=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layer_scope_removes_exactly_the_smallest_magnitudes(sparsity):
    model = mlp()
    before = [m.weight.detach().clone() for m in linears(model)]
    MagnitudePruner(model, scope="layer").prune(sparsity)
    for w0, m in zip(before, linears(model), strict=True):
        n = w0.numel()
        pruned = round(sparsity * n)
        order = w0.abs().flatten().argsort()  # brute force: the `pruned` smallest |w| go
        expected = torch.ones(n, dtype=torch.bool)
        expected[order[:pruned]] = False
        assert torch.equal(m.weight.flatten() != 0, expected)
        assert torch.equal(m.weight.flatten()[expected], w0.flatten()[expected])  # survivors untouched


def test_global_scope_uses_one_threshold():
    model = mlp()
    pruner = MagnitudePruner(model, scope="global")
    pruner.prune(0.6)
    weights = [m.weight.detach() for m in linears(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * total)
    kept = torch.cat([w[w != 0].abs() for w in weights])
    # every pruned |w| (from the original weights) is <= every kept |w|
    original = mlp()
    pruned_abs = torch.cat([o.weight.detach().abs()[w == 0] for o, w in zip(linears(original), weights,
                                                                             strict=True)])
    assert float(pruned_abs.max()) <= float(kept.min())
    assert len({round(s, 3) for s in pruner.sparsity().values()}) > 1  # layers differ under a global threshold


def test_per_layer_mapping_and_exclusion():
    model = mlp()
    pruner = MagnitudePruner(model, exclude="4")
    achieved = pruner.prune({"0": 0.8, "*": 0.25})
    assert achieved == pytest.approx({"0": 0.8, "2": 0.25}, abs=1e-3)
    assert torch.all(model[4].weight != 0)


def test_iterative_pruning_keeps_zeros_through_retraining_with_adamw():
    model = mlp()
    seen = []

    def retrain(m, pruner, step):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        train_steps(m, optimizer)
        masks = {k: v.clone() for k, v in pruner.masks.items()}
        for layer, name in zip(linears(m), ["0", "2", "4"], strict=True):
            assert torch.all(layer.weight[~masks[name]] == 0)  # zero right after training, before any re-masking
            assert layer.weight.grad is not None and torch.all(layer.weight.grad[~masks[name]] == 0)
        seen.append(pruner.overall_sparsity())

    pruner = iterative_prune(model, 0.8, steps=3, retrain=retrain)
    assert seen == pytest.approx(sparsity_schedule(0.8, 3), abs=2e-3)
    # the pruner stays attached: later fine-tuning still keeps the zeros
    zeros = [m.weight == 0 for m in linears(model)]
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=5)
    for z, m in zip(zeros, linears(model), strict=True):
        assert torch.all(m.weight[z] == 0)
    pruner.remove()


def test_attach_re_masks_after_steps_of_a_stateful_optimizer():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, steps=3)  # momentum buffers now hold nonzero values everywhere
    pruner = MagnitudePruner(model)
    pruner.prune(0.5)
    train_steps(model, optimizer, steps=1)
    assert any(bool((m.weight[~pruner.masks[n]] != 0).any()) for m, n in zip(linears(model), "024", strict=True))
    pruner.apply_masks()
    pruner.attach(optimizer)
    train_steps(model, optimizer, steps=3)
    for m, n in zip(linears(model), "024", strict=True):
        assert torch.all(m.weight[~pruner.masks[n]] == 0)


def test_tied_weight_is_pruned_once():
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"embed": emb, "head": head})
    pruner = MagnitudePruner(model)
    assert len(pruner.targets) == 1 and len(pruner.targets[0].holders) == 2
    pruner.prune(0.5)
    assert int((emb.weight == 0).sum()) == 200


def test_schedules():
    assert sparsity_schedule(0.9, 2, "geometric") == pytest.approx([1 - 0.1**0.5, 0.9])
    assert sparsity_schedule(0.6, 3, "linear") == pytest.approx([0.2, 0.4, 0.6])
    cubic = sparsity_schedule(0.8, 4, "cubic")
    assert cubic[-1] == 0.8 and all(a < b for a, b in itertools.pairwise(cubic))
    with pytest.raises(ConfigError):
        sparsity_schedule(1.0, 2)
    with pytest.raises(ConfigError):
        sparsity_schedule(0.5, 2, "exp")


def test_keep_largest_breaks_ties_by_position():
    mask = keep_largest(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5]), 2)
    assert mask.tolist() == [False, True, True, False, False]


def test_no_targets_is_a_config_error():
    with pytest.raises(ConfigError, match="no Linear"):
        MagnitudePruner(mlp(), include="nothing.*")
