"""PEWE: softmax(s/T) weights, element-wise ensembling, and the loss-based scorer on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft import (
    adapter_from_model,
    adapter_layers,
    apply_adapter,
    apply_ia3,
    apply_lora,
    ensemble_adapters,
    loss_scores,
    pewe_init,
    pewe_weights,
)


class TinyLM(nn.Module):
    """Embedding -> two projections -> logits: enough structure for adapters and a next-token loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16)
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        h = h + torch.tanh(self.q_proj(h)) * self.v_proj(h)
        return self.lm_head(self.norm(h))


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:-1])
    return nn.functional.cross_entropy(logits, ids[1:])


@pytest.fixture
def base() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


def source(base: nn.Module, seed: int, scale: float = 0.3, **kwargs):
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=4, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return adapter_from_model(model)


def test_weights_are_a_temperature_softmax():
    scores = [-2.0, -1.5, -3.0]
    weights = pewe_weights(scores)  # T = 0.1
    assert sum(weights) == pytest.approx(1.0)
    expected = torch.softmax(torch.tensor(scores, dtype=torch.float64) / 0.1, 0).tolist()
    assert weights == pytest.approx(expected)
    assert max(weights) == weights[1]
    assert pewe_weights(scores, temperature=1e-6) == pytest.approx([0.0, 1.0, 0.0])
    assert pewe_weights(scores, temperature=1e6) == pytest.approx([1 / 3] * 3, rel=1e-4)
    with pytest.raises(ConfigError, match="temperature"):
        pewe_weights(scores, temperature=0)


def test_ensemble_is_an_element_wise_weighted_average(base):
    sources = [source(base, seed) for seed in range(3)]
    weights = [0.2, 0.5, 0.3]
    ensembled = ensemble_adapters(sources, weights)
    assert set(ensembled.tensors) == set(sources[0].tensors)
    for key, tensor in ensembled.tensors.items():
        expected = sum(w * s.tensors[key] for w, s in zip(weights, sources, strict=True))
        torch.testing.assert_close(tensor, expected)
    one_hot = ensemble_adapters(sources, [0.0, 1.0, 0.0])
    assert all(torch.equal(one_hot.tensors[k], sources[1].tensors[k]) for k in one_hot.tensors)


def test_ensemble_averages_modules_to_save_and_ia3_too(base):
    trained = [source(base, seed, trainable="norm") for seed in range(2)]
    assert "norm.weight" in trained[0].tensors
    mean = ensemble_adapters(trained, [0.5, 0.5])
    torch.testing.assert_close(
        mean.tensors["norm.weight"],
        (trained[0].tensors["norm.weight"] + trained[1].tensors["norm.weight"]) / 2,
    )
    ia3 = []
    for seed in range(2):
        model = apply_ia3(copy.deepcopy(base), target_modules=["v_proj"], feedforward_modules=[])
        with torch.no_grad():
            model.v_proj.ia3_l.fill_(seed + 1.0)
        ia3.append(adapter_from_model(model))
    assert torch.all(ensemble_adapters(ia3, [0.25, 0.75]).tensors["v_proj.ia3_l"] == 1.75)


def test_ensemble_rejects_incompatible_adapters(base):
    with pytest.raises(ConfigError, match="rank/alpha"):
        ensemble_adapters([source(base, 0), source(base, 1, alpha=16)], [0.5, 0.5])
    narrow = adapter_from_model(apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=4))
    with pytest.raises(ConfigError, match="differ in tensor"):
        ensemble_adapters([source(base, 0), narrow], [0.5, 0.5])


def test_loss_scorer_ranks_sources_and_leaves_the_model_untouched(base):
    torch.manual_seed(5)
    examples = [torch.randint(0, 32, (12,)) for _ in range(4)]
    sources = [source(base, seed, scale) for seed, scale in ((0, 2.0), (1, 0.0), (2, 1.0))]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    base.train()
    seen = []
    scores = loss_scores(base, sources, examples, next_token_loss, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert base.training and not adapter_layers(base)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    for adapter, score in zip(sources, scores, strict=True):  # brute force: apply, evaluate, compare
        model = apply_adapter(copy.deepcopy(base).eval(), adapter)
        with torch.no_grad():
            loss = sum(float(next_token_loss(model, ids)) for ids in examples) / len(examples)
        assert score == pytest.approx(-loss, rel=1e-6)


def test_pewe_init_reduces_to_the_best_source_as_temperature_goes_to_zero(base):
    torch.manual_seed(5)
    examples = [torch.randint(0, 32, (12,)) for _ in range(3)]
    sources = [source(base, seed, 1.5) for seed in range(3)]
    result = pewe_init(base, sources, examples, next_token_loss, temperature=1e-8)
    best = max(range(3), key=lambda i: result.scores[i])
    assert result.weights[best] == pytest.approx(1.0)
    assert all(
        torch.allclose(result.adapter.tensors[k], sources[best].tensors[k]) for k in sources[best].tensors
    )
    default = pewe_init(base, sources, examples, next_token_loss)
    assert sum(default.weights) == pytest.approx(1.0)
    assert default.weights == pytest.approx(pewe_weights(default.scores, 0.1))
