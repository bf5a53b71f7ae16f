"""hayai.nn: compact and dynamic layers to drop into any PyTorch model.

- `padnet.py`            PAD-Net: PartiallyDynamicConv2d / PartiallyDynamicMoE, Iterative Mode Partition
- `skim.py`              LSTM-Jump: read R tokens, jump up to K, at most N jumps; REINFORCE training loss
- `dynamic_embedding.py` DynamicEmbedding: int64-keyed growing table, admission filter, LRU/LFU eviction,
                         row-wise optimizers whose state follows the rows, save/load
"""

from hayai.nn.dynamic_embedding import DynamicEmbedding, RowAdagrad, RowAdam, RowSGD
from hayai.nn.padnet import (
    KernelAttention,
    ParameterCounts,
    PartiallyDynamicConv2d,
    PartiallyDynamicMoE,
    PartitionReport,
    iterative_mode_partition,
    mode_scores,
    moe_aux_loss,
    parameter_counts,
    ratio_schedule,
    set_temperature,
)
from hayai.nn.skim import LSTMJump, SkimLoss, SkimOutput, skim_loss

__all__ = [
    "DynamicEmbedding",
    "KernelAttention",
    "LSTMJump",
    "ParameterCounts",
    "PartiallyDynamicConv2d",
    "PartiallyDynamicMoE",
    "PartitionReport",
    "RowAdagrad",
    "RowAdam",
    "RowSGD",
    "SkimLoss",
    "SkimOutput",
    "iterative_mode_partition",
    "mode_scores",
    "moe_aux_loss",
    "parameter_counts",
    "ratio_schedule",
    "set_temperature",
    "skim_loss",
]
