"""Saving and loading quantized models without re-quantizing.

A quantized model is fully described by (1) the float model's architecture, (2) a small JSON quant config that
names every replaced module and its format options, and (3) the quantized state dict (codes, statistics, and
every tensor left in float). `save_quantized` writes (3) as safetensors with (2) in the file's metadata under
``"hayai.quant"``; `load_quantized` takes a float skeleton of (1) (which may live on the meta device), swaps in
empty quantized modules as the config says, and loads the tensors: no quantization math runs on load.

Config layout (``format`` "hayai.quant", ``version`` 1)::

    {"format": "hayai.quant", "version": 1, "method": "int4", "options": {"group_size": 64},
     "modules": {"model.layers.0.mlp.up_proj": {"kind": "int4", "group_size": 64, "dtype": "bfloat16",
                                                "in_features": 576, "out_features": 1536, "bias": false},
                 "model.embed_tokens": {"kind": "embedding", "bits": 8, "dtype": "bfloat16",
                                        "num_embeddings": 49152, "embedding_dim": 576, "padding_idx": null,
                                        "tied_to": "lm_head"}},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}

``aliases`` lists state-dict keys left out of the file because they share storage with another key (tied
float weights); they are restored from the key they alias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hayai.errors import ConfigError, CorruptFileError
from hayai.quant.base import QuantizedLinear
from hayai.quant.embedding import QuantizedEmbedding
from hayai.quant.int4 import Int4Linear
from hayai.quant.int8 import Int8Linear
from hayai.quant.nf4 import NF4Linear

FORMAT = "hayai.quant"
VERSION = 1
METADATA_KEY = "hayai.quant"
LINEAR_KINDS: dict[str, type[QuantizedLinear]] = {cls.kind: cls for cls in (Int8Linear, Int4Linear, NF4Linear)}


def quant_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable description of every quantized module in ``model``."""
    names = {id(module): name for name, module in model.named_modules()}
    modules: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            modules[name] = module.config() | {"in_features": module.in_features,
                                               "out_features": module.out_features, "bias": module.bias is not None}
        elif isinstance(module, QuantizedEmbedding):
            head = module.tied_head
            modules[name] = module.config() | {
                "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx, "tied_to": None if head is None else names.get(id(head))}
    return {"format": FORMAT, "version": VERSION, "modules": modules}


def _check_config(config: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{where}: not a hayai quant config (expected format {FORMAT!r})")
    if config.get("version") != VERSION:
        raise ConfigError(f"{where}: quant config version {config.get('version')!r} is not supported "
                          f"(this hayai reads version {VERSION})")
    modules = config.get("modules")
    if not isinstance(modules, dict):
        raise ConfigError(f"{where}: quant config field 'modules' must be an object")
    return modules


def _float_module(model: nn.Module, name: str, expected: type[nn.Module], where: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"{where}: module {name!r} named in the quant config is not in the model") from None
    if not isinstance(module, expected):
        raise ConfigError(f"{where}: module {name!r} is {type(module).__name__}, the quant config expects "
                          f"{expected.__name__}")
    return module


def _target_device(module: nn.Module, device: torch.device | str | None) -> torch.device | str:
    if device is not None:
        return device
    weight = getattr(module, "weight", None)
    return "cpu" if weight is None or weight.device.type == "meta" else weight.device


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def rebuild_quantized(model: nn.Module, config: dict[str, Any], *, device: torch.device | str | None = None,
                      where: str = "quant config") -> nn.Module:
    """Replace the float modules named in ``config`` by empty quantized modules (no quantization runs)."""
    modules = _check_config(config, where)
    built: dict[str, nn.Module] = {}
    for name, entry in modules.items():  # linears first: tied embeddings point at them
        if entry.get("kind") == QuantizedEmbedding.kind:
            continue
        cls = LINEAR_KINDS.get(entry.get("kind"))
        if cls is None:
            raise ConfigError(f"{where}: module {name!r} has unknown kind {entry.get('kind')!r}")
        linear = _float_module(model, name, nn.Linear, where)
        if (linear.in_features, linear.out_features) != (entry["in_features"], entry["out_features"]):
            raise ConfigError(f"{where}: module {name!r} is {linear.in_features}->{linear.out_features} in the "
                              f"model but {entry['in_features']}->{entry['out_features']} in the quant config")
        options = {k: v for k, v in entry.items() if k not in ("in_features", "out_features", "bias")}
        try:
            built[name] = cls.from_config(entry["in_features"], entry["out_features"], entry["bias"], options,
                                          device=_target_device(linear, device))
        except TypeError as exc:
            raise ConfigError(f"{where}: module {name!r}: bad options {options}: {exc}") from None
        _set_module(model, name, built[name])
    for name, entry in modules.items():
        if entry.get("kind") != QuantizedEmbedding.kind:
            continue
        embedding = _float_module(model, name, nn.Embedding, where)
        head_name = entry.get("tied_to")
        if head_name is not None:
            head = built.get(head_name)
            if not isinstance(head, Int8Linear):
                raise ConfigError(f"{where}: embedding {name!r} is tied to {head_name!r}, which is not an int8 "
                                  "layer of this config")
            new: nn.Module = QuantizedEmbedding.tied_to(head, entry.get("padding_idx"))
        else:
            new = QuantizedEmbedding.from_config(entry["num_embeddings"], entry["embedding_dim"],
                                                 entry.get("padding_idx"), entry,
                                                 device=_target_device(embedding, device))
        _set_module(model, name, new)
    return model


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(contiguous tensors to save, aliases): keys sharing storage with an earlier key are left out."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise ConfigError(f"cannot save {key!r}: it is on the meta device (no values)")
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = tensor.contiguous()
    return tensors, aliases


def save_quantized(model: nn.Module, path: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the model's state as safetensors with its quant config in the metadata; returns the config."""
    from safetensors.torch import save_file

    tensors, aliases = quantized_state_dict(model)
    config = dict(config if config is not None else quant_config(model))
    config["modules"] = quant_config(model)["modules"]  # always the modules actually in the model
    config["aliases"] = aliases
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(config)})
    return config


def read_quantized(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, quant config) from a file written by `save_quantized`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        # Fresh, aligned copies: the packed int8/int4 kernels can crash on tensors left inside the file mapping.
        tensors = {key: tensor.clone() for key, tensor in load_file(str(path)).items()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(f"{path}: cannot read as safetensors: {exc}") from None
    if METADATA_KEY not in metadata:
        raise CorruptFileError(f"{path}: no {METADATA_KEY!r} entry in the safetensors metadata; "
                               "not written by hayai.quant.save_quantized")
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON: {exc}") from None
    return tensors, config


def load_quantized(model: nn.Module, source: str | Path | dict[str, torch.Tensor],
                   config: dict[str, Any] | None = None, *, device: torch.device | str | None = None) -> nn.Module:
    """Turn a float skeleton into the saved quantized model, in place, without re-quantizing.

    Args:
        model: the float architecture (its float weights are ignored and may be on the meta device).
        source: a file written by `save_quantized`, or a state dict (then ``config`` is required).
        config: the quant config; by default the one stored in the file.
        device: where the quantized modules are built (default: each float module's device, CPU for meta).
    """
    where = str(source) if isinstance(source, (str, Path)) else "quantized state dict"
    if isinstance(source, (str, Path)):
        state, stored = read_quantized(source)
        config = config if config is not None else stored
    else:
        state = dict(source)
        if config is None:
            raise ConfigError("load_quantized from a state dict needs the quant config")
    rebuild_quantized(model, config, device=device, where=where)
    for key, target in (config.get("aliases") or {}).items():
        if target not in state:
            raise CorruptFileError(f"{where}: alias {key!r} points at missing key {target!r}")
        state.setdefault(key, state[target])
    on_meta = any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    result = model.load_state_dict(state, strict=False, assign=on_meta)
    if result.missing_keys or result.unexpected_keys:
        raise CorruptFileError(f"{where}: state does not match the model: missing {result.missing_keys[:8]}, "
                               f"unexpected {result.unexpected_keys[:8]}")
    return model
