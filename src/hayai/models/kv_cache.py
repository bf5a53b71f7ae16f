"""A pre-allocated (static) key/value cache with per-row lengths.

Layout per layer: keys and values [B, H_kv, L_max, D]. Row b holds the keys of positions 0 .. lengths[b]-1 at the
slots with the same index, so the slot index IS the position. That makes three things cheap:

- rollback (speculative decoding rejected a draft): set the row's length back; stale slots are never visible
  because a query at position p only attends to slots <= p, and slot p is rewritten before it becomes visible;
- ragged batches (prompts of different lengths, requests joining a running batch): every row writes at its own
  positions; one boolean mask [B, 1, T, S] per forward pass says who sees what;
- prefix reuse (a cached system prompt or demonstrations): copy rows or slots, set lengths.

Lengths are kept on the host (a Python list), so choosing the fast path (one contiguous slice, no mask) costs no
device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hayai.errors import ContextOverflowError


@dataclass
class WritePlan:
    """Where one forward pass writes its T new tokens, computed once and shared by every layer."""

    positions: torch.Tensor  # [B, T] int64: slot (= default position) of each new token
    start: int | None  # shared first slot when every row writes the same contiguous range, else None
    extent: int  # keys to attend over: max position + 1
    mask: torch.Tensor | None  # bool [B, 1, T, S] (True = may attend), None when plain causal suffices
    causal: bool  # bottom-right causal over [0, extent) is exact for every row


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        # Zeros, not empty: masked-out slots still enter q·kᵀ and p·v, and uninitialised memory can hold NaN.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * batch_size
        self.max_length = max_length
        self._plan: WritePlan | None = None

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> KVCache:
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length,
                   config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---- planning a forward pass -----------------------------------------------------------------------------
    def plan(self, num_new: int) -> WritePlan:
        """Plan appending `num_new` tokens to every row, each after its own current length."""
        device = self.keys[0].device
        starts = self.lengths
        if max(starts) + num_new > self.max_length:
            raise ContextOverflowError(
                f"KV cache holds {self.max_length} positions; writing {num_new} more after "
                f"{max(starts)} would overflow it"
            )
        offsets = torch.arange(num_new, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + offsets  # [B, T] slot of each new token
        extent = max(starts) + num_new
        if all(s == starts[0] for s in starts):
            # Every row sees [0, start + j] for its j-th new token: bottom-right causal over the extent.
            plan = WritePlan(positions, starts[0], extent, mask=None, causal=True)
        else:
            slots = torch.arange(extent, device=device)
            mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
            plan = WritePlan(positions, None, extent, mask=mask, causal=False)
        self._plan = plan
        return plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values (k, v [B, H_kv, T, D]); return all visible ones [B, H_kv, S, D]."""
        plan = self._plan
        keys, values = self.keys[layer], self.values[layer]
        t = k.shape[2]
        if plan.start is not None:
            keys[:, :, plan.start:plan.start + t] = k
            values[:, :, plan.start:plan.start + t] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            # Advanced indexing keys[rows, :, positions] has shape [B, T, H_kv, D].
            keys[rows, :, plan.positions] = k.transpose(1, 2).to(keys.dtype)
            values[rows, :, plan.positions] = v.transpose(1, 2).to(values.dtype)
        return keys[:, :, :plan.extent], values[:, :, :plan.extent]

    def commit(self) -> None:
        """After the forward pass: each row's length becomes its last written position + 1."""
        plan = self._plan
        if plan.start is not None:
            new_len = plan.start + plan.positions.shape[1]
            self.lengths = [max(length, new_len) for length in self.lengths]
        else:
            last = plan.positions.max(dim=1).values.tolist()
            self.lengths = [max(length, p + 1) for length, p in zip(self.lengths, last, strict=True)]
        self._plan = None

    # ---- editing --------------------------------------------------------------------------------------------
    def truncate(self, lengths: list[int] | int) -> None:
        """Roll rows back to the given lengths (a rejected speculative draft, a right-padded prompt)."""
        if isinstance(lengths, int):
            lengths = [lengths] * self.batch_size
        for b, (old, new) in enumerate(zip(self.lengths, lengths, strict=True)):
            if new > old:
                raise ValueError(f"row {b}: cannot truncate to {new}, it holds only {old} positions")
        self.lengths = list(lengths)

    def move_slots(self, src: list[int], dst: int) -> None:
        """Copy the entries at slots `src` (every row and layer) to slots dst, dst+1, ... (lookahead decoding
        keeps the keys/values of a verified branch that was written further along). Lengths are unchanged."""
        if not src:
            return
        index = torch.tensor(src, device=self.keys[0].device)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[:, :, dst:dst + len(src)] = keys[:, :, index]  # the gather copies before the write
            values[:, :, dst:dst + len(src)] = values[:, :, index]

    def select_rows(self, rows: list[int]) -> KVCache:
        """A new cache holding only the given rows (in that order), e.g. to drop finished sequences."""
        picked = KVCache.__new__(KVCache)
        index = torch.tensor(rows, device=self.keys[0].device)
        picked.keys = [k.index_select(0, index) for k in self.keys]
        picked.values = [v.index_select(0, index) for v in self.values]
        picked.lengths = [self.lengths[r] for r in rows]
        picked.max_length = self.max_length
        picked._plan = None
        return picked

    def copy_prefix_from(self, other: KVCache, length: int, src_row: int = 0, dst_row: int | None = None) -> None:
        """Copy the first `length` positions of `other`'s row into this cache's row(s) (prefix reuse)."""
        rows = range(self.batch_size) if dst_row is None else [dst_row]
        for layer in range(len(self.keys)):
            for b in rows:
                self.keys[layer][b, :, :length] = other.keys[layer][src_row, :, :length]
                self.values[layer][b, :, :length] = other.values[layer][src_row, :, :length]
        for b in rows:
            self.lengths[b] = length
