"""quantize_model on tiny transformers Llamas: logits, tied embeddings, summary, save/load without re-quantizing.

Two oracles per format: the float model (quality: relative Frobenius error of the logits below 0.03 for int8,
0.25 for int4 at group 32 and NF4, on a random 2-layer model with hidden size 64), and the same float model
with every replaced weight overwritten by the quantized layer's `dequantize_weight()` ("fake quantization":
plumbing, equal to 1e-5 in fp32). Saving and loading into a differently initialised skeleton must give
bit-identical logits, which also proves nothing was re-quantized from the skeleton's weights.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from hayai.errors import ConfigError, CorruptFileError
from hayai.quant import (
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    load_quantized,
    quantize_model,
    read_quantized,
    save_quantized,
)
from hayai.quant.base import module_bytes

VOCAB = 250  # not a multiple of 16: the int4 LM head pads its rows for the kernel
TOLERANCE = {"int8": 0.03, "int4": 0.25, "nf4": 0.25}
OPTIONS = {"int8": {}, "int4": {"group_size": 32}, "nf4": {}}


def llama(seed: int = 0, tied: bool = True, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def fake_quantized(reference: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with each replaced weight set to the quantized layer's reconstruction."""
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear | QuantizedEmbedding):
                target = reference.get_submodule(name)
                target.weight = nn.Parameter(module.dequantize_weight(target.weight.dtype))  # unties, on purpose
    return reference


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_logits_close_to_float_and_equal_to_fake_quantization(method, ids):
    model = llama()
    expected = logits(model, ids)
    summary = quantize_model(model, method, **OPTIONS[method])
    got = logits(model, ids)
    assert rel_err(got, expected) < TOLERANCE[method]
    assert rel_err(got, logits(fake_quantized(llama(), model), ids)) < 1e-5
    assert summary.bytes_after < summary.bytes_before


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_bf16_kernel_path_logits(method, ids):
    model = llama(dtype=torch.bfloat16)
    expected = logits(model, ids)
    quantize_model(model, method, embeddings=True, **OPTIONS[method])
    got = logits(model, ids)
    assert rel_err(got, expected) < TOLERANCE[method] + 0.02
    assert rel_err(got, logits(fake_quantized(llama(dtype=torch.bfloat16), model), ids)) < 3e-2
    if method == "int4":
        assert model.lm_head.uses_kernel_layout  # the fused kernel ran


@pytest.mark.parametrize("method, embeddings, dtype", [("int8", True, torch.float32), ("int4", True, torch.bfloat16),
                                                       ("nf4", False, torch.float32), ("int4", False, torch.float32)])
def test_save_then_load_without_requantizing_is_bit_identical(tmp_path, ids, method, embeddings, dtype):
    model = llama(seed=0, dtype=dtype)
    summary = quantize_model(model, method, embeddings=embeddings, **OPTIONS[method])
    expected = logits(model, ids)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path, summary.config)
    json.dumps(summary.config)  # JSON-serialisable
    skeleton = llama(seed=1, dtype=dtype)  # different float weights: re-quantizing them could not match
    assert not torch.equal(logits(skeleton, ids), logits(llama(seed=0, dtype=dtype), ids))
    load_quantized(skeleton, path)
    assert torch.equal(logits(skeleton, ids), expected)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear | QuantizedEmbedding):
            assert type(skeleton.get_submodule(name)) is type(module)
    _, stored = read_quantized(path)
    assert stored["method"] == method and set(stored["modules"]) == set(summary.config["modules"])


def test_load_into_meta_skeleton():
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.LayerNorm(32))

    torch.manual_seed(0)
    model = build()
    summary = quantize_model(model, "int4", group_size=32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    state, config = model.state_dict(), summary.config
    with torch.device("meta"):
        skeleton = build()
    load_quantized(skeleton, state, config)
    with torch.no_grad():
        assert torch.equal(skeleton(x), expected)
    assert all(t.device.type == "cpu" for t in [*skeleton.parameters(), *skeleton.buffers()])


def test_tied_int8_embedding_shares_the_head_table(tmp_path, ids):
    model = llama(tied=True)
    summary = quantize_model(model, "int8", embeddings=True)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantizedEmbedding) and isinstance(head, Int8Linear)
    assert embed.tied_head is head and any("tied" in note for note in summary.notes)
    assert not any(k.startswith("model.embed_tokens") for k in model.state_dict())
    assert module_bytes(embed) == 0
    assert torch.equal(embed(ids), head.dequantize_weight()[ids])
    assert summary.config["modules"]["model.embed_tokens"]["tied_to"] == "lm_head"
    save_quantized(model, tmp_path / "m.safetensors", summary.config)
    skeleton = llama(seed=3, tied=True)
    load_quantized(skeleton, tmp_path / "m.safetensors")
    assert skeleton.model.embed_tokens.tied_head is skeleton.lm_head


