"""hayai.peft: adapters as module replacements, in PEFT's file format.

- `lora.py`        LoRALinear / LoRAEmbedding  (y = base(x) + s·B·A·x)
- `ia3.py`         IA3Linear                   (output or input scaling by a learned vector)
- `targets.py`     PEFT's rules for which modules get an adapter
- `inject.py`      apply_lora / apply_ia3, merge_and_unload, unload, adapters_disabled, parameter summary
- `adapter.py`     Adapter (config + tensors), adapter_from_model, apply_adapter
- `peft_format.py` save_adapter / load_adapter (adapter_config.json + adapter_model.safetensors)
- `merge.py`       combine_lora ("cat", "linear", "svd"), combine_ia3
- `ensemble.py`    PEWE: softmax(s/T)-weighted average of source adapters as an initialisation
"""

from hayai.peft.adapter import (
    Adapter,
    adapter_from_model,
    applied_adapter,
    apply_adapter,
    set_adapter_weights,
)
from hayai.peft.config import IA3Config, LoraConfig
from hayai.peft.ensemble import PeweResult, ensemble_adapters, loss_scores, pewe_init, pewe_weights
from hayai.peft.ia3 import IA3Linear
from hayai.peft.inject import (
    ParameterSummary,
    adapter_layers,
    adapters_disabled,
    apply_ia3,
    apply_lora,
    merge_adapters,
    merge_and_unload,
    set_trainable,
    trainable_parameters_summary,
    unload,
    unmerge_adapters,
)
from hayai.peft.lora import LoRAEmbedding, LoRALinear
from hayai.peft.merge import combine_ia3, combine_lora
from hayai.peft.peft_format import load_adapter, read_adapter, save_adapter, write_adapter

__all__ = [
    "Adapter",
    "IA3Config",
    "IA3Linear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraConfig",
    "ParameterSummary",
    "PeweResult",
    "adapter_from_model",
    "adapter_layers",
    "adapters_disabled",
    "applied_adapter",
    "apply_adapter",
    "apply_ia3",
    "apply_lora",
    "combine_ia3",
    "combine_lora",
    "ensemble_adapters",
    "load_adapter",
    "loss_scores",
    "merge_adapters",
    "merge_and_unload",
    "pewe_init",
    "pewe_weights",
    "read_adapter",
    "save_adapter",
    "set_adapter_weights",
    "set_trainable",
    "trainable_parameters_summary",
    "unload",
    "unmerge_adapters",
    "write_adapter",
]
