"""Deep Compression of a small classifier: prune 90% with retraining, 5-bit weight sharing, Huffman coding.

    .venv/bin/python examples/deep_compression.py [THREADS]      # about a minute on 2 CPU cores

A LeNet-300-100-style MLP (64-300-100-10) on scikit-learn's bundled 8x8 digits. Pruning runs in three steps
(geometric schedule to 90%) with a short retraining after each; weight sharing uses 5 bits per layer and
fine-tunes the centroids; Huffman coding is lossless. Prints the size, ratio and test accuracy per stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact_data import digits

from hayai.compress import deep_compress
from hayai.compress.quality import accuracy


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3, seed: int = 0) -> None:
    """Adam over the parameters that require grad (after sharing: the centroids and biases)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


def compress_classifier(sparsity: float = 0.9, bits: int = 5, prune_steps: int = 3, epochs: int = 30,
                        retrain_epochs: int = 8, seed: int = 0):
    """Train the MLP, then Deep-Compress it; returns (baseline accuracy, report)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits(seed)
    model = mlp()
    train(model, x_train, y_train, epochs, seed=seed)

    def retrain(m: nn.Module, stage: str) -> None:
        train(m, x_train, y_train, retrain_epochs, lr=1e-3 if stage == "prune" else 3e-4, seed=seed + 1)

    report = deep_compress(model, sparsity=sparsity, bits=bits, prune_steps=prune_steps, retrain=retrain,
                           quality=lambda m: accuracy(m, x_test, y_test), verify=True)
    return report.stages[0].quality, report


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))  # optional: threads
    _, report = compress_classifier()
    print(f"{'stage':<9} {'size':>10} {'ratio':>7} {'test accuracy':>14}")
    for s in report.stages:
        print(f"{s.name:<9} {s.bytes / 1024:>8.1f}KB {s.ratio:>6.1f}x {100 * s.quality:>13.2f}%")
    for layer in report.layers:
        print(f"  {layer.name}: {tuple(layer.shape)}, {layer.nonzero / layer.numel:.0%} kept, {layer.codes} codes, "
              f"{layer.original} -> {layer.huffman} bytes")


if __name__ == "__main__":
    main()
