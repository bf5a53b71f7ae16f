"""The pre-training memory estimate: measured activations, checkpointing, and the refusal."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tinymodels import VOCAB, hf_llama, native_from
from torch import nn

from hayai.train.memory import (
    MemoryBudgetError,
    check_fits,
    estimate_memory,
    optimizer_state_bytes,
    probe_activations,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread (and the tests do not fight other processes for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_probe_counts_exactly_what_autograd_saves():
    torch.manual_seed(0)
    d, t = 8, 5
    blocks = nn.ModuleList(Block(d) for _ in range(3))
    model = nn.Module()
    model.blocks = blocks
    x = torch.randn(1, t, d, requires_grad=True)

    def run():
        h = x
        for b in blocks:
            h = b(h)
        return h.sum()

    probe = probe_activations(model, run, list(blocks))
    # Per block: up saves its input [t, d] (the weight is a parameter and not counted), relu saves its output
    # [t, 4d], down saves its input, the same relu output (counted once). x itself is the first block's input.
    per_block = 4 * (t * d + t * 4 * d)
    assert probe.blocks == [per_block] * 3
    assert probe.total == 3 * per_block
    assert probe.block_input == 4 * t * d and probe.tokens == t


def test_probe_frees_the_graph_it_measured():
    x = torch.randn(64, 64, requires_grad=True)
    outputs = []

    def run():
        y = torch.exp(x)  # exp saves its *output*: returned as is from a pack hook, it would keep its own graph
        outputs.append(weakref.ref(y))
        return y.sum()

    probe = probe_activations(nn.Module(), run, [])
    gc.collect()
    assert probe.total == 64 * 64 * 4
    assert outputs[0]() is None


def lora_probe():
    from hayai.peft import apply_lora
    from hayai.train.data import Row, collate
    from hayai.train.loss import ChunkedCrossEntropy

    model = native_from(hf_llama())
    apply_lora(model, r=4)
    ids = torch.randint(0, VOCAB, (33,)).tolist()
    batch = collate([Row(tuple(ids[:-1]), tuple(ids[1:]), (32,))], pad_id=0, packed=False)
    loss = ChunkedCrossEntropy()

    def run():
        return loss(model.lm_head, model.hidden(batch.input_ids, positions=batch.positions), batch.labels)

    model.train()
    return model, probe_activations(model, run, list(model.model.layers))


def test_estimate_grows_with_the_batch_and_checkpointing_shrinks_it():
    model, probe = lora_probe()
    assert probe.tokens == 32 and len(probe.blocks) == 2 and all(b > 0 for b in probe.blocks)
    kwargs = dict(rule="adamw", seq_len=32, vocab_size=VOCAB, chunk_tokens=64, current=1000)
    small = estimate_memory(model, probe, batch_size=1, checkpointing=False, **kwargs)
    large = estimate_memory(model, probe, batch_size=4, checkpointing=False, **kwargs)
    checkpointed = estimate_memory(model, probe, batch_size=4, checkpointing=True, **kwargs)
    assert large.activations == 4 * small.activations
    assert checkpointed.activations < large.activations
    assert large.slack == int(0.75 * (large.activations + large.working))  # glibc heap retention on CPU
    assert large.current == max(1000, large.weights)  # the weights are resident during training
    assert large.total == large.current + large.gradients + large.optimizer + large.activations + large.working \
        + large.slack
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (large.gradients, large.optimizer) == (4 * trainable, 8 * trainable)  # fp32 grads, two Adam moments


def test_update_rule_memory():
    model = native_from(hf_llama()).requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(model, "adamw") == (4 * n, 8 * n)
    assert optimizer_state_bytes(model, "lomo") == (8 * largest, 0)  # one gradient and its fp32 update
    grads, state = optimizer_state_bytes(model, "adalomo")
    assert grads == 12 * largest  # the gradient, G² and the update, in fp32
    assert 0 < state < n  # factored second moments: rows + columns, far below 4 bytes per weight


def test_refusal_names_the_numbers_and_what_would_help():
    model, probe = lora_probe()
    plan = estimate_memory(model, probe, rule="adamw", batch_size=4, seq_len=32, checkpointing=False,
                           vocab_size=VOCAB, chunk_tokens=64, current=10 * 2**20)
    check_fits(plan, plan.total)  # exactly at the budget: fine
    with pytest.raises(MemoryBudgetError) as info:
        check_fits(plan, plan.total - 1)
    message = str(info.value)
    assert "training would need about" in message and "activations" in message
    assert "activation checkpointing" in message and "--batch-size" in message
