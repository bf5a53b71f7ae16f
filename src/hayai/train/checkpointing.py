"""Activation (gradient) checkpointing, one block at a time, as a module replacement.

Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016 (arXiv:1604.06174). Backpropagation keeps
every intermediate tensor a layer saves for its backward; for a decoder block that is about a dozen
[tokens, hidden]-sized tensors plus the MLP's [tokens, intermediate] ones. Wrapping each block in
`CheckpointedBlock` keeps only the block's *input* during the forward pass and recomputes the block's forward
when backward reaches it, so activation memory drops from L · (block activations) to
L · (one hidden state) + (one block's activations), for about one extra forward pass of compute.

PyTorch's non-reentrant `torch.utils.checkpoint` is used: it gives gradients to the frozen-input/LoRA case
without `inputs.requires_grad_()` tricks (PEFT's `enable_input_require_grads`), supports `retain_graph` (LOMO's
two-pass gradient clipping) and restores the RNG state, so dropout draws the same mask when recomputed.
The gradients are identical to the unwrapped model's.

The wrapper adds one level to module names (`layers.0.checkpointed_block.self_attn...`); use
`activation_checkpointing_removed(model)` around anything that reads names (saving adapters, state dicts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

WRAPPED = "checkpointed_block"


class CheckpointedBlock(nn.Module):
    """Runs `checkpointed_block` under activation checkpointing while training with gradients enabled, and
    plainly otherwise (evaluation, generation with a KV cache)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.checkpointed_block = block

    def forward(self, *args, **kwargs):
        block = self.checkpointed_block
        if self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists holding the repeated blocks (a model's `layers` / `h` / `blocks`)."""
    lists = [m for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    return lists


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block of `model`'s layer lists in `CheckpointedBlock` (in place); returns how many were wrapped.

    Blocks already wrapped are left alone, so calling it twice is harmless."""
    count = 0
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            if not isinstance(block, CheckpointedBlock):
                blocks[i] = CheckpointedBlock(block)
                count += 1
    return count


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo `apply_activation_checkpointing`; returns how many blocks were unwrapped."""
    count = 0
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            if isinstance(block, CheckpointedBlock):
                blocks[i] = block.checkpointed_block
                count += 1
    return count


def is_checkpointed(model: nn.Module) -> bool:
    return any(isinstance(m, CheckpointedBlock) for m in model.modules())


@contextmanager
def activation_checkpointing_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model has its original module names; the wrappers come back afterwards."""
    removed = remove_activation_checkpointing(model)
    try:
        yield model
    finally:
        if removed:
            apply_activation_checkpointing(model)
