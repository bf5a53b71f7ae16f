"""FiD-ICL equals its unfused references: per-demonstration encoder states equal separate encoder runs, fused
decoder scores equal an explicit concatenation fed to the T5 model, and the decoder-only cached-demonstration path
equals one uncached forward with the block mask and per-demonstration positions."""

from __future__ import annotations

import pytest
import torch
import transformers
from tinymodels import VOCAB, hf_llama, native_from
from transformers.modeling_outputs import BaseModelOutput

from hayai.errors import ConfigError
from hayai.prompting.fid_icl import CachedDemonstrations, FiDICL, concatenated_scores, concatenated_scores_many


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config).eval()


DEMOS = [[5, 6, 7, 8, 9, 1], [10, 11, 1], [12, 13, 14, 15, 1], [16, 17, 18, 19, 20, 21, 22, 1]]
QUERY = [30, 31, 32, 1]
OPTIONS = [[40, 1], [41, 42, 43, 1], [44, 1]]


def test_demonstration_encodings_equal_separate_encoder_runs(t5):
    fid = FiDICL(t5)
    memory = fid.encode_demonstrations(DEMOS)
    with torch.no_grad():
        separate = [t5.get_encoder()(input_ids=torch.tensor([d])).last_hidden_state[0] for d in DEMOS]
    assert memory.lengths == [len(d) for d in DEMOS]
    assert torch.allclose(memory.hidden, torch.cat(separate), atol=1e-5)


def test_fused_scores_equal_an_explicit_concatenation(t5):
    fid = FiDICL(t5)
    got = fid.score(fid.encode_demonstrations(DEMOS), QUERY, OPTIONS)
    with torch.no_grad():
        encoder = t5.get_encoder()
        parts = [encoder(input_ids=torch.tensor([ids])).last_hidden_state for ids in [*DEMOS, QUERY]]
        fused = torch.cat(parts, dim=1)  # [1, Σ L_i + L_q, H]
        expected = torch.stack([
            t5(encoder_outputs=BaseModelOutput(last_hidden_state=fused), labels=torch.tensor([o])).loss
            for o in OPTIONS])  # the model's own mean token NLL per option
    assert torch.allclose(got, expected, atol=1e-5)
    assert fid.predict(fid.encode_demonstrations(DEMOS), QUERY, OPTIONS) == int(expected.argmin())


def test_concatenated_baseline_equals_the_model_on_the_joined_input(t5):
    fid = FiDICL(t5)
    got = fid.score_concatenated(DEMOS, QUERY, OPTIONS)
    joined = torch.tensor([[t for d in DEMOS for t in d] + QUERY])
    with torch.no_grad():
        expected = torch.stack([t5(input_ids=joined, labels=torch.tensor([o])).loss for o in OPTIONS])
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def llama():
    hf = hf_llama(num_hidden_layers=2, max_position_embeddings=128)
    return hf, native_from(hf)


def block_reference(model, demos, query, option):
    """One uncached forward over [d_1..d_k; q; y]: demos at positions 0..L_i-1 seeing only themselves, the query
    and option from max L_i on, seeing every demonstration and causally themselves."""
    tail = query + option
    ids = [t for d in demos for t in d] + tail
    p0 = max(len(d) for d in demos)
    positions = [p for d in demos for p in range(len(d))] + list(range(p0, p0 + len(tail)))
    segment = [i for i, d in enumerate(demos) for _ in d] + [len(demos)] * len(tail)
    n = len(ids)
    seg = torch.tensor(segment)
    causal = torch.arange(n)[:, None] >= torch.arange(n)[None, :]
    mask = causal & ((seg[:, None] == seg[None, :]) | (seg[:, None] == len(demos)))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), positions=torch.tensor([positions]), mask=mask[None, None])[0]
    start = n - len(tail)
    logp = logits[start + len(query) - 1:n - 1].log_softmax(-1)  # predictions of the option tokens
    return -logp[torch.arange(len(option)), torch.tensor(option)].mean()


def test_cached_demonstrations_equal_one_forward_with_the_block_mask(llama):
    _, model = llama
    g = torch.Generator().manual_seed(1)
    demos = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 11, 5)]
    query = torch.randint(0, VOCAB, (4,), generator=g).tolist()
    options = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 2)]
    cached = CachedDemonstrations(model, demos)
    assert cached.length == 26 and cached.query_position == 11
    got = cached.score(query, options)
    expected = torch.stack([block_reference(model, demos, query, o) for o in options])
    assert torch.allclose(got, expected, atol=1e-5)
    # the cache is reused: a second query does not change it, and adding demos one by one is the same
    other = torch.randint(0, VOCAB, (6,), generator=g).tolist()
    incremental = CachedDemonstrations(model)
    for d in demos:
        incremental.add(d)
    assert torch.allclose(incremental.score(other, options), cached.score(other, options), atol=1e-5)
    assert torch.allclose(cached.score(query, options), got, atol=1e-6)


def test_concatenated_icl_equals_transformers_loss(llama):
    hf, model = llama
    g = torch.Generator().manual_seed(2)
    demos = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 4)]
    query, options = [3, 4, 5], [[7], [8, 9, 10]]
    got = concatenated_scores(model, demos, query, options)
    prefix = [t for d in demos for t in d] + query
    expected = []
    with torch.no_grad():
        for o in options:
            labels = torch.tensor([[-100] * len(prefix) + o])
            expected.append(hf(input_ids=torch.tensor([prefix + o]), labels=labels).loss)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_empty_inputs_are_rejected(llama, t5):
    with pytest.raises(ConfigError):
        CachedDemonstrations(llama[1], [[1, 2], []])
    with pytest.raises(ConfigError):
        FiDICL(t5).encode_demonstrations([])
    with pytest.raises(ConfigError, match="queries"):
        CachedDemonstrations(llama[1], [[1, 2]]).score([], [[3]])


def test_one_cached_concatenated_prefix_equals_concatenation_icl(llama):
    """Prefix caching (all demonstrations as one cached segment) is exact concatenation ICL."""
    _, model = llama
    g = torch.Generator().manual_seed(3)
    demos = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 4)]
    query, options = [1, 2, 3], [[4], [5, 6]]
    prefix = CachedDemonstrations(model, [[t for d in demos for t in d]])
    assert torch.allclose(prefix.score(query, options), concatenated_scores(model, demos, query, options), atol=1e-5)


def test_many_queries_in_one_pass_equal_one_at_a_time(llama):
    _, model = llama
    g = torch.Generator().manual_seed(4)
    demos = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 8)]
    queries = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (2, 7, 4)]
    options = [[5], [6, 7, 8], [9, 10]]
    cached = CachedDemonstrations(model, demos)
    together = cached.score_many(queries, options)  # [3, 3]
    alone = torch.stack([cached.score(q, options) for q in queries])
    assert torch.allclose(together, alone, atol=1e-5)
    concat = concatenated_scores_many(model, demos, queries, options)
    assert torch.allclose(concat, torch.stack([concatenated_scores(model, demos, q, options) for q in queries]),
                          atol=1e-5)
