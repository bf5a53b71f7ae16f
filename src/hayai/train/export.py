"""Writing trained models: a full model directory (config.json + model.safetensors + tokenizer files).

The directory is what Hugging Face's `from_pretrained` and `hayai generate -m DIR` read. A tied output layer
(`lm_head` sharing the embedding table) is stored once, under the embedding's name, as in HF checkpoints.
Files are written under temporary names and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hayai.errors import ConfigError
from hayai.models.tokenizer import Tokenizer
from hayai.train.checkpointing import activation_checkpointing_removed

MODEL_FILE = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def model_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's dense state dict (tied lm_head dropped), floats cast to `dtype`; refuses quantized or
    adapter-wrapped modules, which HF checkpoints cannot hold (merge adapters first)."""
    with activation_checkpointing_removed(model):
        state = model.state_dict()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    odd = [k for k in state if ".base_layer." in k or k.endswith((".qweight", ".lora_A.weight"))]
    if odd:
        raise ConfigError(f"cannot save {odd[0]} as a plain model: merge adapters (merge_and_unload) and "
                          "dequantize first")
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items() if not k.endswith("inv_freq")}


def save_model_directory(model: nn.Module, tokenizer: Tokenizer, directory: str | os.PathLike, *,
                         dtype: torch.dtype | None = None, eos_token_ids: Iterable[int] | None = None) -> Path:
    """Write `model` (a native CausalLM, adapters merged) and its tokenizer as an HF-style checkpoint directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = model_state(model, dtype)
    _atomic_write(path / MODEL_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = model.config
    saved_dtype = dtype or next(iter(t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    hf = config.to_hf_dict() | {"torch_dtype": str(saved_dtype).removeprefix("torch.")}
    _atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
    tokenizer.save(path)
    eos = sorted(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    _atomic_write(path / "generation_config.json", lambda p: p.write_text(json.dumps(generation, indent=2) + "\n"))
    return path
