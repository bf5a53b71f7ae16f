"""The training loop: accumulation, autocast, evaluation, logging, atomic checkpoints and exact resume.

One optimizer step (see `hayai.train.optim` for the update-rule protocol):

    lr = schedule(step);  rule.begin(lr)
    N = Σ_k (loss tokens of micro-batch k)                        k = 1..grad_accum
    for each micro-batch k:  rule.backward( Σ_{i∈k} ℓᵢ / N )      the sum of token losses over all N tokens
    rule.finish()                                                 clip + step (or nothing: LOMO already did)

so k micro-batches give the gradient of one batch of all their tokens, whatever their lengths.

The forward pass runs under `torch.autocast` when `autocast_dtype` is set (bf16 on CPUs with native bf16 and on
GPUs): matmuls in bf16, while parameters that train (adapters) stay fp32 and the loss is computed in fp32.

A checkpoint (every `save_every` steps, and at the end) is a directory `checkpoints/step-NNNNNN` holding the
trainable tensors, the update rule's state, the RNG states, the data loader's position and the loss history.
It is written under a temporary name and renamed into place, so a crash never leaves a half-written checkpoint
that `--resume` would pick up. Resuming restores all of it, and the resumed run computes bit for bit the losses
the uninterrupted run would have (same data order, same dropout masks, same optimizer moments).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hayai.errors import ConfigError, CorruptFileError
from hayai.runtime import peak_memory_bytes
from hayai.train.checkpointing import WRAPPED
from hayai.train.data import Batch, DataLoader
from hayai.train.loss import CausalLMLoss, ChunkedCrossEntropy
from hayai.train.optim import UpdateRule
from hayai.train.schedule import LRSchedule

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
UPDATE_FILE = "update_rule.pt"
RNG_FILE = "rng_state.pt"


def canonical_name(name: str) -> str:
    """A parameter name without activation-checkpointing wrappers (stable across wrapping)."""
    return name.replace(f".{WRAPPED}", "")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) for every parameter that requires grad (shared ones once)."""
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class TrainEvent:
    """What the trainer reports to its callback. `kind`: "step", "eval", "checkpoint" or "done" (and, from
    `hayai.finetune`, "stage" with a `message`, "memory" with the estimate in `detail`, "exact_match")."""

    kind: str
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    peak_memory_bytes: int | None = None
    eval_loss: float | None = None
    path: str | None = None
    message: str | None = None
    detail: Any = None


