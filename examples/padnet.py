"""PAD-Net: a small CNN whose convolutions are partially dynamic, partitioned by IMP before training.

    .venv/bin/python examples/padnet.py [THREADS]       # a few minutes on 2 CPU cores

Digits (8x8, scikit-learn's bundled set), half of them inverted, shifted and noisy
(`compact_data.mixed_polarity_digits`). The first convolution is static; the next two are
`PartiallyDynamicConv2d` with 4 kernels. Iterative Mode Partition scores every weight position on a few
batches and keeps the paper's default 30% dynamic; the attention temperature is annealed from 30 to 1 over
the first third of training, as in DY-Conv. Prints accuracy and the dynamic/static parameter counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact_data import mixed_polarity_digits

from hayai.compress.quality import accuracy
from hayai.nn import PartiallyDynamicConv2d, iterative_mode_partition, parameter_counts, set_temperature


class SmallCNN(nn.Module):
    """conv(1→c) static, then two 3x3 convolutions that are plain (`dynamic=False`) or PAD-Net layers."""

    def __init__(self, dynamic: bool, num_kernels: int = 4, width: int = 12):
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Module:
            if dynamic:
                return PartiallyDynamicConv2d(cin, cout, 3, padding=1, num_kernels=num_kernels, reduction=4)
            return nn.Conv2d(cin, cout, 3, padding=1)

        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = conv(width, 2 * width)
        self.conv3 = conv(2 * width, 2 * width)
        self.norm2, self.norm3 = nn.BatchNorm2d(2 * width), nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # [B, c, 8, 8]
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)  # [B, 2c, 4, 4]
        x = F.relu(self.norm3(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))  # [B, 10]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    anneal = max(1, epochs // 3)
    model.train()
    for epoch in range(epochs):
        set_temperature(model, max(1.0, 30.0 - 29.0 * epoch / anneal))
        for idx in torch.randperm(len(y), generator=g).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


def partition(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ratio: float | None, seed: int = 0) -> None:
    """IMP on 4 batches of 64 training examples (the official code samples 10 batches of 256)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:256].split(64)
    batches = [(x[i], y[i]) for i in idx]
    iterative_mode_partition(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), dynamic_ratio=ratio)


def run(kind: str, epochs: int = 15, seed: int = 0, ratio: float | None = None) -> dict:
    """kind: 'static' (plain convs), 'dynamic' (all positions dynamic) or 'pad' (IMP to `ratio`, default 0.3)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = mixed_polarity_digits(seed)
    model = SmallCNN(dynamic=kind != "static")
    if kind == "pad":
        partition(model, x_train, y_train, ratio, seed)
    train(model, x_train, y_train, epochs, seed)
    counts = parameter_counts(model)
    static = counts.static
    if kind == "static":  # plain convolutions: their weights are the static parameters
        static = model.conv2.weight.numel() + model.conv3.weight.numel()
    return {"kind": kind, "accuracy": accuracy(model, x_test, y_test), "dynamic_params": counts.dynamic,
            "static_params": static, "total_params": counts.total}


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))  # optional: threads
    for kind in ("static", "dynamic", "pad"):
        r = run(kind)
        print(f"{kind:<8} accuracy {100 * r['accuracy']:.2f}%  dynamic params {r['dynamic_params']:>6}  "
              f"static params {r['static_params']:>6}  total {r['total_params']:>6}")


if __name__ == "__main__":
    main()
