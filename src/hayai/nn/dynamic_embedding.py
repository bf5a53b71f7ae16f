"""Dynamic embeddings: an embedding table keyed by arbitrary int64 ids, grown on demand, bounded by eviction.

As in TensorFlow Recommenders-Addons' `dynamic_embedding` (hash-table backed, no vocabulary size, restrict
policies that drop the least frequent or least recently seen keys and shrink the optimizer slots with them)
and TorchRec's managed-collision modules (frequency-threshold admission, LRU/LFU eviction that reports the
slots to re-initialise). See the TensorFlow blog post "Training a recommendation model with dynamic
embeddings" (2023) and `torchrec/modules/mc_modules.py`.

The table maps an id to a row:

    row(id) = the id's own row            if id is resident
            = row 0 (shared default row)   otherwise (not yet admitted, or looked up in eval mode)

In training, each lookup counts the ids. An unseen id becomes a candidate; once it has been seen
`admit_after` times (counting the current batch) it is admitted and gets a fresh row (values drawn from
N(0, init_std²), optimizer state zero). When the table holds `capacity` ids, admitting evicts the resident ids
with the lowest score, never one used since the last optimizer step:

    LRU: score = last step the id was looked up        LFU: score = (times looked up, last step)

ties broken by the smaller id. Rows of the current batch, and rows whose gradients are pending (looked up
since the last `apply_gradients`/`discard_gradients`), are never evicted. An evicted id loses its row, its
statistics and its optimizer state; if it comes back it starts again as a candidate and, once admitted, gets a
fresh row. Rows never move, so a resident id keeps its row (and its optimizer state stays aligned with it).

Training. The table's rows are not `nn.Parameter`s (they come and go); lookups record the rows they touched
and `apply_gradients()` (after `loss.backward()`) updates exactly those rows with a row-wise optimizer whose
state lives in the table: `RowAdam` (per-row step counts for bias correction, so a fresh row starts like a
fresh Adam), `RowAdagrad`, or `RowSGD`. Storage grows by doubling up to capacity + 1 rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hayai.errors import ConfigError, CorruptFileError

FREE = -1  # key of an unused row
DEFAULT_ROW = 0


# ---- row-wise optimizers ---------------------------------------------------------------------------------------
@dataclass
class RowSGD:
    """w ← w − lr·g (plus L2 weight decay)."""

    lr: float = 0.01
    weight_decay: float = 0.0
    slots: ClassVar[tuple[str, ...]] = ()
    slot_init: ClassVar[dict[str, float]] = {}

    def update(self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], steps: torch.Tensor
               ) -> torch.Tensor:
        if self.weight_decay:
            g = g + self.weight_decay * w
        return w - self.lr * g


@dataclass
class RowAdagrad:
    """torch.optim.Adagrad per row: s ← s + g², w ← w − lr·g / (√s + eps)."""

    lr: float = 0.01
    eps: float = 1e-10
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    slots: ClassVar[tuple[str, ...]] = ("sum",)

    @property
    def slot_init(self) -> dict[str, float]:
        return {"sum": self.initial_accumulator_value}

    def update(self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], steps: torch.Tensor
               ) -> torch.Tensor:
        if self.weight_decay:
            g = g + self.weight_decay * w
        state["sum"].addcmul_(g, g)
        return w - self.lr * g / (state["sum"].sqrt() + self.eps)


@dataclass
class RowAdam:
    """torch.optim.Adam per row, with the bias correction of each row's own step count t:
    m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g², w ← w − lr·(m / (1−β1^t)) / (√(v / (1−β2^t)) + eps)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    slot_init: ClassVar[dict[str, float]] = {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def update(self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], steps: torch.Tensor
               ) -> torch.Tensor:
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * w
        m = state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        v = state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        t = steps.to(w.dtype)[:, None]  # [n, 1]
        step_size = self.lr / (1 - b1**t)
        denom = (v.sqrt() / (1 - b2**t).sqrt()) + self.eps
        return w - step_size * m / denom


