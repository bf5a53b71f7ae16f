"""Weighted adapter combination: "cat" is exact, "linear"/"svd"/(IA)³ agree with PEFT's add_weighted_adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft import (
    adapter_from_model,
    adapter_layers,
    apply_adapter,
    apply_ia3,
    apply_lora,
    combine_ia3,
    combine_lora,
    write_adapter,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
WEIGHTS = [0.7, -0.4, 1.3]


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


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_source(base: nn.Module, seed: int, r: int, alpha: float, targets: list[str]):
    model = apply_lora(copy.deepcopy(base), target_modules=targets, r=r, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for parameter in layer.adapter_parameters().values():
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return adapter_from_model(model)


def peft_weighted(base: nn.Module, sources, tmp_path, **kwargs) -> nn.Module:
    names = [f"s{i}" for i in range(len(sources))]
    for name, source in zip(names, sources, strict=True):
        write_adapter(source, tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(
            copy.deepcopy(base), str(tmp_path / names[0]), adapter_name=names[0]
        )
        for name in names[1:]:
            model.load_adapter(str(tmp_path / name), adapter_name=name)
        model.add_weighted_adapter(names, WEIGHTS[: len(names)], adapter_name="mix", **kwargs)
        model.set_adapter("mix")
    return model.eval()


TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def test_cat_is_exactly_the_weighted_sum_of_updates(base):
    sources = [
        lora_source(base, 0, 4, 8, TARGETS),
        lora_source(base, 1, 2, 16, TARGETS),
        lora_source(base, 2, 4, 4, ["q_proj", "o_proj"]),
    ]
    merged = combine_lora(sources, WEIGHTS, "cat")
    for module in merged.adapted_modules():
        a, b, _ = merged.lora_factors(module)
        assert merged.config.scaling_for(module) == 1.0
        expected = torch.zeros(b.shape[0], a.shape[1])
        for source, weight in zip(sources, WEIGHTS, strict=True):
            if module in source.adapted_modules():
                sa, sb, _ = source.lora_factors(module)
                expected += weight * source.config.scaling_for(module) * (sb @ sa)
        torch.testing.assert_close(b @ a, expected, atol=1e-6, rtol=1e-6)
    assert merged.lora_factors("model.layers.0.self_attn.q_proj")[0].shape[0] == 4 + 2 + 4
    assert merged.lora_factors("model.layers.0.self_attn.o_proj")[0].shape[0] == 4  # only the third source


@pytest.mark.parametrize(
    ("combination", "kwargs"),
    [
        ("cat", {}),
        ("linear", {}),
        ("svd", {}),
        ("svd", {"svd_rank": 3}),
        ("svd", {"svd_rank": 5, "svd_clamp": 0.9}),
    ],
    ids=["cat", "linear", "svd", "svd-rank3", "svd-clamp"],
)
def test_lora_combinations_agree_with_peft(base, tmp_path, combination, kwargs):
    sources = [lora_source(base, 0, 4, 8, TARGETS), lora_source(base, 1, 4, 16, TARGETS)]
    theirs = peft_weighted(base, sources, tmp_path, combination_type=combination, **kwargs)
    merged = combine_lora(sources, WEIGHTS[:2], combination, **kwargs)
    ours = apply_adapter(copy.deepcopy(base), merged)
    expected = logits(theirs)
    assert (expected - logits(base)).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)
    for name, layer in adapter_layers(ours).items():  # same ΔW per module, not just the same logits
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.delta_weight(), peft_layer.get_delta_weight("mix"), atol=1e-5, rtol=1e-4
        )


def test_linear_needs_equal_ranks(base):
    sources = [lora_source(base, 0, 4, 8, ["q_proj"]), lora_source(base, 1, 2, 8, ["q_proj"])]
    with pytest.raises(ConfigError, match=r"needs equal ranks; module model\.layers\.0\.self_attn\.q_proj"):
        combine_lora(sources, [0.5, 0.5], "linear")


def test_ia3_weighted_sum_agrees_with_peft(base, tmp_path):
    sources = []
    for seed in (0, 1):
        model = apply_ia3(copy.deepcopy(base))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape, generator=generator))
        sources.append(adapter_from_model(model))
    theirs = peft_weighted(base, sources, tmp_path)
    ours = apply_adapter(copy.deepcopy(base), combine_ia3(sources, WEIGHTS[:2]))
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-4)
    key = "model.layers.1.mlp.down_proj.ia3_l"
    combined = combine_ia3(sources, WEIGHTS[:2])
    torch.testing.assert_close(
        combined.tensors[key], 0.7 * sources[0].tensors[key] - 0.4 * sources[1].tensors[key]
    )
    assert combined.config.feedforward_modules == ["down_proj"]


def test_combining_refuses_mixed_inputs(base):
    lora = lora_source(base, 0, 2, 2, ["q_proj"])
    ia3 = adapter_from_model(apply_ia3(copy.deepcopy(base)))
    with pytest.raises(ConfigError, match="expected LORA"):
        combine_lora([lora, ia3], [1, 1])
    with pytest.raises(ConfigError, match="2 weights for 1 adapters"):
        combine_lora([lora], [1, 1])
    trained = adapter_from_model(apply_lora(copy.deepcopy(base), target_modules=["q_proj"], trainable="norm"))
    with pytest.raises(ConfigError, match="trains whole modules"):
        combine_lora([lora, trained], [1, 1], "cat")
