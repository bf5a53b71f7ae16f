"""A two-tower recommender trained online, with the users in a DynamicEmbedding (int64 ids, LRU eviction).

    .venv/bin/python examples/two_tower.py        # a minute or two on 2 CPU cores

Generated interactions (`compact_data.interaction_stream`): every day new users arrive with random 63-bit
ids and old ones leave, so the number of distinct ids keeps growing while the active set stays small. The user
tower is a table row per user id, the item tower a row per catalogue item; the score is their dot product and
the loss a softmax over the whole catalogue. Each day the model first predicts the day's interactions
(recall@10: is the item in the user's top 10?) and then trains on them, one pass.

The user table holds at most `capacity` ids; a new id is admitted once it has been seen `admit_after` times
and the least recently used id makes room. The fixed-table baseline (`--hashed`) hashes every id into the
same number of rows, so users share rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact_data import HashedEmbedding, Interactions, interaction_stream

from hayai.nn import DynamicEmbedding, RowAdam


class TwoTower(nn.Module):
    def __init__(self, users: nn.Module, num_items: int, dim: int):
        super().__init__()
        self.users = users
        self.items = nn.Embedding(num_items, dim)
        nn.init.normal_(self.items.weight, 0, 0.01)

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        return self.users(user_ids) @ self.items.weight.T  # [B, items]


def user_table(kind: str, capacity: int, dim: int, lr: float) -> nn.Module:
    if kind == "dynamic":
        return DynamicEmbedding(dim, capacity, admit_after=2, eviction="lru", optimizer=RowAdam(lr=lr), seed=0)
    return HashedEmbedding(capacity, dim)


def run(kind: str, data: Interactions, capacity: int, dim: int = 32, lr: float = 0.02, batch: int = 256,
        warmup_days: int = 3, seed: int = 0) -> dict:
    """Online training over the stream; recall@10 averaged over the days after `warmup_days`."""
    torch.manual_seed(seed)
    model = TwoTower(user_table(kind, capacity, dim, lr), data.num_items, dim)
    dense = [p for p in model.parameters()]  # the hashed table and the items (the dynamic rows train themselves)
    optimizer = torch.optim.Adam(dense, lr=lr)
    g = torch.Generator().manual_seed(seed)
    hits, total = 0, 0
    for day, (users, items) in enumerate(data.days):
        if day >= warmup_days:
            model.eval()
            with torch.no_grad():
                top = model(users).topk(10, dim=-1).indices  # [n, 10]
            hits += int((top == items[:, None]).any(-1).sum())
            total += len(items)
        model.train()
        for idx in torch.randperm(len(items), generator=g).split(batch):
            optimizer.zero_grad()
            F.cross_entropy(model(users[idx]), items[idx]).backward()
            optimizer.step()
            if isinstance(model.users, DynamicEmbedding):
                model.users.apply_gradients()
    table = model.users
    if isinstance(table, DynamicEmbedding):
        memory = table.memory_bytes()
        detail = {"resident_ids": table.size, "evictions": table.evictions}
    else:
        memory = table.table.weight.numel() * 4 * 3  # weights + Adam's two moments
        detail = {}
    return {"kind": kind, "recall@10": hits / max(1, total), "user_table_bytes": memory, "rows": capacity,
            "distinct_users": data.distinct_users, **detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=1500, help="user-table rows (both tables)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = interaction_stream(num_days=args.days)
    print(f"{data.distinct_users} distinct users over {args.days} days, {data.num_items} items, "
          f"user tables of {args.capacity} rows")
    for kind in ("dynamic", "hashed"):
        r = run(kind, data, args.capacity)
        extra = f", {r['resident_ids']} resident ids, {r['evictions']} evictions" if kind == "dynamic" else ""
        print(f"{kind:<8} recall@10 {r['recall@10']:.3f}  user table {r['user_table_bytes'] / 1e6:.2f} MB{extra}")


if __name__ == "__main__":
    main()
