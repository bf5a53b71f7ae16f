"""Speculative decoding: exact greedy output, the target distribution under sampling, rollback, EOS, sources."""

from __future__ import annotations

import random

import pytest
import torch
from decode_helpers import chi_square, chi_square_critical, decode, tiny_lm

from hayai.decode.candidates import CandidateSource, Draft, cut_at_stop
from hayai.decode.draft_length import DraftLength
from hayai.decode.draft_model import DraftModel
from hayai.decode.prompt_lookup import PromptLookup
from hayai.decode.rejection import greedy_verify, sample_verify
from hayai.decode.sampling import SamplingParams, probabilities
from hayai.decode.self_speculative import EarlyExit, early_exit_view
from hayai.decode.speculative import SpeculativeDecoding
from hayai.errors import ConfigError
from hayai.quant import quantize_model

PROMPTS = [[5, 17, 33, 2, 8, 5, 17, 33, 41, 9, 5, 17], [60, 61, 62, 63, 60, 61], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


@pytest.fixture(scope="module")
def target():
    return tiny_lm(seed=0)


@pytest.fixture(scope="module")
def other_draft():
    return tiny_lm(seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def plain_outputs(target):
    return [decode(target, prompt, 30)[0] for prompt in PROMPTS]


# ---- acceptance math -----------------------------------------------------------------------------------------
def test_greedy_verify_keeps_the_matching_prefix_then_the_target_token():
    logits = torch.full((4, 10), -1.0)
    for i, t in enumerate([3, 4, 7, 9]):
        logits[i, t] = 1.0
    assert greedy_verify(torch.tensor([3, 4, 5]), logits).tokens == [3, 4, 7]  # third draft rejected
    assert greedy_verify(torch.tensor([3, 4, 7]), logits).tokens == [3, 4, 7, 9]  # bonus token
    assert greedy_verify(torch.tensor([0, 4, 7]), logits).tokens == [3]
    v = greedy_verify(torch.tensor([], dtype=torch.long), logits[:1])
    assert v.tokens == [3] and v.accepted == 0


def _dirichlet(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g) * 1.2, dim=-1)  # [rows, V]


@pytest.mark.parametrize("one_hot", [False, True])
def test_speculative_sampling_reproduces_the_target_joint_distribution(one_hot):
    """Positions have fixed target distributions p_s and draft distributions q_s. Running the accept/resample
    rule step after step until two tokens exist must give tokens distributed as p_0 ⊗ p_1 (χ² test)."""
    vocab, k, trials = 5, 3, 6000
    p = _dirichlet(k + 2, vocab, seed=1)  # [positions, V]
    q = _dirichlet(k + 2, vocab, seed=2)
    fixed_draft = torch.tensor([1, 4, 2, 0, 3])  # the deterministic draft (one-hot q)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for _ in range(trials):
        out: list[int] = []
        while len(out) < 2:
            s = len(out)
            if one_hot:
                draft, draft_probs = fixed_draft[s:s + k], None
            else:
                draft = torch.stack([torch.multinomial(q[s + i], 1, generator=g)[0] for i in range(k)])
                draft_probs = q[s:s + k]
            out += sample_verify(draft, draft_probs, p[s:s + k + 1], g).tokens
        counts[out[0] * vocab + out[1]] += 1
    joint = (p[0][:, None] * p[1][None, :]).flatten()
    stat, df = chi_square(counts, joint)
    assert stat < chi_square_critical(df), (stat, df)


def test_rejected_draft_token_is_never_resampled_from_a_one_hot_draft():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = sample_verify(torch.tensor([0]), None, p, g)
        assert v.tokens[0] in (0, 1)
        if v.accepted == 0:
            assert v.tokens == [1]  # the residual of a one-hot draft at token 0 is p without token 0
    # a draft token the target gives probability 0 is never accepted
    assert all(sample_verify(torch.tensor([2]), None, p, g).accepted == 0 for _ in range(100))


def test_draft_equal_to_target_is_always_accepted():
    p = _dirichlet(4, 7, seed=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        draft = torch.stack([torch.multinomial(p[i], 1, generator=g)[0] for i in range(3)])
        assert sample_verify(draft, p[:3], p, g).accepted == 3


# ---- greedy: token-identical to plain greedy decoding -------------------------------------------------------
class WrongGuesses(CandidateSource):
    """Always proposes tokens the target rejects first (forces a rollback at every step)."""

    name = "wrong"

    def __init__(self, model):
        self.model = model
        self.cache_lengths: list[int] = []

    def start(self, target, target_cache, prompt, sampling, generator):
        super().start(target, target_cache, prompt, sampling, generator)
        self.target_cache = target_cache

    def propose(self, context, max_tokens):
        self.cache_lengths.append(self.target_cache.lengths[0])
        with torch.no_grad():
            best = int(self.model(torch.tensor([context]))[0, -1].argmax())
        return Draft([(best + 1) % 97, 7, 7][:max_tokens])


def sources(target, other_draft):
    return {
        "lookup": lambda: PromptLookup(max_ngram=3, num_tokens=6),
        "lookup-last": lambda: PromptLookup(max_ngram=2, num_tokens=4, match="last"),
        "draft-other": lambda: DraftModel(other_draft, num_tokens=4),
        "draft-self": lambda: DraftModel(target, num_tokens=4),
        "draft-confident": lambda: DraftModel(other_draft, num_tokens=6, min_confidence=0.6),
        "early-exit": lambda: EarlyExit(exit_layer=1, num_tokens=3),
        "early-exit-int8": lambda: EarlyExit(exit_layer=1, quant="int8"),
        "self-int4": lambda: EarlyExit(quant="int4", group_size=32),
        "wrong": lambda: WrongGuesses(target),
    }


@pytest.mark.parametrize("name", ["lookup", "lookup-last", "draft-other", "draft-self", "draft-confident",
                                  "early-exit", "early-exit-int8", "self-int4", "wrong"])
def test_greedy_speculation_equals_plain_greedy(target, other_draft, plain_outputs, name):
    strategy = SpeculativeDecoding(sources(target, other_draft)[name](), DraftLength(4, maximum=8))
    for prompt, plain in zip(PROMPTS, plain_outputs, strict=True):  # one strategy serves several generations
        spec, stats = decode(target, prompt, 30, strategy)
        assert spec == plain, name
        assert stats.target_forwards <= 29 and stats.accepted_tokens <= stats.drafted_tokens


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name", ["lookup", "draft-other", "early-exit"])
def test_greedy_speculation_equals_plain_greedy_on_quantized_targets(other_draft, method, name):
    model = tiny_lm(seed=0)
    quantize_model(model, method, group_size=32)
    strategy = SpeculativeDecoding(sources(model, other_draft)[name]())
    for prompt in PROMPTS[:2]:
        plain, _ = decode(model, prompt, 24)
        assert decode(model, prompt, 24, strategy)[0] == plain


def test_draft_equal_to_target_accepts_everything(target):
    strategy = SpeculativeDecoding(DraftModel(target, num_tokens=4), DraftLength(4, schedule="constant"))
    _, stats = decode(target, PROMPTS[0], 25, strategy)
    assert stats.drafted_tokens > 0 and stats.accepted_tokens == stats.drafted_tokens
    assert strategy.acceptance_by_position() == [1.0] * 4
    # one forward per (4 drafts + 1 bonus) tokens after the first token, which prefill produced
    assert stats.target_forwards == 5


def test_rejected_drafts_are_rolled_back_out_of_the_cache(target):
    source = WrongGuesses(target)
    strategy = SpeculativeDecoding(source, DraftLength(3, schedule="constant", maximum=3))
    plain, _ = decode(target, PROMPTS[1], 12)
    spec, stats = decode(target, PROMPTS[1], 12, strategy)
    assert spec == plain and stats.accepted_tokens == 0
    # before each proposal the cache holds exactly the context without its last (pending) token
    prompt_len = len(PROMPTS[1])
    assert source.cache_lengths == [prompt_len + i for i in range(len(source.cache_lengths))]


# ---- sampling through real models -------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["draft"])  # one-hot (lookup) drafts: the pure test above
def test_speculative_sampling_with_models_matches_the_target_distribution(source):
    """Vocabulary 5, a draft model that differs from the target: the first two sampled tokens follow the
    target's own joint distribution (with the same temperature/top-k warping on p and q)."""
    vocab, trials = 4, 400
    target = tiny_lm(seed=3, vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, scale=6.0)
    draft = tiny_lm(seed=4, vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, scale=6.0)
    sampling = SamplingParams(temperature=0.9, top_k=3)
    prompt = [1, 2, 3, 1, 2]
    with torch.no_grad():
        first = probabilities(target(torch.tensor([prompt]))[0, -1], sampling)  # [V]
        nexts = torch.stack([probabilities(target(torch.tensor([[*prompt, t]]))[0, -1], sampling)
                             for t in range(vocab)])  # [V, V]
    joint = (first[:, None] * nexts).flatten()
    q_first = probabilities(draft(torch.tensor([prompt]))[0, -1], sampling)
    assert (q_first - first).abs().max() > 0.05  # the draft really differs from the target
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    accepted = 0
    src = DraftModel(draft, num_tokens=3) if source == "draft" else PromptLookup(max_ngram=2, num_tokens=3)
    strategy = SpeculativeDecoding(src, DraftLength(3, schedule="constant", maximum=3))
    for seed in range(trials):
        out, stats = decode(target, prompt, 3, strategy, sampling, seed=seed)
        counts[out[0] * vocab + out[1]] += 1
        accepted += stats.accepted_tokens
    stat, df = chi_square(counts, joint)
    assert stat < chi_square_critical(df), (stat, df)
    assert accepted > 0  # drafts were actually accepted, so the test exercised acceptance


# ---- end of sequence --------------------------------------------------------------------------------------
def test_end_of_sequence_inside_a_draft_stops_exactly_like_plain_decoding(tiny_llm):
    prompt = tiny_llm.prompt_ids("The quick brown fox jumps over the lazy dog. The quick brown fox", raw=True)
    reference = tiny_llm.engine.generate(prompt, max_new_tokens=30, stop_token_ids=set()).token_ids
    for eos in sorted(set(reference))[:6]:
        plain = tiny_llm.engine.generate(prompt, max_new_tokens=30, stop_token_ids={eos})
        strategy = SpeculativeDecoding(PromptLookup(stop_token_ids=frozenset({eos})))
        spec = tiny_llm.engine.generate(prompt, max_new_tokens=30, stop_token_ids={eos}, strategy=strategy)
        assert (spec.token_ids, spec.finish_reason) == (plain.token_ids, plain.finish_reason)
    assert cut_at_stop([4, 5, 2, 6, 2], frozenset({2})) == [4, 5, 2]


def test_draft_model_stops_drafting_at_end_of_sequence(target):
    source = DraftModel(target, num_tokens=8)
    cache = target.new_cache(1, 64)
    plain, _ = decode(target, PROMPTS[0], 6)
    source.stop_token_ids = frozenset({plain[2]})
    with torch.inference_mode():
        source.start(target, cache, PROMPTS[0], SamplingParams(), None)
        draft = source.propose(PROMPTS[0], 8)
    assert draft.tokens == plain[: plain.index(plain[2]) + 1]


# ---- prompt lookup ------------------------------------------------------------------------------------------
def brute_force_lookup(context, max_ngram, min_ngram, num_tokens, match):
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        starts = [i for i in range(len(context) - n) if context[i:i + n] == suffix]
        if starts:
            s = (starts[0] if match == "first" else starts[-1]) + n
            return context[s:s + num_tokens]
    return []


@pytest.mark.parametrize("match", ["first", "last"])
def test_prompt_lookup_index_equals_brute_force_search(match):
    rng = random.Random(0)
    lookup = PromptLookup(max_ngram=3, min_ngram=1, num_tokens=5, match=match)
    lookup.start(None, None, [], SamplingParams(), None)
    context: list[int] = []
    for _ in range(300):  # the context grows as it does during decoding; the index is built incrementally
        context += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        assert lookup.lookup(context, 5) == brute_force_lookup(context, 3, 1, 5, match)


def test_prompt_lookup_prefers_the_longest_ngram_and_caps_the_draft():
    lookup = PromptLookup(max_ngram=3, num_tokens=3)
    lookup.start(None, None, [], SamplingParams(), None)
    context = [1, 2, 9, 9, 9, 5, 1, 2, 3, 7, 8, 6, 4, 1, 2, 3]
    assert lookup.propose(context, 10).tokens == [7, 8, 6]  # "1 2 3" beats the earlier "2 ..." / "3 ..." matches
    assert lookup.propose(context, 2).tokens == [7, 8]
    assert PromptLookup().propose([1, 2, 3], 5).tokens == []


def test_prompt_lookup_rejects_bad_settings():
    with pytest.raises(ConfigError):
        PromptLookup(max_ngram=1, min_ngram=2)
    with pytest.raises(ConfigError):
        PromptLookup(match="longest")


# ---- draft length and early exit ----------------------------------------------------------------------------
def test_heuristic_draft_length_grows_on_full_acceptance_and_shrinks_on_rejection():
    length = DraftLength(initial=4, schedule="heuristic", minimum=2, maximum=7)
    length.update(4, 4)
    assert length.current == 6
    length.update(6, 6)
    assert length.current == 7
    length.update(7, 3)
    length.update(6, 0)
    length.update(5, 0)
    length.update(4, 0)
    assert length.current == 3
    length.update(3, 0)
    length.update(2, 0)
    assert length.current == 2  # the minimum
    fixed = DraftLength(initial=3, schedule="constant", maximum=3)
    fixed.update(3, 0)
    assert fixed.current == 3
    with pytest.raises(ConfigError):
        DraftLength(initial=9, maximum=4)


def test_early_exit_view_shares_weights_and_runs_the_first_layers(target):
    view = early_exit_view(target, 1)
    assert view.model.layers[0] is target.model.layers[0] and len(view.model.layers) == 1
    assert view.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        x = target.model.embed_tokens(ids)
        rope = target.model.rotary(torch.arange(ids.shape[1])[None], x.dtype)
        x = target.model.layers[0](x, rope, None, None, None)
        expected = target.lm_head(target.model.norm(x))
        assert torch.allclose(view(ids), expected, atol=1e-5)
    assert len(target.model.layers) == 2  # the target is untouched
    with pytest.raises(ConfigError):
        early_exit_view(target, 3)
