"""Adapters on disk in Hugging Face PEFT's format, readable by `peft.PeftModel.from_pretrained` and written by
it.

A PEFT adapter directory holds
  adapter_config.json        the config (peft_type "LORA" or "IA3", r, lora_alpha, target_modules, ...)
  adapter_model.safetensors  the tensors, keyed "base_model.model.<module>.<tensor>" with no adapter name:
                             lora_A.weight [r, in], lora_B.weight [out, r], lora_embedding_A [r, vocab],
                             lora_embedding_B [dim, r], ia3_l ([out, 1] or [1, in]); modules_to_save are
                             stored as their own parameters, "base_model.model.lm_head.weight".
Older adapters may hold adapter_model.bin (a torch pickle of the same dict) instead; both are read.

Config fields and defaults are PEFT's (`tuners/lora/config.py`, `tuners/ia3/config.py`). Unknown fields are
ignored (newer PEFT versions add some); fields that select a method hayai does not run (DoRA, LoRA biases,
PiSSA-style initialisations that rewrite the base weights, ...) raise an error naming the file and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hayai.errors import ConfigError, CorruptFileError, ModelNotFoundError, UnsupportedModelError
from hayai.peft.adapter import Adapter, adapter_from_model, apply_adapter
from hayai.peft.config import AdapterConfig, IA3Config, LoraConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA", "IA3")

# LoraConfig fields that must keep their "off" value: each turns on a variant hayai does not implement.
_UNSUPPORTED_LORA_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "a trainable bias on lora_B",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token indices",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
}
# init_lora_weights values whose initialisation rewrites the base weights: the adapter is useless without
# them.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ------------------------------------------------------------------------------------------------------------
# config <-> dict


def _number(value: float) -> float:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def config_to_dict(config: AdapterConfig) -> dict:
    """The adapter_config.json content PEFT expects (fields that exist in every PEFT version since 0.9)."""
    common = {
        "auto_mapping": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": config.modules_to_save,
        "peft_type": config.peft_type,
        "revision": config.revision,
        "target_modules": config.target_modules,
        "task_type": config.task_type,
    }
    if config.exclude_modules is not None:
        common["exclude_modules"] = config.exclude_modules
    if isinstance(config, IA3Config):
        return {
            **common,
            "feedforward_modules": config.feedforward_modules,
            "init_ia3_weights": config.init_ia3_weights,
        }
    return {
        **common,
        "alpha_pattern": {k: _number(v) for k, v in config.alpha_pattern.items()},
        "bias": "none",
        "init_lora_weights": config.init_lora_weights,
        "layers_pattern": config.layers_pattern,
        "layers_to_transform": config.layers_to_transform,
        "loftq_config": {},
        "lora_alpha": _number(config.lora_alpha),
        "lora_dropout": config.lora_dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "r": config.r,
        "rank_pattern": dict(config.rank_pattern),
        "use_dora": False,
        "use_rslora": config.use_rslora,
    }


def _check_lora_support(data: dict) -> None:
    for field, what in _UNSUPPORTED_LORA_FIELDS.items():
        if data.get(field):
            raise UnsupportedModelError(
                f"field {field}={data[field]!r} asks for {what}, which hayai does not support"
            )
    if data.get("bias", "none") != "none":
        raise UnsupportedModelError(f"field bias={data['bias']!r}: hayai supports only bias='none'")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnsupportedModelError(
            f"field init_lora_weights={init!r}: this initialisation rewrites the base weights, which hayai "
            "does not do; convert the adapter to plain LoRA in PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )


def _pick(data: dict, names: tuple[str, ...]) -> dict:
    return {name: data[name] for name in names if name in data}


def config_from_dict(data: dict) -> AdapterConfig:
    """A LoraConfig / IA3Config from adapter_config.json content; raises naming the offending field."""
    if not isinstance(data, dict):
        raise CorruptFileError(f"expected a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise CorruptFileError("field peft_type is missing")
    peft_type = str(data["peft_type"]).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise UnsupportedModelError(
            f"peft_type {data['peft_type']!r} is not supported; hayai reads {', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    if data.get("target_modules") is None:
        raise ConfigError("field target_modules is missing or null")
    common = (
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "base_model_name_or_path",
        "revision",
        "task_type",
    )
    if peft_type == "IA3":
        return IA3Config(**_pick(data, (*common, "feedforward_modules", "init_ia3_weights")))
    _check_lora_support(data)
    lora_fields = (
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "init_lora_weights",
    )
    values = _pick(data, (*common, *lora_fields))
    for name in ("rank_pattern", "alpha_pattern"):  # null in some old files
        if values.get(name) is None:
            values.pop(name, None)
    return LoraConfig(**values)


# ------------------------------------------------------------------------------------------------------------
# files


def _read_config(directory: Path) -> AdapterConfig:
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise CorruptFileError(
            f"{directory}: no {ADAPTER_CONFIG_NAME} (a PEFT adapter directory holds {ADAPTER_CONFIG_NAME} "
            "and "
            f"{SAFETENSORS_WEIGHTS_NAME})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CorruptFileError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        return config_from_dict(data)
    except (ConfigError, CorruptFileError, UnsupportedModelError) as error:
        raise type(error)(f"{path}: {error}") from None
    except TypeError as error:  # a field of the wrong type that the dataclass could not take
        raise ConfigError(f"{path}: {error}") from None


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safetensors_path, bin_path = directory / SAFETENSORS_WEIGHTS_NAME, directory / BIN_WEIGHTS_NAME
    if safetensors_path.is_file():
        try:
            tensors = load_file(safetensors_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptFileError(f"{safetensors_path}: not a readable safetensors file ({error})") from None
        path = safetensors_path
    elif bin_path.is_file():
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a corrupt pickle
            raise CorruptFileError(f"{bin_path}: not a readable torch file ({error})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CorruptFileError(f"{bin_path}: expected a dict of tensors")
        path = bin_path
    else:
        raise CorruptFileError(f"{directory}: no {SAFETENSORS_WEIGHTS_NAME} (or {BIN_WEIGHTS_NAME})")
    if not tensors:
        raise CorruptFileError(
            f"{path}: holds no tensors (an adapter saved before training had gathered them?)"
        )
    return {key.removeprefix(KEY_PREFIX): value for key, value in tensors.items()}, path


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """Read a PEFT adapter directory (written by hayai or by PEFT)."""
    path = Path(directory)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: no such adapter directory")
    config = _read_config(path)
    tensors, weights_path = _read_tensors(path)
    adapter = Adapter(config, tensors, source=str(weights_path))
    adapter.check()
    return adapter


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_adapter(adapter: Adapter, directory: str | os.PathLike) -> Path:
    """Write `adapter` as a PEFT adapter directory and return it; existing files are replaced atomically."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        KEY_PREFIX + key: value.detach().cpu().contiguous().clone() for key, value in adapter.tensors.items()
    }
    text = json.dumps(config_to_dict(adapter.config), indent=2, sort_keys=True) + "\n"
    _write_atomically(
        path / SAFETENSORS_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})
    )
    _write_atomically(path / ADAPTER_CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    modules_to_save: list[str] | None = None,
    save_embedding_layers: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save the adapter in `model` (see `adapter_from_model`) in PEFT's format; returns the directory."""
    adapter = adapter_from_model(
        model,
        modules_to_save=modules_to_save,
        save_embedding_layers=save_embedding_layers,
        base_model_name_or_path=base_model_name_or_path,
    )
    return write_adapter(adapter, directory)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Read a PEFT adapter directory and apply it to `model` (see `apply_adapter`); returns `model`."""
    return apply_adapter(model, read_adapter(directory), trainable=trainable, dtype=dtype)
