"""How much memory a training run will need, measured before it starts, and a clear refusal when it won't fit.

Peak memory of a training step ≈ what the process holds now (weights, data, runtime)
                                + gradients + optimizer state + saved activations + backward working set.

Parameters, gradients and optimizer state follow from the trainable tensors and the update rule (AdamW: two
fp32 moments per trainable value; LOMO: one parameter's gradient at a time, no state; AdaLomo: row and column
second moments). Activations are not guessed from a formula: `probe_activations` runs one forward pass of one
sequence of the training length under `torch.autograd.graph.saved_tensors_hooks` and adds up the bytes of every
distinct storage autograd saves for backward (parameters excluded), block by block. The batch needs `batch_size`
times that; with activation checkpointing only each block's input is kept, plus one block's activations while
it is recomputed (Chen et al. 2016, arXiv:1604.06174).

Resident memory exceeds live tensor bytes by the allocator's slack. On CPU, glibc serves most activation-sized
tensors from its heap (its mmap threshold adapts upwards to 32 MB) and cannot return the holes that
short-lived temporaries leave between saved activations: measured on SmolLM2-135M, a forward pass grows the
RSS by about 1.75x the bytes it saves (exactly 1x with `MALLOC_MMAP_THRESHOLD_=1048576`, at ~30% lower speed;
jemalloc or tcmalloc also avoid it). The estimate adds `CPU_ALLOCATOR_SLACK` x (activations + working set) on
CPU and `CUDA_ALLOCATOR_SLACK` x on CUDA (the caching allocator's rounding and fragmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.runtime import current_rss_bytes

GB = 1024**3
CPU_ALLOCATOR_SLACK = 0.75
CUDA_ALLOCATOR_SLACK = 0.1


class MemoryBudgetError(ConfigError):
    """The estimated peak memory of a training run exceeds the budget."""


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class ActivationProbe:
    """Bytes autograd saves for one sequence of `tokens` tokens."""

    tokens: int
    total: int  # everything saved for backward (blocks, embeddings, head, loss)
    blocks: list[int]  # saved inside each block
    block_input: int  # one block's input hidden state (what checkpointing keeps per block)

    def activations(self, batch_size: int, checkpointing: bool) -> int:
        if not checkpointing or not self.blocks:
            return batch_size * self.total
        outside = self.total - sum(self.blocks)
        return batch_size * (outside + len(self.blocks) * self.block_input)

    def working_set(self, batch_size: int, checkpointing: bool) -> int:
        """Transient memory in backward: one block's activations (recomputed when checkpointing) and their
        gradients."""
        largest = max(self.blocks, default=0)
        return batch_size * largest * (2 if checkpointing else 1)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def probe_activations(model: nn.Module, run: Callable[[], torch.Tensor], blocks: list[nn.Module]) -> ActivationProbe:
    """Run `run()` (one forward pass to the loss) and count the bytes saved for backward, per block in
    `blocks`; parameters, buffers and tensors already counted are skipped. The graph is freed afterwards."""
    known = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    counter = {"bytes": 0, "tokens": 0, "block_input": 0}
    per_block: list[int] = []
    marks: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr not in known and ptr not in seen and t.device.type != "meta":
            seen.add(ptr)
            counter["bytes"] += nbytes
        # Keep the storage alive (so a freed pointer is not reused and missed) but never the tensor itself:
        # a saved *output* returned as is would reference its own grad_fn, a cycle that leaks the whole graph.
        return t.detach()

    def before(module: nn.Module, args: tuple) -> None:
        marks.append(counter["bytes"])
        if args and isinstance(args[0], torch.Tensor) and not counter["block_input"]:
            x = args[0]
            counter["block_input"] = x.numel() * x.element_size()
            counter["tokens"] = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]

    def after(module: nn.Module, args: tuple, output: object) -> None:
        per_block.append(counter["bytes"] - marks.pop())

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(before), b.register_forward_hook(after))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run()
        del loss
    finally:
        for handle in handles:
            handle.remove()
    return ActivationProbe(counter["tokens"], counter["bytes"], per_block, counter["block_input"])


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so a probe's
    temporary tensors do not stay in the process's resident memory."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        ptr, nbytes = _storage_key(t)
        if ptr not in seen:
            seen.add(ptr)
            total += nbytes
    return total


def trainable_bytes(model: nn.Module, dtype_size: int | None = None) -> int:
    """Bytes of the trainable parameters (in their dtype, or `dtype_size` bytes per value)."""
    return sum(p.numel() * (dtype_size or p.element_size()) for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(model: nn.Module, rule: str) -> tuple[int, int]:
    """(gradient bytes alive at the peak, optimizer state bytes) for `rule` in adamw | lomo | adalomo."""
    params = [p for p in model.parameters() if p.requires_grad]
    if rule == "adamw":
        return sum(p.numel() * p.element_size() for p in params), sum(2 * 4 * p.numel() for p in params)
    largest = max((p.numel() * 4 for p in params), default=0)  # one fp32 gradient (+ its fp32 update)
    if rule == "lomo":
        return 2 * largest, 0
    if rule == "adalomo":
        state = sum(4 * (p.shape[:-1].numel() + p.shape[:-2].numel() * p.shape[-1]) if p.dim() >= 2
                    else 4 * p.numel() for p in params)  # row + column moments, or a full vector
        return 3 * largest, state
    raise ConfigError(f"unknown update rule {rule!r}")


@dataclass
class MemoryEstimate:
    """The parts of the estimated peak, in bytes."""

    current: int  # process memory now (weights, data, runtime)
    weights: int  # of which model parameters and buffers
    gradients: int
    optimizer: int
    activations: int
    working: int  # backward working set and loss chunk
    slack: int  # allocator overhead over live bytes
    batch_size: int
    seq_len: int
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def additional(self) -> int:
        return self.gradients + self.optimizer + self.activations + self.working + self.slack

    @property
    def total(self) -> int:
        return self.current + self.additional

    def lines(self) -> list[tuple[str, int]]:
        return [("now (model weights, data, runtime)", self.current), ("  of which weights", self.weights),
                ("gradients", self.gradients), ("optimizer state", self.optimizer),
                (f"activations ({self.batch_size} x {self.seq_len} tokens"
                 f"{', checkpointed' if self.checkpointing else ''})", self.activations),
                ("backward working set", self.working), ("allocator slack", self.slack),
                ("estimated peak", self.total)]

    def summary(self) -> str:
        return "; ".join(f"{name.strip()} {fmt_bytes(value)}" for name, value in self.lines())


def estimate_memory(model: nn.Module, probe: ActivationProbe, *, rule: str, batch_size: int, seq_len: int,
                    checkpointing: bool, vocab_size: int, chunk_tokens: int, current: int | None = None,
                    slack: float | None = None) -> MemoryEstimate:
    """Combine a probe (one sequence of `seq_len` tokens) with the update rule's needs into an estimate.
    `slack` defaults to the allocator slack of the model's device."""
    gradients, optimizer = optimizer_state_bytes(model, rule)
    scale = seq_len / max(1, probe.tokens)
    activations = int(probe.activations(batch_size, checkpointing) * scale)
    loss_chunk = 3 * 4 * vocab_size * min(chunk_tokens, batch_size * seq_len)  # logits, softmax, casts
    working = int(probe.working_set(batch_size, checkpointing) * scale) + loss_chunk
    if slack is None:
        on_cuda = next(model.parameters()).device.type == "cuda"
        slack = CUDA_ALLOCATOR_SLACK if on_cuda else CPU_ALLOCATOR_SLACK
    weights = parameter_bytes(model)
    current = current_rss_bytes() if current is None else current
    # Weights read from a memory-mapped file can be partly non-resident now; training will touch them all.
    return MemoryEstimate(current=max(current, weights), weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=activations, working=working, slack=int(slack * (activations + working)),
                          batch_size=batch_size, seq_len=seq_len,
                          checkpointing=checkpointing)


def available_memory_bytes(device: torch.device) -> int:
    """What this process could still use: free device memory on CUDA, available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:  # psutil missing: assume nothing is known, never refuse
        return 1 << 62


def default_budget(device: torch.device) -> int:
    """The peak this process may reach: what it holds now plus what is available."""
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()
    return held + available_memory_bytes(device)


def check_fits(estimate: MemoryEstimate, budget: int, device: torch.device | None = None) -> None:
    """Raise MemoryBudgetError, naming the parts and what would help, when the estimate exceeds `budget`."""
    if estimate.total <= budget:
        return
    hints = []
    if not estimate.checkpointing:
        hints.append("turn on activation checkpointing (--gradient-checkpointing)")
    if estimate.batch_size > 1:
        hints.append("lower --batch-size and raise --grad-accum to keep the effective batch")
    hints.append("shorten --seq-len")
    if estimate.optimizer > estimate.activations:
        hints.append("use --method lora, qlora or lomo (no full optimizer state)")
    raise MemoryBudgetError(
        f"training would need about {fmt_bytes(estimate.total)} but the budget is {fmt_bytes(budget)} "
        f"({estimate.summary()}). To fit: {'; '.join(hints)}."
    )
