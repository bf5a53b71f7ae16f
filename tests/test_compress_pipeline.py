"""deep_compress: stage sizes as the paper counts them, quality after each stage, lossless Huffman stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hayai.compress import SharedLinear, deep_compress
from hayai.compress.huffman import relative_sparse_counts
from hayai.compress.pipeline import pruned_bytes, shared_bytes
from hayai.compress.weight_sharing import share_weight


def data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x, y


def trained_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))
    fit(model, steps=60)
    return model


def fit(model, steps=15):
    x, y = data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def accuracy(model) -> float:
    x, y = data(seed=1)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_pipeline_reports_every_stage_and_keeps_quality():
    model = trained_mlp()
    base = accuracy(model)
    calls = []

    def retrain(m, stage):
        calls.append(stage)
        fit(m)

    report = deep_compress(model, sparsity=0.8, bits=4, prune_steps=2, retrain=retrain, quality=accuracy,
                           encode=True, verify=True)
    assert calls == ["prune", "prune", "share"]
    names = [s.name for s in report.stages]
    assert names == ["original", "pruned", "shared", "huffman"]
    sizes = [s.bytes for s in report.stages]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    assert report.stages[0].quality == pytest.approx(base)
    assert report.stages[2].quality > base - 0.1  # retrained: a small loss at most
    assert report.stages[3].quality == report.stages[2].quality  # Huffman coding is lossless
    assert report.stage("huffman").ratio > 8
    assert all(isinstance(model[i], SharedLinear) for i in (0, 2, 4))
    # the reported Huffman bytes are the encoded streams plus the fp32 codebooks
    for layer in report.layers:
        encoded = report.encoded[layer.name]
        sw = model[int(layer.name)].shared
        assert layer.huffman == encoded.nbytes + 4 * sw.centroids.numel()
        assert np.array_equal(encoded.decode(), sw.codes.numpy())
        assert sw().unique().numel() <= 16
    assert report.other_bytes == 4 * (48 + 48 + 4)  # the biases


def test_stage_sizes_by_hand():
    torch.manual_seed(0)
    w = torch.randn(32, 50)
    w[w.abs() < 1.0] = 0  # about 68% zeros
    index_bits, size = pruned_bytes(w)
    flags = (w.flatten() != 0).to(torch.uint8).numpy()
    entries, _, _ = relative_sparse_counts(flags, 0, index_bits, 2)
    assert size == math.ceil(entries * (32 + index_bits) / 8)
    for b in range(1, 9):  # the chosen width is the cheapest
        e, _, _ = relative_sparse_counts(flags, 0, b, 2)
        assert size <= math.ceil(e * (32 + b) / 8)
    sw = share_weight(w, 3)  # 7 centroids + the zero code -> 3-bit codes
    index_bits, size = shared_bytes(sw)
    codes = sw.codes.flatten().numpy().astype(np.int64)
    entries, _, _ = relative_sparse_counts(codes, 0, index_bits, 8)
    assert size == math.ceil(entries * (3 + index_bits) / 8) + 7 * 4
    dense = share_weight(torch.randn(10, 10), 4)  # no zeros: dense 4-bit codes + 16 fp32 centroids
    assert shared_bytes(dense) == (0, 50 + 64)


def test_zero_sparsity_is_sharing_only():
    model = trained_mlp()
    report = deep_compress(model, sparsity=0.0, bits=5)
    assert report.stage("pruned").bytes == report.stage("original").bytes
    # dense 5-bit codes plus 32 fp32 centroids per layer; the biases at full size
    expected = report.other_bytes + sum(math.ceil(n * 5 / 8) + 32 * 4 for n in (16 * 48, 48 * 48, 48 * 4))
    assert report.stage("shared").bytes == expected
