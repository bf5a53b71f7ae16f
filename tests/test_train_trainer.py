"""The trainer: token-normalised accumulation, activation checkpointing, autocast, QLoRA, schedules, checkpoints
and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tinymodels import VOCAB, hf_llama, native_from

from hayai.errors import ConfigError
from hayai.peft import apply_lora
from hayai.train.checkpointing import (
    CheckpointedBlock,
    activation_checkpointing_removed,
    apply_activation_checkpointing,
)
from hayai.train.data import IGNORE_INDEX, DataLoader, TokenizedExample
from hayai.train.lomo import AdaLomo
from hayai.train.loss import ChunkedCrossEntropy
from hayai.train.optim import OptimizerUpdate, UpdateRule
from hayai.train.schedule import LRSchedule, warmup_steps_for
from hayai.train.trainer import Trainer, latest_checkpoint, list_checkpoints, trainable_parameters


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread (and the tests do not fight other processes for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def examples(n=12, seed=0):
    """Examples of different lengths with different numbers of trained tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + (i * 5) % 11
        ids = torch.randint(0, VOCAB, (length + 1,), generator=gen).tolist()
        trained_from = i % 4
        labels = [t if j >= trained_from else IGNORE_INDEX for j, t in enumerate(ids[1:])]
        out.append(TokenizedExample(tuple(ids[:-1]), tuple(labels)))
    return out


def lora_model(seed=0, dropout=0.0):
    model = native_from(hf_llama())
    torch.manual_seed(seed)
    apply_lora(model, r=4, alpha=8, dropout=dropout, init_lora_weights=False)
    return model


class RecordingUpdate(UpdateRule):
    """Keeps the accumulated gradients of each step instead of applying them."""

    def __init__(self, named):
        super().__init__(named)
        self.grads = []

    def begin(self, lr):
        pass

    def backward(self, loss):
        loss.backward()

    def finish(self):
        self.grads.append({n: p.grad.clone() for n, p in self.named_parameters})
        for _, p in self.named_parameters:
            p.grad = None
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def one_step_grads(model, data, batch_size, grad_accum, packing=False):
    loader = DataLoader(data, batch_size=batch_size, seq_len=64, pad_id=0, packing=packing, shuffle=False)
    rule = RecordingUpdate(trainable_parameters(model))
    trainer = Trainer(model, loader, rule, LRSchedule(1e-3, 1), max_steps=1, grad_accum=grad_accum)
    loss, _, _ = trainer.train_step()
    return loss, rule.grads[0]


def test_accumulating_micro_batches_equals_one_large_batch():
    data = examples(8)
    model = lora_model()
    big_loss, big = one_step_grads(model, data, batch_size=8, grad_accum=1)
    small_loss, small = one_step_grads(model, data, batch_size=2, grad_accum=4)
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6, rtol=1e-5), name
    # The averaging of per-micro-batch means (litgpt, old HF Trainer) is not the same thing here.
    loader = DataLoader(data, batch_size=2, seq_len=64, pad_id=0, packing=False, shuffle=False)
    trainer = Trainer(model, loader, RecordingUpdate(trainable_parameters(model)), LRSchedule(1e-3, 1), max_steps=1)
    for _ in range(4):
        batch = loader.next_batch()
        (trainer.batch_loss(batch) / batch.num_loss_tokens / 4).backward()
    name = next(iter(big))
    param = dict(trainable_parameters(model))[name]
    assert not torch.allclose(param.grad, big[name], atol=1e-6)


def test_packed_and_unpacked_batches_give_the_same_step():
    data = examples(6)
    model = lora_model()
    loss_a, a = one_step_grads(model, data, batch_size=6, grad_accum=1, packing=False)
    loss_b, b = one_step_grads(model, data, batch_size=6, grad_accum=1, packing=True)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_activation_checkpointing_changes_no_gradient():
    data = examples(4)
    model = lora_model(dropout=0.2)  # dropout: the recomputation must draw the same masks
    torch.manual_seed(7)
    _, plain = one_step_grads(model, data, batch_size=4, grad_accum=1)
    assert apply_activation_checkpointing(model) == 2
    assert isinstance(model.model.layers[0], CheckpointedBlock)
    torch.manual_seed(7)
    _, wrapped = one_step_grads(model, data, batch_size=4, grad_accum=1)
    assert set(plain) == set(wrapped)  # canonical names do not change
    for name in plain:
        assert torch.equal(plain[name], wrapped[name]), name
    with activation_checkpointing_removed(model):
        assert not any(isinstance(m, CheckpointedBlock) for m in model.modules())
    assert isinstance(model.model.layers[1], CheckpointedBlock)


