"""hayai.train: the trainer and what it is made of, one technique per file.

- `data.py`           JSONL records (chat / instruction / completion / text), prompt masking, packing, batches
- `loss.py`           chunked cross-entropy that never holds the whole batch's full-vocabulary logits
- `checkpointing.py`  activation checkpointing per block, as a module wrapper
- `schedule.py`       linear warm-up, then cosine / linear / constant learning rate
- `optim.py`          the update-rule interface; AdamW with token-normalised accumulation and clipping
- `lomo.py`           LOMO and AdaLomo: the update fused into backward
- `memory.py`         the pre-training memory estimate (measured activations) and the refusal
- `trainer.py`        the loop: autocast, evaluation, logging, atomic checkpoints, exact resume
- `export.py`         writing a full model directory
- `report.py`         the loss-curve PNG
"""

from hayai.train.checkpointing import (
    CheckpointedBlock,
    activation_checkpointing_removed,
    apply_activation_checkpointing,
    remove_activation_checkpointing,
)
from hayai.train.data import (
    IGNORE_INDEX,
    Batch,
    DataLoader,
    Record,
    TokenizedExample,
    collate,
    pack,
    read_jsonl,
    tokenize_record,
    tokenize_records,
)
from hayai.train.lomo import AdaLomo, FusedUpdate, Lomo
from hayai.train.loss import CausalLMLoss, ChunkedCrossEntropy, FullCrossEntropy
from hayai.train.memory import MemoryBudgetError, MemoryEstimate, check_fits, estimate_memory, probe_activations
from hayai.train.optim import OptimizerUpdate, UpdateRule
from hayai.train.schedule import LRSchedule
from hayai.train.trainer import Trainer, TrainEvent, TrainResult, latest_checkpoint

__all__ = [
    "IGNORE_INDEX",
    "AdaLomo",
    "Batch",
    "CausalLMLoss",
    "CheckpointedBlock",
    "ChunkedCrossEntropy",
    "DataLoader",
    "FullCrossEntropy",
    "FusedUpdate",
    "LRSchedule",
    "Lomo",
    "MemoryBudgetError",
    "MemoryEstimate",
    "OptimizerUpdate",
    "Record",
    "TokenizedExample",
    "TrainEvent",
    "TrainResult",
    "Trainer",
    "UpdateRule",
    "activation_checkpointing_removed",
    "apply_activation_checkpointing",
    "check_fits",
    "collate",
    "estimate_memory",
    "latest_checkpoint",
    "pack",
    "probe_activations",
    "read_jsonl",
    "remove_activation_checkpointing",
    "tokenize_record",
    "tokenize_records",
]
