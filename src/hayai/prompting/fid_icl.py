"""FiD-ICL: fusion-in-decoder in-context learning (Ye et al. 2023, "FiD-ICL: A Fusion-in-Decoder Approach for
Efficient In-Context Learning", ACL 2023; after Izacard & Grave 2021's Fusion-in-Decoder).

Concatenation ICL feeds [d_1; ...; d_k; q] through the model for every query q, so each query pays for all k
demonstrations again, and attention over the whole input grows quadratically. FiD-ICL encodes each
demonstration separately, once per task, and lets only the decoder fuse them:

    encoder-decoder:   H_i = Enc(d_i)  (per demonstration, padding stripped)     [L_i, H]   cached per task
                       H_q = Enc(q)                                             [L_q, H]   per query
                       score(y | q) = -(1/|y|) Σ_t log p_Dec(y_t | y_<t, [H_1; ...; H_k; H_q])

Options are ranked by that length-normalised log-likelihood (the paper's rank classification); the prediction is
the best option. `FiDICL` wraps a Hugging Face encoder-decoder (T5 family; transformers is imported here only).

The decoder-only counterpart on hayai's native model (`CachedDemonstrations`) caches each demonstration's keys and
values, computed once with its own RoPE positions 0 .. L_i - 1 (demonstrations never attend to each other), side
by side in one KV cache. A query (plus an option) is appended at positions P = max_i L_i, P + 1, ... and attends to
every demonstration slot and causally to itself. Per query it costs a forward over the query and option tokens
only, instead of over all k demonstrations again. It equals one uncached forward over [d_1; ...; d_k; q; y] with
that block mask and those positions (tested), not concatenation ICL: the model sees a parallel layout it was not
trained on, so accuracy must be measured (the benchmark does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hayai.errors import ConfigError
from hayai.models.kv_cache import KVCache
from hayai.models.llama import CausalLM


def _check(ids_list: Sequence[Sequence[int]], what: str) -> None:
    if not ids_list or any(len(ids) == 0 for ids in ids_list):
        raise ConfigError(f"{what} must be a non-empty list of non-empty token id lists")


def _pad(rows: Sequence[Sequence[int]], pad: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to [B, W]; return the ids (padding = `fill` if given else `pad`) and the bool mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad if fill is None else fill] * (width - len(r)) for r in rows])
    keep = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, keep


def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] (-100 = ignore) -> per-row mean negative log-likelihood [B]."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")  # [B, T]
    counted = (targets != -100).sum(1).clamp(min=1)
    return nll.sum(1) / counted


# ---------------------------------------------------------------------------------------------------------------
# Encoder-decoder (T5 family)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DemoMemory:
    """The demonstrations' encoder states, padding stripped and concatenated: [M, H] with M = Σ L_i."""

    hidden: torch.Tensor  # [M, H]
    lengths: list[int]


class FiDICL:
    """Fusion-in-decoder ICL over a Hugging Face encoder-decoder (`get_encoder()`, `forward(encoder_outputs=..)`)."""

    def __init__(self, model: Any, pad_token_id: int | None = None):
        self.model = model.eval()
        self.pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> FiDICL:
        from transformers import AutoModelForSeq2SeqLM

        return cls(AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row encoded on its own (padding masked): hidden [B, W, H] and the real-token mask [B, W]."""
        ids, keep = _pad(rows, self.pad)
        ids, keep = ids.to(self.device), keep.to(self.device)
        hidden = self.model.get_encoder()(input_ids=ids, attention_mask=keep.long()).last_hidden_state  # [B, W, H]
        return hidden, keep

    def encode_demonstrations(self, demos: Sequence[Sequence[int]]) -> DemoMemory:
        """Once per task: every demonstration encoded separately, padding dropped, concatenated."""
        _check(demos, "demonstrations")
        hidden, keep = self.encode(demos)  # [k, L, H], [k, L]
        return DemoMemory(hidden[keep], [len(d) for d in demos])  # [Σ L_i, H]

    @torch.inference_mode()
    def score(self, memory: DemoMemory, query: Sequence[int], options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean NLL of each option given the demonstrations and the query [n_options] (lower = more likely)."""
        _check(options, "options")
        query_hidden, _ = self.encode([query])  # [1, L_q, H]
        fused = torch.cat([memory.hidden[None], query_hidden], dim=1)  # [1, M + L_q, H]
        return self._decode(fused.expand(len(options), -1, -1), options)

    @torch.inference_mode()
    def score_concatenated(self, demos: Sequence[Sequence[int]], query: Sequence[int],
                           options: Sequence[Sequence[int]]) -> torch.Tensor:
        """The baseline: concatenation ICL, [d_1; ...; d_k; q] through the encoder for this query."""
        _check(options, "options")
        joined = [t for d in demos for t in d] + list(query)
        hidden, _ = self.encode([joined])  # [1, Σ L_i + L_q, H]
        return self._decode(hidden.expand(len(options), -1, -1), options)

    def _decode(self, encoder_hidden: torch.Tensor, options: Sequence[Sequence[int]]) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        labels, _ = _pad(options, self.pad, fill=-100)
        labels = labels.to(self.device)  # [n, T]
        mask = torch.ones(encoder_hidden.shape[:2], dtype=torch.long, device=self.device)
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                            attention_mask=mask, labels=labels).logits  # [n, T, V]
        return mean_nll(logits, labels)

    def predict(self, memory: DemoMemory, query: Sequence[int], options: Sequence[Sequence[int]]) -> int:
        return int(self.score(memory, query, options).argmin())