def test_autocast_trains_fp32_adapters_over_a_bf16_base():
    model = native_from(hf_llama())
    for layer in model.model.layers:
        layer.to(torch.bfloat16)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.float()
    apply_lora(model, r=4, init_lora_weights=False)
    loader = DataLoader(examples(4), batch_size=2, seq_len=64, pad_id=0, shuffle=False)
    rule = OptimizerUpdate(trainable_parameters(model))
    trainer = Trainer(model, loader, rule, LRSchedule(1e-3, 2), max_steps=2, autocast_dtype=torch.bfloat16)
    result = trainer.train()
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    adapters = [p for _, p in trainable_parameters(model)]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_qlora_step_changes_only_the_adapter():
    from hayai.quant import NF4Linear, quantize_model

    model = native_from(hf_llama())
    quantize_model(model, "nf4")
    apply_lora(model, r=4)  # B = 0 at the start
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, NF4Linear)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(examples(4), batch_size=2, seq_len=64, pad_id=0, shuffle=False)
    trainer = Trainer(model, loader, OptimizerUpdate(trainable_parameters(model)), LRSchedule(1e-2, 2),
                      max_steps=2)
    trainer.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed and changed <= adapter_keys
    assert any(k.endswith("lora_B.weight") for k in changed)  # the adapter left the identity


def test_schedules():
    s = LRSchedule(1.0, total_steps=10, warmup_steps=2, kind="cosine", min_lr_ratio=0.1)
    assert [s(0), s(1)] == [0.5, 1.0]
    assert s(2) == pytest.approx(1.0)
    assert s(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(10) == pytest.approx(0.1)
    lin = LRSchedule(2.0, total_steps=5, warmup_steps=0, kind="linear")
    assert [lin(i) for i in range(5)] == pytest.approx([2.0, 1.6, 1.2, 0.8, 0.4])
    assert LRSchedule(3.0, 5, 1, "constant")(4) == 3.0
    assert warmup_steps_for(100, 0.03) == 3 and warmup_steps_for(100, 7) == 7
    with pytest.raises(ConfigError, match="unknown learning-rate schedule"):
        LRSchedule(1.0, 5, kind="step")


def make_trainer(tmp_path, max_steps, save_every=3, rule="adamw"):
    model = lora_model(dropout=0.1) if rule == "adamw" else native_from(hf_llama()).requires_grad_(True)
    loader = DataLoader(examples(10), batch_size=2, seq_len=24, pad_id=0, packing=True, seed=3)
    named = trainable_parameters(model)
    update = OptimizerUpdate(named) if rule == "adamw" else AdaLomo(named)
    return Trainer(model, loader, update, LRSchedule(5e-3, 6, 1), max_steps=max_steps, loss=ChunkedCrossEntropy(),
                   save_every=save_every, output_dir=tmp_path, grad_accum=2 if rule == "adamw" else 1)


@pytest.mark.parametrize("rule", ["adamw", "adalomo"])
def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path, rule):
    torch.manual_seed(0)
    straight = make_trainer(tmp_path / "a", 6, rule=rule).train().losses
    torch.manual_seed(0)
    first = make_trainer(tmp_path / "b", 3, rule=rule)
    first.train()
    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    resumed = make_trainer(tmp_path / "b", 6, rule=rule)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert resumed.step == 3
    result = resumed.train()
    assert result.losses == straight  # exact float equality
    assert result.resumed_from == 3
    log = [json.loads(line) for line in (tmp_path / "b" / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in log if "loss" in row] == straight


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    trainer = make_trainer(tmp_path, 6, save_every=2)
    trainer.train()
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000006"]  # keep 2
    (root / ".step-000008.tmp-1").mkdir()  # a crash mid-write leaves only a temporary directory
    (root / "step-000009").mkdir()  # ... or an incomplete one without its state file
    assert latest_checkpoint(tmp_path).name == "step-000006"
    other = make_trainer(tmp_path / "x", 6, rule="adalomo")
    with pytest.raises(ConfigError, match="written by OptimizerUpdate"):
        other.load_checkpoint(latest_checkpoint(tmp_path))


def test_fused_rules_refuse_accumulation_in_the_trainer():
    model = native_from(hf_llama()).requires_grad_(True)
    loader = DataLoader(examples(4), batch_size=2, seq_len=64, pad_id=0)
    with pytest.raises(ConfigError, match="cannot accumulate"):
        Trainer(model, loader, AdaLomo(trainable_parameters(model)), LRSchedule(1e-3, 2), max_steps=2,
                grad_accum=2)