def test_tied_int4_embedding_keeps_a_copy_of_the_same_codes(ids):
    model = llama(tied=True, dtype=torch.bfloat16)
    summary = quantize_model(model, "int4", group_size=32, embeddings=True)
    embed, head = model.model.embed_tokens, model.lm_head
    assert embed.tied_head is None and any("own copy" in note for note in summary.notes)
    assert torch.equal(embed(ids), head.dequantize_weight()[ids])
    model(ids)  # the head switches to its kernel layout; the embedding is unaffected
    assert head.uses_kernel_layout and torch.equal(embed(ids), head.dequantize_weight()[ids])


@pytest.mark.parametrize("bits", [8, 4])
def test_untied_embedding_lookup_equals_dequantized_table(bits, ids):
    model = llama(tied=False)
    original = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, "int8" if bits == 8 else "int4", group_size=32, embeddings=True)
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) and embed.bits == bits
    table = embed.dequantize_weight()
    assert torch.equal(embed(ids), table[ids]) and embed(ids).shape == (2, 9, 64)
    step = original.abs().amax(1, keepdim=True) / (127 if bits == 8 else 7.5)
    assert torch.all((table - original).abs() <= step / 2 + 1e-6)


def test_summary_patterns_and_progress():
    model = llama(tied=False)
    calls: list[tuple[int, int]] = []
    summary = quantize_model(model, "nf4", progress=lambda done, total: calls.append((done, total)))
    assert summary.skipped == {"lm_head": "excluded by pattern 'lm_head'"}  # QLoRA's default
    assert len(summary.replaced) == 14 and calls == [(i, 14) for i in range(1, 15)]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    assert summary.config["options"] == {"blocksize": 64, "double_quant": True, "compute_dtype": None}

    model = llama(tied=False)
    summary = quantize_model(model, "int8", include=["mlp.*", "o_proj"], exclude=["*.layers.1.*"])
    assert sorted(summary.replaced) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                                        "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj"]
    assert summary.skipped["model.layers.1.mlp.up_proj"] == "excluded by pattern '*.layers.1.*'"
    assert summary.skipped["model.layers.0.self_attn.q_proj"] == "not matched by include patterns"
    assert summary.as_dict()["compression"] > 1


def test_layers_the_format_cannot_take_are_skipped_with_a_reason():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)  # out_proj: an nn.Linear subclass
            self.small = nn.Linear(16, 64)  # in_features < group_size
            self.big = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.big(self.attn(x, x, x)[0]) + self.small(z)

    block = Block()
    x, z = torch.randn(2, 5, 64), torch.randn(2, 5, 16)
    expected = block(x, z)
    summary = quantize_model(block, "int4", group_size=32)
    assert summary.replaced == ["big"]
    assert "subclasses nn.Linear" in summary.skipped["attn.out_proj"]
    assert "group_size" in summary.skipped["small"]
    assert isinstance(block.big, Int4Linear)
    assert rel_err(block(x, z), expected) < 0.2


def test_input_gradients_flow_through_quantized_layers(ids):
    """What LoRA on a quantized base needs: ∂L/∂x through every layer, equal to the fake-quantized model's."""
    model = llama(tied=False)
    quantize_model(model, "nf4", exclude=[])
    reference = fake_quantized(llama(tied=False), model)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.square().mean().backward()
    ref_embeds = embeds.detach().clone().requires_grad_()
    reference(inputs_embeds=ref_embeds).logits.square().mean().backward()
    assert rel_err(embeds.grad, ref_embeds.grad) < 1e-4


def test_bad_input_errors(tmp_path):
    with pytest.raises(ConfigError, match="not one of"):
        quantize_model(llama(), "int3")
    with pytest.raises(ConfigError, match="embeddings"):
        quantize_model(llama(), "nf4", embeddings=True)
    with pytest.raises(ConfigError, match="group_size"):
        quantize_model(llama(), "int4", group_size=0)
    model = llama(tied=False)
    summary = quantize_model(model, "int8")
    wrong = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ConfigError, match="in the model but"):
        load_quantized(wrong, model.state_dict(), summary.config)
    with pytest.raises(ConfigError, match="not a hayai quant config"):
        load_quantized(llama(), model.state_dict(), {"modules": {}})
    state = model.state_dict()
    del state["lm_head.qweight"]
    with pytest.raises(CorruptFileError, match="missing"):
        load_quantized(llama(tied=False), state, summary.config)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CorruptFileError, match="metadata"):
        load_quantized(llama(), tmp_path / "plain.safetensors")
