"""Fused q/k/v and gate/up projections compute what the separate projections compute."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import decode, tiny_lm

from hayai.decode.fused import FusedMLP, FusedQKVAttention, fuse_linears, fuse_projections
from hayai.decode.lookahead import LookaheadDecoding
from hayai.decode.prompt_lookup import PromptLookup
from hayai.decode.speculative import SpeculativeDecoding
from hayai.quant import quantize_model

PROMPT = [5, 17, 33, 2, 8, 5, 17, 33, 41, 9, 5, 17]


@pytest.mark.parametrize("method,dtype", [(None, torch.float32), ("int8", torch.float32), ("int4", torch.float32),
                                          ("int8", torch.bfloat16), ("int4", torch.bfloat16)])
def test_fused_model_matches_the_unfused_one(method, dtype):
    model = tiny_lm(seed=0, attention_bias=True).to(dtype)
    if method:
        quantize_model(model, method, group_size=16)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        expected = model(ids).float()
        summary = fuse_projections(model)
        got = model(ids).float()
    assert summary.attention == summary.mlp == 2 and not summary.skipped
    assert isinstance(model.model.layers[0].self_attn, FusedQKVAttention)
    assert isinstance(model.model.layers[1].mlp, FusedMLP)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tolerance


def test_fused_model_decodes_the_same_tokens_with_every_strategy():
    model = tiny_lm(seed=0)
    plain, _ = decode(model, PROMPT, 30)
    fuse_projections(model)
    assert decode(model, PROMPT, 30)[0] == plain
    assert decode(model, PROMPT, 30, SpeculativeDecoding(PromptLookup()))[0] == plain
    assert decode(model, PROMPT, 30, LookaheadDecoding(window=3))[0] == plain


def test_layers_that_cannot_be_fused_are_left_with_a_reason():
    model = tiny_lm(seed=0)
    quantize_model(model, "int8", include=["q_proj"])  # q is int8, k and v stay float
    summary = fuse_projections(model)
    assert summary.attention == 0 and summary.mlp == 2
    assert "mixed layer types" in summary.skipped["model.layers.0.self_attn"]
    assert "only nn.Linear" in fuse_linears([torch.nn.Conv1d(2, 2, 1), torch.nn.Conv1d(2, 2, 1)])
