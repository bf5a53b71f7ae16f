"""Weight sharing: k-means against scikit-learn, at most 2^bits values, summed centroid gradients, modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hayai.compress.pruning import MagnitudePruner
from hayai.compress.weight_sharing import (
    SharedConv,
    SharedEmbedding,
    SharedLinear,
    SharedWeight,
    assign_to_centroids,
    initial_centroids,
    kmeans_1d,
    share_weight,
    share_weights,
    unshare_weights,
)


def test_linear_init_spans_min_to_max():
    v = torch.tensor([-2.0, 0.1, 0.3, 4.0])
    assert initial_centroids(v, 4).tolist() == pytest.approx([-2.0, 0.0, 2.0, 4.0])


def test_kmeans_matches_scikit_learn_lloyd_from_the_same_init():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    torch.manual_seed(0)
    values = torch.cat([torch.randn(3000) * 0.05, torch.randn(200) * 0.5 + 1.0])
    centroids, _ = kmeans_1d(values, 8)
    init = initial_centroids(values, 8).numpy().reshape(-1, 1)
    km = sklearn_cluster.KMeans(8, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=300)
    km.fit(values.double().numpy().reshape(-1, 1))
    np.testing.assert_allclose(np.sort(km.cluster_centers_.ravel()), centroids.numpy(), rtol=0, atol=1e-9)


def test_kmeans_fixed_point_nearest_centroid_and_means():
    torch.manual_seed(1)
    values = torch.randn(5000)
    centroids, assignment = kmeans_1d(values, 16)
    distances = (values.double()[:, None] - centroids[None, :]).abs()
    assert torch.equal(distances.argmin(1), assignment)  # brute-force nearest
    for k in range(16):
        members = values.double()[assignment == k]
        if members.numel():
            assert float(members.mean()) == pytest.approx(float(centroids[k]), abs=1e-12)
    assert torch.equal(assign_to_centroids(values, centroids), assignment)


@pytest.mark.parametrize("bits", [1, 2, 4, 5])
@pytest.mark.parametrize("pruned", [False, True])
def test_at_most_2_pow_bits_values_and_zeros_kept(bits, pruned):
    torch.manual_seed(bits)
    layer = nn.Linear(64, 48)
    if pruned:
        MagnitudePruner(layer).prune(0.7)
    zeros = layer.weight == 0
    shared = share_weight(layer.weight, bits)
    dense = shared()
    assert dense.unique().numel() <= 2**bits
    assert shared.num_codes <= 2**bits
    assert torch.equal(dense == 0, zeros) if pruned else not bool(zeros.any())
    assert shared.has_zero == pruned
    # every nonzero weight takes the value of its nearest centroid
    nonzero = layer.weight.detach() != 0
    table = shared.table().detach().double()
    nearest = (layer.weight.detach()[nonzero].double()[:, None] - table[None, int(pruned):]).abs().argmin(1)
    torch.testing.assert_close(dense.detach()[nonzero], table[int(pruned):][nearest].float())


def test_centroid_gradient_is_the_sum_over_its_cluster():
    torch.manual_seed(2)
    layer = nn.Linear(20, 10)
    MagnitudePruner(layer).prune(0.5)
    shared = share_weight(layer.weight, 3)
    x = torch.randn(7, 20)
    shared_out = SharedLinear(shared, None)(x)
    shared_out.pow(2).sum().backward()
    dense = shared().detach().requires_grad_(True)
    nn.functional.linear(x, dense).pow(2).sum().backward()
    expected = torch.zeros(shared.num_codes, dtype=dense.grad.dtype).index_add_(
        0, shared.codes.flatten().long(), dense.grad.flatten())
    torch.testing.assert_close(shared.centroids.grad, expected[1:])  # code 0 is the frozen zero


def test_shared_modules_match_plain_modules():
    torch.manual_seed(3)
    for module, x in [
        (nn.Linear(9, 6), torch.randn(4, 9)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="reflect", groups=1), torch.randn(2, 3, 9, 9)),
        (nn.Conv1d(4, 8, 3, groups=2, dilation=2), torch.randn(2, 4, 15)),
        (nn.Embedding(30, 6), torch.randint(0, 30, (3, 5))),
    ]:
        model = nn.ModuleDict({"m": module})
        share_weights(model, 3)
        replaced = model["m"]
        assert isinstance(replaced, SharedLinear | SharedConv | SharedEmbedding)
        with torch.no_grad():
            module.weight.copy_(replaced.shared())
        torch.testing.assert_close(replaced(x), module(x))


def test_tied_weights_share_one_codebook_and_unshare_restores_the_tie():
    torch.manual_seed(4)
    emb = nn.Embedding(40, 8)
    head = nn.Linear(8, 40, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"embed": emb, "head": head})
    out = share_weights(model, 4)
    assert list(out) == ["embed"]
    assert model["embed"].shared is model["head"].shared
    ids = torch.tensor([[1, 5, 39]])
    h = model["embed"](ids)
    logits = model["head"](h)
    assert unshare_weights(model) == 2
    assert model["embed"].weight is model["head"].weight
    torch.testing.assert_close(model["head"](model["embed"](ids)), logits)


def test_fine_tuning_changes_centroids_not_codes_and_keeps_zeros():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    MagnitudePruner(model).prune(0.6)
    shared = share_weights(model, 2, include=["0", "2"])
    codes = {k: v.codes.clone() for k, v in shared.items()}
    before = {k: v.centroids.detach().clone() for k, v in shared.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
    for name, sw in shared.items():
        assert torch.equal(sw.codes, codes[name])
        assert not torch.equal(sw.centroids.detach(), before[name])
        dense = sw()
        assert torch.equal(dense == 0, sw.codes == 0)
        assert dense.unique().numel() <= 4


def test_per_layer_bits_mapping_leaves_unmatched_layers_dense():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    out = share_weights(model, {"0": 3})
    assert list(out) == ["0"] and isinstance(model[1], nn.Linear)
    assert out["0"].codes.dtype == torch.uint8


def test_wide_codes_use_wider_storage():
    sw = SharedWeight(torch.zeros(1000), torch.zeros(5, dtype=torch.long), has_zero=False)
    assert sw.codes.dtype == torch.int16
