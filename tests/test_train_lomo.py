"""LOMO and AdaLomo: the update fused into backward equals the textbook optimizer step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tinymodels import VOCAB, hf_llama, native_from

from hayai.errors import ConfigError
from hayai.train.checkpointing import apply_activation_checkpointing
from hayai.train.lomo import AdaLomo, Lomo


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread (and the tests do not fight other processes for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def model_and_batch(seed=0, tied=False):
    model = native_from(hf_llama(seed=seed, tie_word_embeddings=tied)).train().requires_grad_(True)
    torch.manual_seed(seed + 100)
    ids = torch.randint(0, VOCAB, (2, 12))
    return model, ids


def loss_of(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def sgd_reference(model, ids, lr, weight_decay=0.0, clip=None):
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, weight_decay=weight_decay)
    loss_of(ref, ids).backward()
    norm = None
    if clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
    opt.step()
    return ref, norm


def assert_same_parameters(a, b, atol=1e-6):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=atol), name


@pytest.mark.parametrize("tied", [False, True])
def test_lomo_update_equals_sgd(tied):
    model, ids = model_and_batch(tied=tied)
    reference, _ = sgd_reference(model, ids, lr=0.1, weight_decay=0.01)
    lomo = Lomo(list(model.named_parameters()), weight_decay=0.01)
    lomo.begin(0.1)
    lomo.backward(loss_of(model, ids))
    assert lomo.finish() is None
    assert all(p.grad is None for p in model.parameters())  # every gradient was freed in backward
    assert_same_parameters(model, reference)
    assert not torch.equal(model.lm_head.weight, native_from(hf_llama(tie_word_embeddings=tied)).lm_head.weight)


def test_lomo_two_pass_clipping_equals_clip_grad_norm_then_sgd():
    model, ids = model_and_batch()
    reference, norm = sgd_reference(model, ids, lr=0.5, clip=0.05)
    assert norm > 0.05  # clipping is active
    lomo = Lomo(list(model.named_parameters()), max_grad_norm=0.05)
    lomo.begin(0.5)
    lomo.backward(loss_of(model, ids))
    assert lomo.finish() == pytest.approx(norm, rel=1e-5)
    assert_same_parameters(model, reference)


def test_lomo_clipping_works_through_activation_checkpointing():
    model, ids = model_and_batch()
    reference, _ = sgd_reference(model, ids, lr=0.5, clip=0.05)
    apply_activation_checkpointing(model)
    lomo = Lomo(list(model.named_parameters()), max_grad_norm=0.05)
    lomo.begin(0.5)
    lomo.backward(loss_of(model, ids))  # two backward passes through recomputed blocks
    from hayai.train.checkpointing import remove_activation_checkpointing

    remove_activation_checkpointing(model)
    assert_same_parameters(model, reference)


def adalomo_reference(params, grads, state, step, lr, eps=(1e-30, 1e-3), wd=0.0):
    """AdaLomo written out from the paper's equations, one tensor at a time."""
    out = {}
    beta = 1.0 - step ** -0.8
    for name, p in params.items():
        g = grads[name].double()
        sq = g * g + eps[0]
        if p.dim() == 2:
            r = state.setdefault(name + ".r", torch.zeros(p.shape[0], dtype=torch.float64))
            c = state.setdefault(name + ".c", torch.zeros(p.shape[1], dtype=torch.float64))
            r.mul_(beta).add_((1 - beta) * sq.mean(1))
            c.mul_(beta).add_((1 - beta) * sq.mean(0))
            v_hat = torch.outer(r, c) / r.mean()
        else:
            v = state.setdefault(name + ".v", torch.zeros(p.shape, dtype=torch.float64))
            v.mul_(beta).add_((1 - beta) * sq)
            v_hat = v
        u = g / v_hat.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()))
        p64 = p.detach().double()
        lr_eff = lr * max(eps[1], float(p64.pow(2).mean().sqrt()))
        out[name] = p64 * (1 - lr_eff * wd) - lr_eff * u
    return out


def test_adalomo_matches_its_equations_over_two_steps():
    model, ids = model_and_batch()
    ref_state: dict = {}
    rule = AdaLomo(list(model.named_parameters()), weight_decay=0.1)
    for step, lr in ((1, 1e-2), (2, 5e-3)):
        probe = copy.deepcopy(model)
        loss_of(probe, ids).backward()
        grads = {n: p.grad for n, p in probe.named_parameters()}
        expected = adalomo_reference(dict(model.named_parameters()), grads, ref_state, step, lr, wd=0.1)
        rule.begin(lr)
        rule.backward(loss_of(model, ids))
        for name, p in model.named_parameters():
            assert torch.allclose(p.double(), expected[name], atol=1e-6, rtol=1e-5), (step, name)
    assert rule.state_bytes() < sum(p.numel() * 4 for p in model.parameters()) / 4  # factored: far below Adam's 2x


def test_adalomo_state_round_trips():
    model, ids = model_and_batch()
    rule = AdaLomo(list(model.named_parameters()))
    rule.begin(1e-2)
    rule.backward(loss_of(model, ids))
    fresh = AdaLomo(list(copy.deepcopy(model).named_parameters()))
    fresh.load_state_dict(rule.state_dict())
    assert fresh.step_num == 1
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(fresh.state[name]["row"], rule.state[name]["row"])
    assert math.isfinite(float(fresh.state[name]["col"].sum()))


def test_fused_rules_refuse_gradient_accumulation():
    model, ids = model_and_batch()
    rule = Lomo(list(model.named_parameters()))
    rule.begin(0.1)
    rule.backward(loss_of(model, ids))
    with pytest.raises(ConfigError, match="cannot accumulate"):
        rule.backward(loss_of(model, ids))
