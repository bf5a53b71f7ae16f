"""Training reports on disk: the loss curve as a PNG (matplotlib, when installed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def plot_loss_curve(losses: Sequence[float], eval_losses: Sequence[tuple[int, float]], path: str | os.PathLike,
                    title: str = "training loss") -> Path | None:
    """Write the per-step training loss (and evaluation points) to `path`; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1.2, label="train (mean token loss per step)")
    if len(losses) >= 10:
        window = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, alpha=0.8, label=f"train, mean of {window} steps")
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", lw=1.5, label="eval")
    values = [v for v in (*losses, *(v for _, v in eval_losses)) if v > 0]
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")  # a loss falling by orders of magnitude is flat on a linear scale
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