@dataclass
class TrainResult:
    losses: list[float]  # mean token loss of every step, from step 1 (including steps before a resume)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    steps: int = 0
    tokens: int = 0  # real input tokens processed in this session
    seconds: float = 0.0  # wall time of this session's steps
    peak_memory_bytes: int = 0
    resumed_from: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Trainer:
    """Trains `model` (a causal LM with `hidden(...)` and `lm_head`) on `loader`'s batches; see the module
    docstring. The model must already carry its adapters / quantization / checkpointing wrappers."""

    def __init__(self, model: nn.Module, loader: DataLoader, update: UpdateRule, schedule: LRSchedule, *,
                 max_steps: int, grad_accum: int = 1, loss: CausalLMLoss | None = None,
                 autocast_dtype: torch.dtype | None = None, eval_loader: DataLoader | None = None,
                 eval_every: int = 0, save_every: int = 0, output_dir: str | os.PathLike | None = None,
                 keep_checkpoints: int = 2, callback: Callable[[TrainEvent], None] | None = None) -> None:
        if max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
        if grad_accum < 1:
            raise ConfigError(f"gradient accumulation must be >= 1, got {grad_accum}")
        if grad_accum > 1 and not update.supports_accumulation:
            raise ConfigError(f"{type(update).__name__} updates parameters inside backward and cannot accumulate "
                              "gradients over micro-batches; use --grad-accum 1 (raise --batch-size instead)")
        if save_every and output_dir is None:
            raise ConfigError("checkpoints (save_every) need an output directory")
        self.model = model
        self.loader = loader
        self.update = update
        self.schedule = schedule
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.loss_fn = loss or ChunkedCrossEntropy()
        self.autocast_dtype = autocast_dtype
        self.eval_loader = eval_loader
        self.eval_every = eval_every
        self.save_every = save_every
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.keep_checkpoints = keep_checkpoints
        self.callback = callback
        self.device = next(model.parameters()).device
        self.step = 0
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []

    # ---- forward -----------------------------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """Summed token loss of one batch (fp32 scalar), computed under the trainer's autocast."""
        batch = batch.to(self.device)
        with self._autocast():
            hidden = self.model.hidden(batch.input_ids, positions=batch.positions, mask=batch.mask)  # [B, T, H]
            return self.loss_fn(self.model.lm_head, hidden, batch.labels)

    def evaluate(self) -> float:
        """Mean token loss over one pass of the evaluation data."""
        if self.eval_loader is None:
            raise ConfigError("no evaluation data")
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.eval_loader.epoch_batches():
                total += float(self.batch_loss(batch))
                count += batch.num_loss_tokens
        self.model.train(was_training)
        return total / max(1, count)

    # ---- one step ------------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float | None, int]:
        """One optimizer step; returns (mean token loss, gradient norm or None, real input tokens)."""
        lr = self.schedule(self.step)
        self.update.begin(lr)
        batches = [self.loader.next_batch() for _ in range(self.grad_accum)]
        loss_tokens = sum(b.num_loss_tokens for b in batches)
        total = torch.zeros((), dtype=torch.float32)
        for batch in batches:
            loss_sum = self.batch_loss(batch)
            self.update.backward(loss_sum / max(1, loss_tokens))
            total += loss_sum.detach().float().cpu()
        norm = self.update.finish()
        self.step += 1
        return float(total) / max(1, loss_tokens), norm, sum(b.num_tokens for b in batches)

    # ---- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        result = TrainResult(self.losses, self.eval_losses, resumed_from=self.step)
        self.model.train()
        start = time.perf_counter()
        first_step = self.step
        log = self._open_log()
        try:
            while self.step < self.max_steps:
                loss, norm, tokens = self.train_step()
                self.losses.append(loss)
                result.tokens += tokens
                elapsed = time.perf_counter() - start
                done = self.step - first_step
                event = TrainEvent("step", self.step, self.max_steps, loss=loss, lr=self.schedule(self.step - 1),
                                   grad_norm=norm, tokens_per_second=result.tokens / elapsed,
                                   eta_seconds=elapsed / done * (self.max_steps - self.step),
                                   peak_memory_bytes=peak_memory_bytes(self.device))
                self._log(log, {"step": self.step, "loss": loss, "lr": event.lr, "grad_norm": norm,
                                "tokens_per_second": event.tokens_per_second, "elapsed_seconds": elapsed})
                self._emit(event)
                if self.eval_loader is not None and self.eval_every and self.step % self.eval_every == 0:
                    self._run_eval(log)
                if self.save_every and (self.step % self.save_every == 0 or self.step == self.max_steps):
                    path = self.save_checkpoint()
                    self._emit(TrainEvent("checkpoint", self.step, self.max_steps, path=str(path)))
            if self.eval_loader is not None and (not self.eval_every or self.step % self.eval_every):
                self._run_eval(log)
        finally:
            if log is not None:
                log.close()
        result.steps = self.step
        result.seconds = time.perf_counter() - start
        result.peak_memory_bytes = peak_memory_bytes(self.device)
        self._emit(TrainEvent("done", self.step, self.max_steps, loss=self.losses[-1] if self.losses else None,
                              tokens_per_second=result.tokens_per_second,
                              peak_memory_bytes=result.peak_memory_bytes))
        return result

    def _run_eval(self, log) -> None:
        value = self.evaluate()
        self.eval_losses.append((self.step, value))
        self._log(log, {"step": self.step, "eval_loss": value})
        self._emit(TrainEvent("eval", self.step, self.max_steps, eval_loss=value))

    def _emit(self, event: TrainEvent) -> None:
        if self.callback is not None:
            self.callback(event)

    # ---- the training log ------------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path | None:
        return self.output_dir / "training_log.jsonl" if self.output_dir is not None else None

    def _open_log(self):
        """Open the JSONL log for appending, first dropping rows past the current step (after a resume)."""
        if self.log_path is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():
            kept = []
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            self.log_path.write_text("".join(k + "\n" for k in kept) if self.step else "", encoding="utf-8")
        return self.log_path.open("a", encoding="utf-8")

    @staticmethod
    def _log(handle, row: dict) -> None:
        if handle is not None:
            handle.write(json.dumps(row) + "\n")
            handle.flush()

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        if self.output_dir is None:
            raise ConfigError("checkpoints need an output directory")
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-NNNNNN` atomically (temporary directory + rename); keep the newest
        `keep_checkpoints`."""
        root = self.checkpoint_root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        temporary = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        tensors = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(self.model)}
        save_file(tensors, str(temporary / TRAINABLE_FILE), metadata={"format": "pt"})
        torch.save(self.update.state_dict(), temporary / UPDATE_FILE)
        torch.save(_rng_state(), temporary / RNG_FILE)
        state = {"format": 1, "step": self.step, "max_steps": self.max_steps, "loader": self.loader.state_dict(),
                 "losses": self.losses, "eval_losses": self.eval_losses, "schedule": asdict(self.schedule),
                 "update_rule": type(self.update).__name__}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(root)[: -self.keep_checkpoints or None] if self.keep_checkpoints else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything `save_checkpoint` wrote; the next `train()` continues from that step."""
        path = Path(path)
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CorruptFileError(f"{path}: not a training checkpoint (no {STATE_FILE})") from None
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"{path / STATE_FILE}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if state.get("update_rule") != type(self.update).__name__:
            raise ConfigError(f"{path}: the checkpoint was written by {state.get('update_rule')}, "
                              f"this run uses {type(self.update).__name__} (a different --method?)")
        try:
            tensors = load_file(str(path / TRAINABLE_FILE))
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"{path / TRAINABLE_FILE}: cannot read ({exc})") from None
        params = dict(trainable_parameters(self.model))
        if set(tensors) != set(params):
            extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
            raise ConfigError(f"{path / TRAINABLE_FILE}: trainable tensors differ from this model's "
                              f"(only in checkpoint: {extra[:3]}, only in model: {missing[:3]}); was it written "
                              "with other adapter settings?")
        with torch.no_grad():
            for name, p in params.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise ConfigError(f"{path / TRAINABLE_FILE}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the model's is {tuple(p.shape)}")
                p.copy_(tensors[name])
        self.update.load_state_dict(torch.load(path / UPDATE_FILE, weights_only=False))
        _set_rng_state(torch.load(path / RNG_FILE, weights_only=False))
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.losses[:] = [float(x) for x in state["losses"]]
        self.eval_losses[:] = [(int(s), float(v)) for s, v in state["eval_losses"]]


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
