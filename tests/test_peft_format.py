"""PEFT-format interop both ways on a tiny random Llama (PEFT is the oracle), and the loader's error messages."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hayai.errors import ConfigError, CorruptFileError, ModelNotFoundError, UnsupportedModelError
from hayai.peft import (
    adapter_layers,
    apply_ia3,
    apply_lora,
    load_adapter,
    read_adapter,
    save_adapter,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, base: nn.Module) -> None:
    assert (expected - logits(base)).abs().max() > 1e-2, "the adapter must change the logits for the test to bite"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def peft_from_pretrained(base: nn.Module, directory) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def perturb(parameters, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


# --------------------------------------------------------------------------------------------------------------
# hayai -> PEFT

HAYAI_LORA = [
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8},
    {"target_modules": "all-linear", "r": 4, "alpha": 16, "use_rslora": True},
    {"target_modules": ["q_proj", "embed_tokens"], "r": 2, "alpha": 4},
    {
        "target_modules": ["q_proj", "o_proj", "up_proj"],
        "r": 4,
        "rank_pattern": {"o_proj": 2, r"model\.layers\.1\.mlp\.up_proj": 6},
        "alpha_pattern": {"up_proj": 3},
    },
]


@pytest.mark.parametrize("spec", HAYAI_LORA, ids=lambda s: str(s)[:50])
def test_hayai_lora_loads_in_peft_with_the_same_logits(base, spec, tmp_path):
    ours = apply_lora(copy.deepcopy(base), init_lora_weights=False, **spec)
    for layer in adapter_layers(ours).values():  # embedding adapters start with A = 0 even then
        perturb(layer.adapter_parameters().values())
    save_adapter(ours, tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.model.layers.") or "embed_tokens" in key for key in stored)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in stored
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert_same_logits(logits(peft_from_pretrained(base, tmp_path)), logits(ours), base)


def test_hayai_trained_embeddings_and_norms_load_in_peft_as_modules_to_save(base, tmp_path):
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], trainable="embed,norm")
    perturb(p for p in ours.parameters() if p.requires_grad)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "input_layernorm", "norm", "post_attention_layernorm"]
    assert "base_model.model.model.norm.weight" in load_file(tmp_path / "adapter_model.safetensors")
    assert_same_logits(logits(peft_from_pretrained(base, tmp_path)), logits(ours), base)


def test_hayai_ia3_loads_in_peft_with_the_same_logits(base, tmp_path):
    ours = apply_ia3(copy.deepcopy(base))
    perturb(p for p in ours.parameters() if p.requires_grad)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert stored["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 32)
    assert stored["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (8, 1)
    assert_same_logits(logits(peft_from_pretrained(base, tmp_path)), logits(ours), base)


# --------------------------------------------------------------------------------------------------------------
# PEFT -> hayai

PEFT_CONFIGS = [
    lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    lambda: peft.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, init_lora_weights=False),
    lambda: peft.LoraConfig(
        r=2, target_modules=["k_proj", "embed_tokens"], modules_to_save=["lm_head"], init_lora_weights=False
    ),
    lambda: peft.LoraConfig(r=2, target_modules=r".*\.1\.mlp\.(gate|up)_proj", lora_dropout=0.1),
    lambda: peft.IA3Config(init_ia3_weights=False),
    lambda: peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
]


@pytest.mark.parametrize("make_config", PEFT_CONFIGS, ids=range(len(PEFT_CONFIGS)))
def test_peft_adapter_loads_in_hayai_with_peft_logits(base, make_config, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), make_config())
        trainable = [p for p in theirs.parameters() if p.requires_grad]
        perturb(trainable)  # random B (and modules_to_save copies) so the adapter is not the identity
        theirs.save_pretrained(str(tmp_path))
    expected = logits(theirs.eval())
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert not any(p.requires_grad for p in ours.parameters())
    assert_same_logits(logits(ours), expected, base)
    trainable_again = load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    assert sum(p.numel() for p in trainable_again.parameters() if p.requires_grad) == sum(
        p.numel() for p in trainable
    )


def test_hayai_round_trip_and_bin_files(base, tmp_path):
    ours = apply_lora(copy.deepcopy(base), target_modules=["v_proj", "up_proj"], init_lora_weights=False)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    again = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert_same_logits(logits(again), logits(ours), base)
    legacy = tmp_path / "legacy"  # older PEFT wrote adapter_model.bin (a torch pickle) instead
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    torch.save(load_file(tmp_path / "a" / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    assert_same_logits(logits(load_adapter(copy.deepcopy(base), legacy)), logits(ours), base)


# --------------------------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def saved(base, tmp_path):
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=4)
    return save_adapter(ours, tmp_path / "adapter")


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such adapter directory"):
        read_adapter(tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptFileError, match=r"no adapter_model\.safetensors"):
        read_adapter(saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(CorruptFileError, match=r"no adapter_config\.json"):
        read_adapter(saved)


def test_corrupt_json_names_file_and_line(saved):
    (saved / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(CorruptFileError, match=r"adapter_config\.json: invalid JSON at line 3"):
        read_adapter(saved)


def test_corrupt_or_empty_weights(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CorruptFileError, match=r"adapter_model\.safetensors: not a readable safetensors"):
        read_adapter(saved)
    save_file({}, saved / "adapter_model.safetensors")
    with pytest.raises(CorruptFileError, match="holds no tensors"):
        read_adapter(saved)


def test_unsupported_peft_type_and_features(saved):
    edit_config(saved, peft_type="LOHA")
    with pytest.raises(UnsupportedModelError, match=r"adapter_config\.json: peft_type 'LOHA' .* LORA, IA3"):
        read_adapter(saved)
    edit_config(saved, peft_type="LORA", use_dora=True)
    with pytest.raises(UnsupportedModelError, match="use_dora=True asks for DoRA"):
        read_adapter(saved)
    edit_config(saved, use_dora=False, init_lora_weights="pissa")
    with pytest.raises(UnsupportedModelError, match="rewrites the base weights"):
        read_adapter(saved)
    edit_config(saved, init_lora_weights=True, r=-1)
    with pytest.raises(ConfigError, match=r"adapter_config\.json: r must be a positive integer"):
        read_adapter(saved)


def test_rank_mismatch_names_module_and_shapes(saved):
    edit_config(saved, r=8)
    message = (
        r"adapter_model\.safetensors: shape mismatch for module model\.layers\.0\.self_attn\.q_proj: lora_A\.weight "
        r"has shape \(4, 16\) and lora_B\.weight has shape \(16, 4\), but the adapter config gives r=8"
    )
    with pytest.raises(ConfigError, match=message):
        read_adapter(saved)


def test_shape_mismatch_with_the_model_names_module_and_both_shapes(saved):
    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    reference = {k: v.clone() for k, v in wider.state_dict().items()}
    message = (
        r"shape mismatch for module model\.layers\.0\.self_attn\.q_proj: tensor "
        r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 16\) in the adapter but the model "
        r"expects \(4, 24\) \(the adapter config gives r=4 for this module; module in_features=24"
    )
    with pytest.raises(ConfigError, match=message):
        load_adapter(wider, saved)
    assert not adapter_layers(wider)  # nothing changed
    assert all(torch.equal(v, reference[k]) for k, v in wider.state_dict().items())


def test_keys_matching_no_module_are_named(base, saved):
    original = load_file(saved / "adapter_model.safetensors")
    for module in ("model.layers.7.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        tensors = dict(original)
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(4, 16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(8, 4)
        save_file(tensors, saved / "adapter_model.safetensors")
        expected = "matches no module of the model" if "7" in module else "which the adapter config .* does not select"
        with pytest.raises(ConfigError, match=rf"'{module}\.lora_A\.weight' .*{expected}"):
            load_adapter(copy.deepcopy(base), saved)


def test_incomplete_lora_pair_is_named(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"no tensor model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        read_adapter(saved)


def test_missing_tensors_for_a_targeted_module(base, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"no tensor model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight: the"):
        load_adapter(copy.deepcopy(base), saved)


def test_native_hayai_model_interoperates_with_peft(base, tmp_path):
    """The native model mirrors HF Llama's module names, so its adapters are PEFT adapters for the HF model."""
    loading = pytest.importorskip("hayai.models.loading")
    from hayai.models.config import ModelConfig

    def native_model() -> nn.Module:
        return loading.build_model(ModelConfig.from_hf_dict(base.config.to_dict()), dict(base.state_dict()))

    ours = apply_lora(native_model(), init_lora_weights=False)  # "all-linear": every projection, not lm_head
    assert len(adapter_layers(ours)) == 2 * 7 and "lm_head" not in adapter_layers(ours)
    save_adapter(ours, tmp_path / "native")
    with torch.no_grad():
        native_logits = ours(IDS)
    assert_same_logits(logits(peft_from_pretrained(base, tmp_path / "native")), native_logits, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False))
        theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = load_adapter(native_model(), tmp_path / "peft")
    with torch.no_grad():
        assert_same_logits(loaded(IDS), logits(theirs.eval()), base)


def test_trained_tied_embeddings_round_trip_through_peft(tmp_path):
    """A trained tied embedding is saved under both embed_tokens and lm_head, so PEFT (which unties them into two
    modules_to_save copies) computes what hayai computes."""
    loading = pytest.importorskip("hayai.models.loading")
    from hayai.models.config import ModelConfig

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    tied = transformers.LlamaForCausalLM(config).eval()
    ours = loading.build_model(ModelConfig.from_hf_dict(tied.config.to_dict()), dict(tied.state_dict()))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    apply_lora(ours, target_modules=["q_proj", "v_proj"], trainable="embed,norm")
    perturb(p for p in ours.parameters() if p.requires_grad)
    save_adapter(ours, tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        expected = ours(IDS)
    assert_same_logits(logits(peft_from_pretrained(tied, tmp_path)), expected, tied)
    again = loading.build_model(ModelConfig.from_hf_dict(tied.config.to_dict()), dict(tied.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(again, tmp_path)(IDS), expected, atol=1e-6, rtol=1e-6)
