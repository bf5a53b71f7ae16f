"""The native model against HF transformers on tiny random configs (same weights, fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tinymodels import VOCAB, hf_llama, native_from

from hayai.models.llama import weight_bytes_read_per_token
from hayai.models.loading import build_model

CASES = {
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "head_dim_override": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=2),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=24),
    "rope_llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "rope_theta": dict(rope_theta=500000.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    hf = hf_llama(**CASES[case])
    native = native_from(hf)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = native(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_qwen2_bias_checkpoint_matches_transformers():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    native = native_from(hf)
    assert native.config.qkv_bias and not native.config.o_bias
    ids = torch.randint(0, VOCAB, (1, 29))
    with torch.no_grad():
        assert (native(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_tied_head_shares_the_embedding_tensor():
    native = native_from(hf_llama(tie_word_embeddings=True))
    assert native.lm_head.weight is native.model.embed_tokens.weight


def test_bf16_model_stays_close_to_fp32():
    hf = hf_llama()
    fp32 = native_from(hf)
    bf16 = build_model(fp32.config, {k: v.clone() for k, v in hf.state_dict().items()}, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
    assert b.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_packed_sequences_with_block_diagonal_mask_equal_separate_runs():
    native = native_from(hf_llama())
    a = torch.randint(0, VOCAB, (1, 7))
    b = torch.randint(0, VOCAB, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    segment = torch.tensor([0] * 7 + [1] * 5)
    causal = torch.arange(12)[:, None] >= torch.arange(12)[None, :]
    mask = (causal & (segment[:, None] == segment[None, :]))[None, None]
    with torch.no_grad():
        out = native(packed, positions=positions, mask=mask)
        assert torch.allclose(out[:, :7], native(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], native(b), atol=1e-5)


def test_weight_bytes_count_the_head_once_and_skip_the_embedding_table():
    untied = native_from(hf_llama())
    tied = native_from(hf_llama(tie_word_embeddings=True))
    total = lambda m: sum(p.numel() * 4 for p in m.parameters())  # noqa: E731
    embedding = VOCAB * 48 * 4
    assert weight_bytes_read_per_token(untied) == total(untied) - embedding
    assert weight_bytes_read_per_token(tied) == total(tied)  # the shared table is read as the head