# ---------------------------------------------------------------------------------------------------------------
# Decoder-only (hayai's native model): demonstrations' KV cached once per task
# ---------------------------------------------------------------------------------------------------------------


class CachedDemonstrations:
    """Each demonstration's keys/values computed once, side by side in one cache; queries reuse them."""

    def __init__(self, model: CausalLM, demos: Sequence[Sequence[int]] = ()):
        self.model = model
        self.lengths: list[int] = []
        self.cache: KVCache = model.new_cache(1, 1)
        for demo in demos:
            self.add(demo)

    @property
    def length(self) -> int:
        """Slots the demonstrations occupy (Σ L_i)."""
        return sum(self.lengths)

    @property
    def query_position(self) -> int:
        """RoPE position of a query's first token: just after the longest demonstration."""
        return max(self.lengths, default=0)

    @torch.inference_mode()
    def add(self, demo: Sequence[int]) -> None:
        """Encode one more demonstration (positions 0 .. L-1, attending only to itself) and append its KV."""
        if not demo:
            raise ConfigError("a demonstration must have at least one token")
        own = self.model.new_cache(1, len(demo))
        self.model(torch.tensor([list(demo)], device=self.model.device), cache=own)
        grown = self.model.new_cache(1, self.length + len(demo))
        for layer in range(len(grown.keys)):
            grown.keys[layer][:, :, :self.length] = self.cache.keys[layer][:, :, :self.length]
            grown.values[layer][:, :, :self.length] = self.cache.values[layer][:, :, :self.length]
            grown.keys[layer][:, :, self.length:] = own.keys[layer]
            grown.values[layer][:, :, self.length:] = own.values[layer]
        grown.lengths = [self.length + len(demo)]
        self.cache = grown
        self.lengths.append(len(demo))

    def _mask(self, rows: int, new: int) -> torch.Tensor:
        """[rows, 1, new, M + new]: every demonstration slot, then causal over the new tokens."""
        device = self.model.device
        demos = torch.ones(new, self.length, dtype=torch.bool, device=device)
        causal = torch.ones(new, new, dtype=torch.bool, device=device).tril()
        return torch.cat([demos, causal], dim=1)[None, None].expand(rows, 1, new, self.length + new)

    @torch.inference_mode()
    def hidden(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final hidden states [B, W, hidden] of right-padded token rows that follow the demonstrations."""
        _check(rows, "rows")
        ids, _ = _pad(rows, 0)
        ids = ids.to(self.model.device)  # [B, W]
        b, w = ids.shape
        cache = self.model.new_cache(b, self.length + w)
        cache.copy_prefix_from(self.cache, self.length)
        positions = (self.query_position + torch.arange(w, device=ids.device)).expand(b, w)  # [B, W]
        return self.model.hidden(ids, positions=positions, cache=cache, mask=self._mask(b, w))

    def score(self, query: Sequence[int], options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean NLL of each option's tokens after the demonstrations and the query [n_options]."""
        return self.score_many([query], options)[0]

    def score_many(self, queries: Sequence[Sequence[int]], options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Several queries in one forward pass (rows = queries x options): [n_queries, n_options]."""
        _check(queries, "the queries")
        _check(options, "options")
        rows = [list(q) + list(o) for q in queries for o in options]
        starts = [len(q) for q in queries for _ in options]
        nll = _option_nll(self.model, self.hidden(rows), starts, list(options) * len(queries))
        return nll.view(len(queries), len(options))

    def predict(self, query: Sequence[int], options: Sequence[Sequence[int]]) -> int:
        return int(self.score(query, options).argmin())


@torch.inference_mode()
def _option_nll(model: CausalLM, hidden: torch.Tensor, starts: Sequence[int],
                options: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-row mean NLL of row r's option tokens, which start at column starts[r]. hidden [B, W, H]."""
    span = max(len(o) for o in options)
    # The token at column s + t is predicted at column s + t - 1: project only those columns.
    columns = torch.tensor(starts, device=hidden.device)[:, None] - 1 + torch.arange(span, device=hidden.device)
    columns = columns.clamp(max=hidden.shape[1] - 1)  # [B, span] (past a row's end: padding, ignored below)
    picked = hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[2]))  # [B, span, H]
    logits = model.logits(picked)  # [B, span, V]
    targets = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)
    for r, option in enumerate(options):
        targets[r, :len(option)] = torch.tensor(list(option), device=logits.device)
    return mean_nll(logits, targets)


@torch.inference_mode()
def concatenated_scores(model: CausalLM, demos: Sequence[Sequence[int]], query: Sequence[int],
                        options: Sequence[Sequence[int]]) -> torch.Tensor:
    """The baseline: concatenation ICL, [d_1; ...; d_k; q; y] through the model for each option [n_options]."""
    return concatenated_scores_many(model, demos, [query], options)[0]


@torch.inference_mode()
def concatenated_scores_many(model: CausalLM, demos: Sequence[Sequence[int]], queries: Sequence[Sequence[int]],
                             options: Sequence[Sequence[int]]) -> torch.Tensor:
    """Concatenation ICL for several queries in one forward pass: [n_queries, n_options]."""
    _check(queries, "the queries")
    _check(options, "options")
    demo_tokens = [t for d in demos for t in d]
    rows = [demo_tokens + list(q) + list(o) for q in queries for o in options]
    starts = [len(demo_tokens) + len(q) for q in queries for _ in options]
    ids, _ = _pad(rows, 0)
    hidden = model.hidden(ids.to(model.device))  # [B, W, hidden]
    return _option_nll(model, hidden, starts, list(options) * len(queries)).view(len(queries), len(options))
