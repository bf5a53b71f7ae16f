"""Chunked cross-entropy: the same value and gradients as the full computation, without full logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.peft import LoRALinear
from hayai.train.data import IGNORE_INDEX
from hayai.train.loss import ChunkedCrossEntropy, FullCrossEntropy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread (and the tests do not fight other processes for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

V, H = 53, 16


def setup(seed=0, head=None):
    torch.manual_seed(seed)
    head = head or nn.Linear(H, V, bias=False)
    hidden = torch.randn(3, 7, H, requires_grad=True)
    labels = torch.randint(0, V, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, -2:] = IGNORE_INDEX
    return head, hidden, labels


def loss_and_grads(loss_fn, head, hidden, labels):
    head.zero_grad()
    hidden.grad = None
    loss = loss_fn(head, hidden, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    return loss.detach(), hidden.grad.clone(), grads


def test_full_cross_entropy_is_the_sum_of_token_losses():
    head, hidden, labels = setup()
    keep = labels != IGNORE_INDEX
    logits = head(hidden)
    expected = -(logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep).sum()
    assert torch.allclose(FullCrossEntropy()(head, hidden, labels), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_full_in_value_and_gradients(chunk):
    head, hidden, labels = setup()
    full = loss_and_grads(FullCrossEntropy(), head, hidden, labels)
    chunked = loss_and_grads(ChunkedCrossEntropy(chunk_size=chunk), head, hidden, labels)
    assert torch.allclose(full[0], chunked[0], atol=1e-5)
    assert torch.allclose(full[1], chunked[1], atol=1e-6)  # ∂L/∂hidden
    assert torch.allclose(full[2]["weight"], chunked[2]["weight"], atol=1e-6)  # ∂L/∂W
    assert (full[1][0, :4] == 0).all()  # ignored positions get no gradient


def test_chunked_scales_with_the_incoming_gradient():
    head, hidden, labels = setup()
    (3.0 * ChunkedCrossEntropy(chunk_size=5)(head, hidden, labels)).backward()
    scaled = hidden.grad.clone()
    _, plain, _ = loss_and_grads(ChunkedCrossEntropy(chunk_size=5), head, hidden, labels)
    assert torch.allclose(scaled, 3.0 * plain, atol=1e-6)


def test_frozen_head_gets_no_weight_gradient_but_hidden_does():
    head, hidden, labels = setup()
    head.requires_grad_(False)
    loss = ChunkedCrossEntropy(chunk_size=4)(head, hidden, labels)
    loss.backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_any_other_head_module_runs_chunk_by_chunk_under_checkpointing():
    torch.manual_seed(0)
    head = LoRALinear(nn.Linear(H, V, bias=False), r=4, init_lora_weights=False)
    head_, hidden, labels = setup(head=head)
    full = loss_and_grads(FullCrossEntropy(), head_, hidden, labels)
    chunked = loss_and_grads(ChunkedCrossEntropy(chunk_size=3), head_, hidden, labels)
    assert torch.allclose(full[0], chunked[0], atol=1e-5)
    assert torch.allclose(full[1], chunked[1], atol=1e-6)
    for name in ("lora_A.weight", "lora_B.weight"):
        assert torch.allclose(full[2][name], chunked[2][name], atol=1e-6)


def test_under_bf16_autocast_chunked_matches_full():
    head, hidden, labels = setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = loss_and_grads(FullCrossEntropy(), head, hidden, labels)
        chunked = loss_and_grads(ChunkedCrossEntropy(chunk_size=4), head, hidden, labels)
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == torch.float32
    assert torch.allclose(full[0], chunked[0], rtol=1e-3)
    assert torch.allclose(full[1], chunked[1], atol=2e-3)


def test_no_trained_position_gives_zero_loss_and_gradient():
    head, hidden, labels = setup()
    labels.fill_(IGNORE_INDEX)
    loss = ChunkedCrossEntropy()(head, hidden, labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not hidden.grad.any()


def test_default_chunk_bounds_the_logits_held_at_once():
    assert ChunkedCrossEntropy()._chunk(49152) * 49152 * 4 <= 64 * 2**20
