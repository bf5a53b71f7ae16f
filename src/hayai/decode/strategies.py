"""The decode strategies by name, as the CLI (`--speculate NAME`) and the Python API (`speculate="NAME"`) offer them.

    build_strategy("lookup", model, stop_token_ids=tokenizer.eos_token_ids)                  # prompt lookup
    build_strategy("draft", model, stop_token_ids=eos, draft=small_model)                     # a draft model
    build_strategy("self", model, stop_token_ids=eos, options=SpeculateOptions(exit_layer=12))  # early exit
    build_strategy("lookahead", model, stop_token_ids=eos)

| name      | what drafts                                              | needs                 |
|-----------|----------------------------------------------------------|-----------------------|
| plain     | nothing: one token per forward pass                      |                       |
| lookup    | n-gram match in the prompt and output (`prompt_lookup`)  |                       |
| draft     | a smaller model sharing the tokenizer (`draft_model`)    | `draft=`              |
| self      | the target's first layers / an int4 copy of it           | `exit_layer` / quant  |
| lookahead | Jacobi window + n-gram pool, own pass layout (`lookahead`) |                     |
| jacobi    | the previous pass's outputs (`jacobi`)                   |                       |

All are lossless: greedy output equals plain greedy decoding, sampled output follows the target's distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hayai.decode.candidates import CandidateSource
from hayai.decode.draft_length import DraftLength
from hayai.decode.draft_model import DraftModel
from hayai.decode.engine import Autoregressive, DecodeStrategy
from hayai.decode.jacobi import Jacobi
from hayai.decode.lookahead import LookaheadDecoding
from hayai.decode.prompt_lookup import PromptLookup
from hayai.decode.self_speculative import EarlyExit
from hayai.decode.speculative import SpeculativeDecoding
from hayai.errors import ConfigError
from hayai.models.llama import CausalLM


@dataclass
class SpeculateOptions:
    """Knobs of the strategies; each strategy reads the ones it uses."""

    draft_tokens: int = 4  # initial draft length (speculative strategies)
    max_draft: int = 8  # the adaptive draft length stays in [1, max_draft]
    schedule: str = "heuristic"  # "heuristic" (+2 on full acceptance, -1 otherwise) or "constant"
    max_ngram: int = 3  # lookup: longest n-gram matched
    min_ngram: int = 1  # lookup: shortest n-gram matched
    match: str = "first"  # lookup: which occurrence of the n-gram ("first" or "last")
    min_confidence: float = 0.0  # draft/self: stop drafting below this draft probability (greedy)
    exit_layer: int | None = None  # self: draft with the first N layers (default: half of them)
    self_quant: str | None = None  # self: draft with an "int4"/"int8" copy of those layers
    window: int = 5  # lookahead: Jacobi window width W (jacobi: window length)
    ngram: int = 3  # lookahead: n-gram size N
    candidates: int = 5  # lookahead: n-grams verified per pass G

    def draft_length(self) -> DraftLength:
        initial = min(self.draft_tokens, self.max_draft)
        return DraftLength(initial=initial, schedule=self.schedule, minimum=1, maximum=self.max_draft)


def _speculative(source: CandidateSource, options: SpeculateOptions) -> SpeculativeDecoding:
    return SpeculativeDecoding(source, options.draft_length())


def _lookup(model, eos, draft, options):
    return _speculative(PromptLookup(max_ngram=options.max_ngram, min_ngram=options.min_ngram,
                                     num_tokens=options.max_draft, match=options.match, stop_token_ids=eos), options)


def _draft(model, eos, draft, options):
    if draft is None:
        raise ConfigError("speculative decoding with a draft model needs a draft model (--draft MODEL / draft=...)")
    return _speculative(DraftModel(draft, num_tokens=options.max_draft, min_confidence=options.min_confidence,
                                   stop_token_ids=eos), options)


def _self(model, eos, draft, options):
    layers = model.config.num_hidden_layers
    exit_layer = options.exit_layer
    if exit_layer is None and options.self_quant is None:
        exit_layer = max(1, layers // 2)
    return _speculative(EarlyExit(exit_layer=exit_layer, quant=options.self_quant, num_tokens=options.max_draft,
                                  min_confidence=options.min_confidence, stop_token_ids=eos), options)


def _lookahead(model, eos, draft, options):
    return LookaheadDecoding(window=options.window, ngram=options.ngram, max_candidates=options.candidates)


def _jacobi(model, eos, draft, options):
    return _speculative(Jacobi(window=options.max_draft, stop_token_ids=eos), options)


def _plain(model, eos, draft, options):
    return Autoregressive()


Builder = Callable[[CausalLM, frozenset[int], "CausalLM | None", SpeculateOptions], DecodeStrategy]
STRATEGIES: dict[str, Builder] = {
    "plain": _plain,
    "lookup": _lookup,
    "draft": _draft,
    "self": _self,
    "lookahead": _lookahead,
    "jacobi": _jacobi,
}


def build_strategy(name: str, model: CausalLM, *, stop_token_ids: frozenset[int] = frozenset(),
                   draft: CausalLM | None = None, options: SpeculateOptions | None = None) -> DecodeStrategy:
    """A fresh strategy object called `name` for `model` (see the table in the module docstring)."""
    builder = STRATEGIES.get(name)
    if builder is None:
        raise ConfigError(f"unknown decode strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return builder(model, frozenset(stop_token_ids), draft, options or SpeculateOptions())
