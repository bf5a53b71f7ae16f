"""Target matching, modules_to_save and trainable selection, compared with PEFT on the same models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft import adapter_layers, apply_ia3, apply_lora, trainable_parameters_summary

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.ia3 import IA3Layer  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402


def tiny_llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def peft_model(model: nn.Module, config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, transformers.PreTrainedModel):
            return peft.get_peft_model(model, config).base_model.model
        return peft.inject_adapter_in_model(config, model)


def wrapped_by_peft(model: nn.Module, layer_type: type = LoraLayer) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, layer_type)}


LORA_SPECS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": "all-linear"},
    {"target_modules": r".*layers\.1\..*(q|k|down)_proj"},
    {"target_modules": ["self_attn.o_proj", "embed_tokens", "lm_head"]},
    {"target_modules": "all-linear", "exclude_modules": ["layers.0.self_attn.q_proj", "gate_proj"]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "lm_head", "embed_tokens"], "modules_to_save": ["lm_head"]},
]


@pytest.mark.parametrize("spec", LORA_SPECS, ids=lambda s: str(s)[:60])
def test_lora_targets_equal_peft(spec):
    base = tiny_llama()
    ours = apply_lora(copy.deepcopy(base), r=2, **spec)
    theirs = peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, **spec))
    assert set(adapter_layers(ours)) == wrapped_by_peft(theirs)
    if spec.get("modules_to_save"):
        saved = {n for n, m in theirs.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        trainable = {n.rsplit(".", 1)[0] for n, p in ours.named_parameters() if p.requires_grad and "lora" not in n}
        assert trainable == saved


def test_all_linear_on_a_plain_sequential_equals_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    ours = apply_lora(copy.deepcopy(base), target_modules="all-linear")
    theirs = peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear"))
    assert set(adapter_layers(ours)) == wrapped_by_peft(theirs) == {"0", "2.0", "2.1"}


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"target_modules": ["k_proj", "v_proj", "down_proj", "up_proj"], "feedforward_modules": ["down_proj"]},
        {"target_modules": r".*\.(k_proj|down_proj)", "feedforward_modules": r".*down_proj"},
    ],
    ids=str,
)
def test_ia3_targets_and_feedforward_flags_equal_peft(spec):
    base = tiny_llama(2)
    ours = apply_ia3(copy.deepcopy(base), **spec)
    peft_spec = spec or {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    theirs = peft_model(copy.deepcopy(base), peft.IA3Config(**peft_spec))
    ours_flags = {name: layer.is_feedforward for name, layer in adapter_layers(ours).items()}
    theirs_flags = {n: m.is_feedforward for n, m in theirs.named_modules() if isinstance(m, IA3Layer)}
    assert ours_flags == theirs_flags


def test_modules_to_save_suffix_rule_equals_peft():
    base = tiny_llama(2)
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], modules_to_save=["norm", "embed_tokens"])
    theirs = peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["norm", "embed_tokens"])
    )
    saved = {n for n, m in theirs.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert len(saved) == 2 * 2 + 2  # "norm" is a plain suffix: input/post_attention layernorms and model.norm
    trainable = {n.rsplit(".", 1)[0] for n, p in ours.named_parameters() if p.requires_grad and "lora" not in n}
    assert trainable == saved


def test_longlora_trainable_embeddings_and_norms():
    model = apply_lora(tiny_llama(2), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], trainable="embed,norm")
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if "lora_" in n or "embed" in n or "norm" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert any("embed_tokens" in n for n in expected) and sum("norm" in n for n in expected) == 2 * 2 + 1


def test_trainable_summary_equals_peft():
    base = tiny_llama(2)
    ours = apply_lora(copy.deepcopy(base), r=4, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear"))
    summary = trainable_parameters_summary(ours)
    assert (summary.trainable, summary.total) == theirs.get_nb_trainable_parameters()


def test_target_errors_name_the_problem():
    with pytest.raises(ConfigError, match="matches no module"):
        apply_lora(tiny_llama(1), target_modules=["qkv_proj"])
    with pytest.raises(ConfigError, match="LlamaMLP"):
        apply_lora(tiny_llama(1), target_modules=["mlp"])
    model = apply_lora(tiny_llama(1), target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="already has an adapter"):
        apply_lora(model, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="matches no parameter"):
        apply_lora(tiny_llama(1), target_modules=["q_proj"], trainable="nonexistent")
    with pytest.raises(ConfigError, match="modules_to_save entry"):
        apply_lora(tiny_llama(1), target_modules=["q_proj"], modules_to_save=["classifier"])
