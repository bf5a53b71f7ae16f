"""LSTM-Jump: an LSTM that learns to skip text (read R tokens, jump up to K, at most N jumps).

Yu, Lee & Le, "Learning to Skim Text", ACL 2017 (arXiv:1704.06877). Hyper-parameters fixed before training:
R = tokens read between jumps, K = largest jump, N = most jumps allowed (R and N may change at test time).

Reading. Starting at token 0, the LSTM reads R tokens; its hidden state h then gives a softmax over jump
sizes {0, 1, …, K}; a jump κ is sampled (training) or taken greedily (inference), the reader skips the next κ
tokens and reads R more. Reading stops when (a) the jump
softmax outputs 0, (b) N jumps have been made and the following R tokens are read, or (c) the text ends
(including a jump past its end). The last hidden state classifies the text. So at most N jumps are made and
at most (N + 1)·R tokens are read; K = 0 (no jump head) reads every token, a plain LSTM.

Training (REINFORCE with a learned baseline): the episode's reward is r = +1 if the prediction is correct,
−1 otherwise. With p(κ_i | h_i) the probability of the i-th jump decision and b_i = w_bᵀ h_i + c_b a
baseline (h_i detached, so the baseline does not shape the reader):

    J = CE(y, ŷ)  −  Σ_i log p(κ_i | h_i) · (r − b_i)  +  Σ_i (r − b_i)²      (`skim_loss`; weights adjustable)

Batching. Examples advance in lockstep blocks: each block gathers the next (up to) R tokens of every active
example from its own read pointer and runs them through the LSTM as one packed sequence (examples that are
done keep their state); jump decisions are then taken for all still-active examples at once. K = 0 is a
single block over the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from hayai.errors import ConfigError


@dataclass
class SkimOutput:
    """What one pass of LSTM-Jump produced for a batch of B texts (D = the most jump decisions any took)."""

    logits: torch.Tensor  # [B, classes]
    tokens_read: torch.Tensor  # [B] long
    lengths: torch.Tensor  # [B] long, the texts' lengths
    jumps: torch.Tensor  # [B] long, jumps made (κ > 0 decisions)
    log_probs: torch.Tensor  # [B, D] log p(κ_i | h_i) of each decision taken (0 where none)
    baselines: torch.Tensor  # [B, D] b_i (0 where none)
    decisions: torch.Tensor  # [B, D] bool, which entries are real decisions
    positions: list[list[int]] | None = None  # the token positions each example read (when recorded)

    @property
    def read_fraction(self) -> float:
        """Tokens read / tokens in the texts, over the batch."""
        return float(self.tokens_read.sum()) / max(1, int(self.lengths.sum()))


@dataclass
class SkimLoss:
    total: torch.Tensor
    classification: torch.Tensor
    reinforce: torch.Tensor
    baseline: torch.Tensor
    reward: torch.Tensor  # [B] +1 / −1


class LSTMJump(nn.Module):
    """Token ids [B, T] (+ lengths [B]) -> `SkimOutput` with class logits, reading R tokens between jumps."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_classes: int, *, read: int = 20,
                 max_jump: int = 40, max_jumps: int = 5, padding_idx: int | None = 0):
        super().__init__()
        if read < 1 or max_jump < 0 or max_jumps < 0:
            raise ConfigError(f"LSTM-Jump needs R >= 1, K >= 0, N >= 0 (got R={read}, K={max_jump}, N={max_jumps})")
        self.read, self.max_jump, self.max_jumps = read, max_jump, max_jumps
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.rnn = nn.LSTM(embed_dim, hidden_size, batch_first=True)
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.jump_head = nn.Linear(hidden_size, max_jump + 1) if max_jump > 0 else None  # softmax over {0..K}
        self.baseline = nn.Linear(hidden_size, 1) if max_jump > 0 else None  # b = w_bᵀ h + c_b

    def _read(self, tokens: torch.Tensor, pos: torch.Tensor, count: torch.Tensor, h: torch.Tensor,
              c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the LSTM over tokens[i, pos_i : pos_i + count_i] from state (h_i, c_i) for every i with
        count_i > 0 (one packed call for the whole block); the others keep their state."""
        rows = torch.nonzero(count > 0).squeeze(1)  # [n]
        if rows.numel() == 0:
            return h, c
        steps = torch.arange(int(count.max()), device=tokens.device)
        index = (pos[rows, None] + steps).clamp(max=tokens.shape[1] - 1)  # [n, S]
        x = self.embedding(tokens[rows[:, None], index])  # [n, S, E]
        packed = pack_padded_sequence(x, count[rows].cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, c_n) = self.rnn(packed, (h[rows][None].contiguous(), c[rows][None].contiguous()))
        return h.index_copy(0, rows, h_n[0]), c.index_copy(0, rows, c_n[0])

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *, greedy: bool | None = None,
                read: int | None = None, max_jumps: int | None = None, record: bool = False) -> SkimOutput:
        """greedy: argmax jumps (default: in eval mode) instead of sampling; read / max_jumps override R / N for
        this call; record: also return the positions read (for inspection and tests)."""
        b, t = tokens.shape
        device = tokens.device
        lengths = (torch.full((b,), t, dtype=torch.long, device=device) if lengths is None
                   else lengths.to(device=device, dtype=torch.long))
        if bool((lengths > t).any()) or bool((lengths < 0).any()):
            raise ConfigError(f"LSTM-Jump lengths must lie in 0..{t} (the padded length)")
        greedy = (not self.training) if greedy is None else greedy
        r = self.read if read is None else read
        n = self.max_jumps if max_jumps is None else max_jumps
        if self.jump_head is None:
            r = max(t, 1)  # K = 0: one block covers the whole text
        h = torch.zeros(b, self.hidden_size, device=device, dtype=self.classifier.weight.dtype)
        c = torch.zeros_like(h)
        pos = torch.zeros(b, dtype=torch.long, device=device)  # each example's read pointer
        active = lengths > 0
        tokens_read = torch.zeros(b, dtype=torch.long, device=device)
        jumps = torch.zeros(b, dtype=torch.long, device=device)
        log_probs, baselines, decided = [], [], []
        positions: list[list[int]] | None = [[] for _ in range(b)] if record else None
        block = 0
        while bool(active.any()):
            count = torch.where(active, (lengths - pos).clamp(min=0, max=r), 0)  # [B] tokens this block
            h, c = self._read(tokens, pos, count, h, c)
            if positions is not None:
                for i in torch.nonzero(count).squeeze(1).tolist():
                    positions[i].extend(range(int(pos[i]), int(pos[i] + count[i])))
            pos = pos + count
            tokens_read = tokens_read + count
            active = active & (pos < lengths)  # (c) the text is finished
            if self.jump_head is None or block >= n or not bool(active.any()):
                break  # K = 0 read everything; (b) N jumps made and the R tokens after the last one read
            block += 1
            dist = torch.distributions.Categorical(logits=self.jump_head(h))  # over {0..K}, [B]
            kappa = dist.probs.argmax(-1) if greedy else dist.sample()  # [B]
            assert self.baseline is not None
            log_probs.append(torch.where(active, dist.log_prob(kappa), 0.0))
            baselines.append(torch.where(active, self.baseline(h.detach()).squeeze(-1), 0.0))
            decided.append(active)
            stop = kappa == 0  # (a)
            jumps = jumps + (active & ~stop).long()
            pos = torch.where(active & ~stop, pos + kappa, pos)  # skip κ tokens
            active = active & ~stop & (pos < lengths)
        logits = self.classifier(h)  # [B, classes]
        empty = torch.zeros(b, 0, device=device)
        return SkimOutput(
            logits=logits, tokens_read=tokens_read, lengths=lengths, jumps=jumps,
            log_probs=torch.stack(log_probs, 1) if log_probs else empty,
            baselines=torch.stack(baselines, 1) if baselines else empty,
            decisions=torch.stack(decided, 1) if decided else empty.bool(),
            positions=positions)


def skim_loss(output: SkimOutput, labels: torch.Tensor, *, reinforce_weight: float = 1.0,
              baseline_weight: float = 1.0) -> SkimLoss:
    """CE + REINFORCE with reward ±1 and a learned baseline (sums over decisions, means over the batch)."""
    ce = F.cross_entropy(output.logits, labels)
    reward = (output.logits.argmax(-1) == labels).float() * 2 - 1  # [B]
    mask = output.decisions.float()  # [B, D]
    advantage = (reward[:, None] - output.baselines).detach()  # [B, D]
    reinforce = -(output.log_probs * advantage * mask).sum(1).mean()
    baseline = ((reward[:, None] - output.baselines) ** 2 * mask).sum(1).mean()
    total = ce + reinforce_weight * reinforce + baseline_weight * baseline
    return SkimLoss(total, ce, reinforce, baseline, reward)
