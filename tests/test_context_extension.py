"""Context extension (RoPE linear / dynamic NTK) against transformers, and `--method longlora --context N`."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tinymodels import VOCAB, hf_llama, native_from

import hayai
from hayai.attention import ShiftedSparseAttention
from hayai.errors import ConfigError
from hayai.models.context_extension import extend_context, extended_config
from hayai.train.recipe import FinetuneConfig, prepare_model


@pytest.mark.parametrize("method", ["linear", "dynamic"])
def test_extended_model_equals_transformers_with_the_same_rope_scaling(method):
    reference = hf_llama(max_position_embeddings=64)
    native = native_from(reference)
    assert extend_context(native, 256, method)
    scaling = native.config.rope_scaling
    assert (scaling.rope_type, scaling.factor) == (method, 4.0)
    assert native.config.context_window == 256
    # transformers' conventions: linear raises max_position_embeddings, dynamic keeps the trained window
    assert native.config.max_position_embeddings == (256 if method == "linear" else 64)
    hf_config = transformers.LlamaConfig(**native.config.to_hf_dict())
    extended = transformers.LlamaForCausalLM(hf_config).eval()
    extended.load_state_dict(reference.state_dict())
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = extended(ids).logits
        got = native(ids)
    assert (got - expected).abs().max() <= 1e-4
    with torch.no_grad():  # and the scaling really changes something over 200 positions
        assert (native_from(reference)(ids) - got).abs().max() > 1e-3


def test_a_window_the_model_has_needs_no_scaling_and_bad_methods_are_refused():
    config = native_from(hf_llama(max_position_embeddings=64)).config
    assert extended_config(config, 64) is config
    with pytest.raises(ConfigError, match="linear, dynamic"):
        extended_config(config, 128, "yarn")


def test_longlora_prepares_s2_attention_trainable_embeddings_and_norms_and_the_window():
    model = native_from(hf_llama(max_position_embeddings=64))
    config = FinetuneConfig(method="longlora", context=128)
    assert config.seq_len == 128 and config.trainable == "embed,norm"
    prepare_model(model, config, autocast_dtype=None)
    kernels = [m for m in model.modules() if isinstance(m, ShiftedSparseAttention)]
    assert len(kernels) == model.config.num_hidden_layers
    assert model.config.max_position_embeddings == 128
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in trained and "model.norm.weight" in trained
    assert any("lora_A" in name for name in trained)
    with pytest.raises(ConfigError, match="must be even and divide seq_len"):
        FinetuneConfig(method="longlora", seq_len=100)


@pytest.mark.slow
def test_longlora_finetune_saves_the_window_and_generate_uses_it(tiny_checkpoint, hayai_home, tmp_path):
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 50}" for j in range(120))} for i in range(8)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = hayai.finetune(str(tiny_checkpoint), data, output=tmp_path / "long", method="longlora", context=256,
                            max_steps=2, batch_size=2, autocast="none", warmup=0, threads=1)
    assert len(result.losses) == 2
    llm = hayai.load(str(tiny_checkpoint), dtype="fp32", adapter=str(tmp_path / "long"))
    assert llm.model.config.context_window == 256
    assert llm.model.config.rope_scaling.rope_type == "linear"
    assert not any(isinstance(m, ShiftedSparseAttention) for m in llm.model.modules())  # full attention
    prompt = llm.tokenizer.encode(" ".join(["w1"] * 75), add_special_tokens=False)  # beyond the 128 trained
    completion = llm.engine.generate(prompt, max_new_tokens=4)
    assert len(completion.token_ids) == 4
    merged = hayai.finetuning.merge_adapter(str(tiny_checkpoint), tmp_path / "long", tmp_path / "merged")
    saved = json.loads((merged / "config.json").read_text())
    assert saved["max_position_embeddings"] == 256