RowOptimizer = RowSGD | RowAdagrad | RowAdam
_OPTIMIZERS: dict[str, type] = {"sgd": RowSGD, "adagrad": RowAdagrad, "adam": RowAdam}


# ---- the table -------------------------------------------------------------------------------------------------
class DynamicEmbedding(nn.Module):
    """ids (int64, any shape) -> embeddings [*ids.shape, embedding_dim]; see the module docstring."""

    def __init__(self, embedding_dim: int, capacity: int, *, admit_after: int = 1, eviction: str = "lru",
                 optimizer: RowOptimizer | None = None, init_std: float = 0.01, max_candidates: int | None = None,
                 initial_rows: int = 1024, seed: int = 0):
        super().__init__()
        if capacity < 1 or embedding_dim < 1:
            raise ConfigError(f"dynamic embedding needs capacity >= 1 and dim >= 1, got {capacity}, {embedding_dim}")
        if eviction not in ("lru", "lfu"):
            raise ConfigError(f"eviction policy {eviction!r}: expected 'lru' or 'lfu'")
        if admit_after < 1:
            raise ConfigError(f"admit_after must be >= 1, got {admit_after}")
        self.embedding_dim, self.capacity = embedding_dim, capacity
        self.admit_after, self.eviction, self.init_std = admit_after, eviction, init_std
        self.optimizer: RowOptimizer = optimizer if optimizer is not None else RowAdam()
        self.max_candidates = max_candidates if max_candidates is not None else 4 * capacity
        self._generator = torch.Generator().manual_seed(seed)
        self.clock = 0  # training lookups so far
        self.evictions = 0
        self._allocate(min(capacity + 1, max(2, initial_rows)))
        self._keys = torch.zeros(0, dtype=torch.long)  # [n] sorted resident ids
        self._key_rows = torch.zeros(0, dtype=torch.long)  # [n] their rows
        self._cand_keys = torch.zeros(0, dtype=torch.long)  # [c] sorted candidate ids
        self._cand_counts = torch.zeros(0, dtype=torch.long)  # [c] times seen
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, leaf) per lookup since the last step
        self._reset_rows(torch.tensor([DEFAULT_ROW]))
        self._values[DEFAULT_ROW].zero_()

    # -- storage ---------------------------------------------------------------------------------------------
    def _allocate(self, rows: int) -> None:
        d = self.embedding_dim
        self._values = torch.zeros(rows, d)
        self._slots = {name: torch.zeros(rows, d) for name in self.optimizer.slots}
        self._row_steps = torch.zeros(rows, dtype=torch.long)
        self._row_key = torch.full((rows,), FREE, dtype=torch.long)
        self._row_last = torch.zeros(rows, dtype=torch.long)
        self._row_count = torch.zeros(rows, dtype=torch.long)
        self._protected = torch.zeros(rows, dtype=torch.bool)

    def _grow(self, needed: int) -> None:
        """Make room for `needed` rows in total (amortised doubling, never beyond capacity + 1)."""
        old = self._values.shape[0]
        if needed <= old:
            return
        new = min(self.capacity + 1, max(needed, 2 * old))
        grown = {name: getattr(self, name) for name in ("_values", "_row_steps", "_row_key", "_row_last",
                                                         "_row_count", "_protected")}
        slots = self._slots
        self._allocate(new)
        for name, tensor in grown.items():
            getattr(self, name)[:old] = tensor
        for name, tensor in slots.items():
            self._slots[name][:old] = tensor

    def _reset_rows(self, rows: torch.Tensor) -> None:
        """Fresh values, zero optimizer state and statistics for `rows`."""
        n = rows.numel()
        self._values[rows] = torch.randn(n, self.embedding_dim, generator=self._generator) * self.init_std
        for name in self.optimizer.slots:
            self._slots[name][rows] = float(self.optimizer.slot_init[name])
        self._row_steps[rows] = 0
        self._row_last[rows] = 0
        self._row_count[rows] = 0

    # -- lookups ---------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Resident ids."""
        return int(self._keys.numel())

    def resident_ids(self) -> torch.Tensor:
        return self._keys.clone()

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of every id (DEFAULT_ROW for ids that are not resident); changes nothing."""
        flat = ids.reshape(-1).to(torch.long).cpu()
        if self._keys.numel() == 0:
            return torch.zeros_like(flat).view(ids.shape)
        idx = torch.searchsorted(self._keys, flat).clamp(max=self._keys.numel() - 1)
        found = self._keys[idx] == flat
        return torch.where(found, self._key_rows[idx], DEFAULT_ROW).view(ids.shape)

    def lookup_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for `ids`; in training mode this also counts the ids, admits and evicts."""
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError(f"dynamic embedding ids must be integers, got {ids.dtype}")
        if not self.training:
            return self.rows_of(ids)
        flat = ids.reshape(-1).to(torch.long).cpu()
        uniq, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        self.clock += 1
        rows_u = self.rows_of(uniq)
        found = rows_u != DEFAULT_ROW
        hit = rows_u[found]
        self._row_last[hit] = self.clock
        self._row_count[hit] += counts[found]
        new_rows = self._admit(uniq[~found], counts[~found], busy=hit)
        rows_u[~found] = new_rows
        return rows_u[inverse].view(ids.shape)

    def _admit(self, ids: torch.Tensor, counts: torch.Tensor, busy: torch.Tensor) -> torch.Tensor:
        """Count unseen ids, admit those over the threshold; their rows (DEFAULT_ROW if not admitted)."""
        rows = torch.full_like(ids, DEFAULT_ROW)
        if ids.numel() == 0:
            return rows
        total = counts.clone()
        if self._cand_keys.numel():
            idx = torch.searchsorted(self._cand_keys, ids).clamp(max=self._cand_keys.numel() - 1)
            known = self._cand_keys[idx] == ids
            total[known] += self._cand_counts[idx[known]]
        eligible = torch.nonzero(total >= self.admit_after).squeeze(1)
        # the most frequent first, then the smaller id, if not all fit
        order = eligible[torch.sort(ids[eligible], stable=True).indices]
        order = order[torch.sort(-total[order], stable=True).indices]
        granted = self._free_rows(order.numel(), busy)
        admitted = order[: granted.numel()]
        rows[admitted] = granted
        self._row_key[granted] = ids[admitted]
        self._row_last[granted] = self.clock
        self._row_count[granted] = total[admitted]
        self._insert_keys(ids[admitted], granted)
        waiting = torch.ones_like(ids, dtype=torch.bool)
        waiting[admitted] = False
        self._update_candidates(ids, total, waiting)
        return rows

    def _free_rows(self, wanted: int, busy: torch.Tensor) -> torch.Tensor:
        """Up to `wanted` fresh rows: unused ones first, then by growing, then by evicting (never `busy` rows)."""
        if wanted == 0:
            return torch.zeros(0, dtype=torch.long)
        self._grow(min(self.capacity, self.size + wanted) + 1)
        free = torch.nonzero(self._row_key == FREE).squeeze(1)
        free = free[free != DEFAULT_ROW][:wanted]
        if free.numel() < wanted:
            free = torch.cat([free, self._evict(wanted - free.numel(), busy)])
        self._reset_rows(free)
        return free

    def _evict(self, wanted: int, busy: torch.Tensor) -> torch.Tensor:
        """Evict up to `wanted` resident ids of lowest score; never rows of this batch (`busy`) or rows with a
        gradient pending since the last step. Returns their rows."""
        rows = self._key_rows  # in key order, so a stable sort by score breaks ties by the smaller id
        held = self._protected.clone()
        held[busy] = True
        rows = rows[~held[rows]]
        if self.eviction == "lru":
            score = self._row_last[rows].double()
        else:
            score = self._row_count[rows].double() * (self.clock + 1) + self._row_last[rows].double()
        victims = rows[torch.sort(score, stable=True).indices[:wanted]]
        gone = torch.isin(self._key_rows, victims)
        self._keys, self._key_rows = self._keys[~gone], self._key_rows[~gone]
        self._row_key[victims] = FREE
        self.evictions += victims.numel()
        return victims

    def _insert_keys(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        keys = torch.cat([self._keys, ids])
        order = torch.argsort(keys)
        self._keys, self._key_rows = keys[order], torch.cat([self._key_rows, rows])[order]

    def _update_candidates(self, ids: torch.Tensor, total: torch.Tensor, waiting: torch.Tensor) -> None:
        """Candidates: drop the ones just admitted or re-counted, add the waiting ones, keep the most frequent."""
        if self.admit_after == 1:
            return
        keep = ~torch.isin(self._cand_keys, ids)
        keys = torch.cat([self._cand_keys[keep], ids[waiting]])
        counts = torch.cat([self._cand_counts[keep], total[waiting]])
        if keys.numel() > self.max_candidates:
            top = torch.sort(-counts, stable=True).indices[: self.max_candidates]
            keys, counts = keys[top], counts[top]
        order = torch.argsort(keys)
        self._cand_keys, self._cand_counts = keys[order], counts[order]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.lookup_rows(ids)
        if not torch.is_grad_enabled():
            return self._values[rows].to(ids.device)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        leaf = self._values[uniq].clone().requires_grad_(True)  # [U, dim]; its .grad feeds apply_gradients
        self._pending.append((uniq, leaf))
        self._protected[uniq] = True
        return leaf[inverse.view(-1)].view(*ids.shape, self.embedding_dim).to(ids.device)

    # -- training --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_gradients(self) -> int:
        """Update every row that received a gradient since the last call; returns how many rows."""
        parts = [(rows, leaf.grad) for rows, leaf in self._pending if leaf.grad is not None]
        self._pending.clear()
        self._protected.zero_()
        if not parts:
            return 0
        rows = torch.cat([r for r, _ in parts])
        grads = torch.cat([g.cpu() for _, g in parts])
        uniq, inverse = torch.unique(rows, return_inverse=True)
        grad = torch.zeros(uniq.numel(), self.embedding_dim, dtype=grads.dtype).index_add_(0, inverse, grads)
        self._row_steps[uniq] += 1
        state = {name: self._slots[name][uniq] for name in self.optimizer.slots}
        self._values[uniq] = self.optimizer.update(self._values[uniq], grad, state, self._row_steps[uniq])
        for name, value in state.items():
            self._slots[name][uniq] = value
        return int(uniq.numel())

    def discard_gradients(self) -> None:
        """Forget the lookups since the last `apply_gradients` without updating."""
        self._pending.clear()
        self._protected.zero_()

    def optimizer_state(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optimizer slots ([*ids, dim]) and steps of the given ids' rows (the default row's for non-resident)."""
        rows = self.rows_of(ids)
        out = {name: self._slots[name][rows] for name in self.optimizer.slots}
        out["steps"] = self._row_steps[rows]
        return out

    def memory_bytes(self) -> int:
        """Bytes of everything the table holds: rows, optimizer slots, keys, statistics, candidates."""
        tensors = [self._values, *self._slots.values(), self._row_steps, self._row_key, self._row_last,
                   self._row_count, self._protected, self._keys, self._key_rows, self._cand_keys, self._cand_counts]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- saving ----------------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        opt = self.optimizer
        opt_name = next(k for k, v in _OPTIMIZERS.items() if isinstance(opt, v))
        return {"embedding_dim": self.embedding_dim, "capacity": self.capacity, "admit_after": self.admit_after,
                "eviction": self.eviction, "init_std": self.init_std, "max_candidates": self.max_candidates,
                "optimizer": opt_name, "optimizer_args": asdict(opt), "clock": self.clock,
                "evictions": self.evictions}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"values": self._values, "row_steps": self._row_steps, "row_key": self._row_key,
               "row_last": self._row_last, "row_count": self._row_count, "keys": self._keys,
               "key_rows": self._key_rows, "cand_keys": self._cand_keys, "cand_counts": self._cand_counts,
               "generator": self._generator.get_state()}
        out.update({f"slot.{name}": t for name, t in self._slots.items()})
        return {k: v.contiguous() for k, v in out.items()}

    def _restore(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        for key in ("embedding_dim", "capacity", "eviction", "admit_after"):
            if config.get(key) != getattr(self, key):
                raise CorruptFileError(f"{where}: saved {key}={config.get(key)!r}, this table has "
                                       f"{getattr(self, key)!r}")
        names = ["values", "row_steps", "row_key", "row_last", "row_count", "keys", "key_rows", "cand_keys",
                 "cand_counts", "generator", *(f"slot.{s}" for s in self.optimizer.slots)]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CorruptFileError(f"{where}: missing dynamic-embedding tensors {', '.join(missing)}")
        rows = tensors["values"].shape[0]
        self._allocate(rows)
        self._values.copy_(tensors["values"])
        for name in ("row_steps", "row_key", "row_last", "row_count"):
            getattr(self, f"_{name}").copy_(tensors[name])
        for name in self.optimizer.slots:
            self._slots[name].copy_(tensors[f"slot.{name}"])
        self._keys, self._key_rows = tensors["keys"].clone(), tensors["key_rows"].clone()
        self._cand_keys, self._cand_counts = tensors["cand_keys"].clone(), tensors["cand_counts"].clone()
        self._generator.set_state(tensors["generator"].clone())
        self.clock, self.evictions = int(config["clock"]), int(config["evictions"])
        self._pending.clear()

    def get_extra_state(self) -> dict[str, Any]:
        """Everything, for `state_dict()` / `torch.save` of a model that contains the table."""
        return {"config": self._config(), "tensors": {k: v.clone() for k, v in self._tensors().items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._restore(state["config"], state["tensors"], "state_dict")

    def save(self, path: str | Path) -> None:
        """Write the table (rows, optimizer state, statistics, config) as one safetensors file."""
        save_file(self._tensors(), str(path), metadata={"hayai.dynamic_embedding": json.dumps(self._config())})

    @classmethod
    def load(cls, path: str | Path) -> DynamicEmbedding:
        """A table exactly as `save` wrote it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as exc:
            raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
        if "hayai.dynamic_embedding" not in meta:
            raise CorruptFileError(f"{path}: no hayai.dynamic_embedding metadata (not a saved dynamic embedding)")
        config = json.loads(meta["hayai.dynamic_embedding"])
        opt_args = dict(config["optimizer_args"])
        if "betas" in opt_args:
            opt_args["betas"] = tuple(opt_args["betas"])
        table = cls(config["embedding_dim"], config["capacity"], admit_after=config["admit_after"],
                    eviction=config["eviction"], optimizer=_OPTIMIZERS[config["optimizer"]](**opt_args),
                    init_std=config["init_std"], max_candidates=config["max_candidates"], initial_rows=2)
        table._restore(config, tensors, str(path))
        return table

    def extra_repr(self) -> str:
        return (f"dim={self.embedding_dim}, capacity={self.capacity}, resident={self.size}, "
                f"admit_after={self.admit_after}, eviction={self.eviction}, "
                f"optimizer={type(self.optimizer).__name__}")


def hashed_memory_bytes(num_buckets: int, dim: int, slots: int = 0) -> int:
    """Bytes of a fixed nn.Embedding table with `slots` optimizer tensors of the same size (a baseline)."""
    return num_buckets * dim * 4 * (1 + slots)
