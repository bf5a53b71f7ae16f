"""hayai (速い): cheaper fine-tuning and faster generation for language models on modest hardware."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hayai.api import LLM
    from hayai.finetuning import FinetuneResult


def load(name_or_path: str | None = None, **kwargs: Any) -> LLM:
    """Load a model by store name, registry name, HF checkpoint directory or .gguf file. See `hayai.api.load`."""
    from hayai.api import load as _load

    return _load(name_or_path, **kwargs)


def finetune(model: str | None = None, data: str | None = None, **kwargs: Any) -> FinetuneResult:
    """Fine-tune a model on a JSONL file (LoRA, QLoRA, (IA)³, full, LOMO, AdaLomo). See `hayai.finetuning.finetune`."""
    from hayai.finetuning import finetune as _finetune

    return _finetune(model, data, **kwargs)


__all__ = ["__version__", "finetune", "load"]
