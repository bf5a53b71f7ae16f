"""LSTM-Jump on generated reviews: find the one opinion passage in long filler text, read less than half.

    .venv/bin/python examples/lstm_jump.py [THREADS]       # about five minutes on 2 CPU cores

Reviews of 80-160 tokens hide a 20-token opinion passage at a random place (`compact_data.skim_reviews`).
A plain LSTM (the same module with K = 0) reads everything. LSTM-Jump reads R = 4 tokens, then jumps up to
K = 15 tokens, at most N = 9 times: it can read at most 40 tokens (a third of an average review), so it
must learn where to look. It starts from the plain LSTM's weights and trains the jump policy with REINFORCE
(reward ±1, learned baseline) next to the cross-entropy; jumps are greedy at test time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact_data import SKIM_VOCAB, TextSet, skim_reviews

from hayai.nn import LSTMJump, skim_loss


def make(max_jump: int, read: int = 4, max_jumps: int = 9, seed: int = 0) -> LSTMJump:
    torch.manual_seed(seed)
    return LSTMJump(SKIM_VOCAB, 32, 64, 2, read=read, max_jump=max_jump, max_jumps=max_jumps)


def train(model: LSTMJump, data: TextSet, epochs: int, lr: float = 3e-3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for tokens, lengths, labels in data.batches(64, g):
            optimizer.zero_grad()
            skim_loss(model(tokens, lengths), labels).total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
    model.eval()


@torch.no_grad()
def evaluate(model: LSTMJump, data: TextSet) -> tuple[float, float]:
    """(accuracy, fraction of tokens read) with greedy jumps."""
    model.eval()
    correct, read, total = 0, 0, 0
    for tokens, lengths, labels in data.batches(256):
        out = model(tokens, lengths)
        correct += int((out.logits.argmax(-1) == labels).sum())
        read += int(out.tokens_read.sum())
        total += int(lengths.sum())
    return correct / len(data), read / total


def run(train_size: int = 2000, test_size: int = 500, plain_epochs: int = 9, jump_epochs: int = 30,
        seed: int = 0) -> dict:
    """Train the plain LSTM (the last 2 epochs at a lower rate), then LSTM-Jump from its weights."""
    train_set, test_set = skim_reviews(train_size, seed), skim_reviews(test_size, seed + 1000)
    plain = make(max_jump=0, seed=seed)
    train(plain, train_set, max(1, plain_epochs - 2), seed=seed)
    train(plain, train_set, min(2, plain_epochs - 1), lr=1e-3, seed=seed + 1)
    jump = make(max_jump=15, seed=seed)
    jump.load_state_dict(plain.state_dict(), strict=False)  # embedding, LSTM and classifier
    train(jump, train_set, jump_epochs, lr=1e-3, seed=seed + 2)
    plain_acc, plain_read = evaluate(plain, test_set)
    jump_acc, jump_read = evaluate(jump, test_set)
    return {"plain_accuracy": plain_acc, "plain_read": plain_read, "jump_accuracy": jump_acc,
            "jump_read": jump_read, "plain": plain, "jump": jump, "test_set": test_set}


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))  # optional: threads
    r = run()
    print(f"plain LSTM  accuracy {100 * r['plain_accuracy']:.2f}%  tokens read {r['plain_read']:.1%}")
    print(f"LSTM-Jump   accuracy {100 * r['jump_accuracy']:.2f}%  tokens read {r['jump_read']:.1%}")


if __name__ == "__main__":
    main()
