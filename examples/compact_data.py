"""Small data sets for the compact/dynamic-network examples and `benchmarks/compact.py`; no downloads.

- `digits()`:            scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped inside the
                         scikit-learn package), split 80/20 with a fixed seed; `mixed_polarity_digits()` the
                         same images half inverted, shifted and noisy (a harder set for dynamic convolution).
- `skim_reviews()`:      generated "reviews" for LSTM-Jump: long neutral filler with one short opinion passage
                         at a random place; the label is the passage's polarity.
- `interaction_stream()`: generated user-item interactions over "days" for a two-tower recommender: users
                         with sparse int64 ids arrive and leave, items have latent topics and Zipf popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# ---- digits ----------------------------------------------------------------------------------------------------
def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train [N, 1, 8, 8], y_train [N], x_test, y_test), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def mixed_polarity_digits(seed: int = 0, noise: float = 0.05, test_copies: int = 4
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits drawn from two "domains": half the images are inverted (1 − x), every image is shifted by up to
    one pixel and gets Gaussian noise. Each test image appears `test_copies` times (alternating domains, fresh
    shift and noise), so the test set has 4x the examples of the plain split. A kernel that suits one domain
    is wrong for the other, which is where input-dependent (dynamic) kernels help."""
    x_train, y_train, x_test, y_test = digits(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def corrupt(x: torch.Tensor, inverted: torch.Tensor) -> torch.Tensor:
        x = torch.where(inverted[:, None, None, None], 1 - x, x)
        shifts = torch.randint(-1, 2, (len(x), 2), generator=g)
        x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2))
                         for img, (dy, dx) in zip(x, shifts, strict=True)])
        return x + noise * torch.randn(x.shape, generator=g)

    train_x = corrupt(x_train, torch.rand(len(x_train), generator=g) < 0.5)
    test_x = torch.cat([corrupt(x_test, torch.full((len(x_test),), c % 2 == 1)) for c in range(test_copies)])
    return train_x, y_train, test_x, y_test.repeat(test_copies)


# ---- skim reviews ----------------------------------------------------------------------------------------------
PAD = 0
FILLER = range(1, 301)  # neutral words
POSITIVE = range(301, 331)
NEGATIVE = range(331, 361)
SKIM_VOCAB = 361


@dataclass
class TextSet:
    tokens: torch.Tensor  # [N, T] padded with PAD
    lengths: torch.Tensor  # [N]
    labels: torch.Tensor  # [N] 0 = negative, 1 = positive

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int, generator: torch.Generator | None = None):
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), size):
            idx = order[start:start + size]
            yield self.tokens[idx], self.lengths[idx], self.labels[idx]


def skim_reviews(n: int, seed: int = 0, min_length: int = 80, max_length: int = 160, passage: int = 20,
                 density: float = 0.6, noise: float = 0.02) -> TextSet:
    """n reviews of min..max tokens. Filler words everywhere, except one `passage`-token opinion passage at a
    random position where a `density` fraction of the words carry the label's polarity; elsewhere a `noise`
    fraction of words are sentiment words of random polarity. A reader that finds the passage gets the label;
    one that reads a fixed prefix does not."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    tokens = torch.full((n, max_length), PAD, dtype=torch.long)
    filler = torch.tensor(list(FILLER))
    pos_words, neg_words = torch.tensor(list(POSITIVE)), torch.tensor(list(NEGATIVE))
    for i in range(n):
        length = int(lengths[i])
        doc = filler[torch.randint(0, len(filler), (length,), generator=g)]
        noisy = torch.rand(length, generator=g) < noise
        polarity = torch.rand(length, generator=g) < 0.5
        random_sentiment = torch.where(polarity, pos_words[torch.randint(0, 30, (length,), generator=g)],
                                       neg_words[torch.randint(0, 30, (length,), generator=g)])
        doc = torch.where(noisy, random_sentiment, doc)
        start = int(torch.randint(0, length - passage + 1, (1,), generator=g))
        words = pos_words if labels[i] == 1 else neg_words
        opinion = torch.rand(passage, generator=g) < density
        doc[start:start + passage] = torch.where(
            opinion, words[torch.randint(0, 30, (passage,), generator=g)], doc[start:start + passage])
        tokens[i, :length] = doc
    return TextSet(tokens, lengths, labels)


# ---- interactions ----------------------------------------------------------------------------------------------
@dataclass
class Interactions:
    days: list[tuple[torch.Tensor, torch.Tensor]]  # per day: (user ids int64 [n], item index [n])
    num_items: int
    distinct_users: int


def interaction_stream(num_days: int = 30, num_items: int = 1000, users_per_day: int = 600,
                       lifetime: int = 5, events_per_user: int = 8, topics: int = 20, temperature: float = 0.1,
                       popularity_exponent: float = 0.5, seed: int = 0) -> Interactions:
    """Users arrive every day with random 63-bit ids and stay active for 1 to 2·`lifetime` − 1 days; an active
    user interacts `events_per_user` times a day with items drawn from softmax(user·item / temperature +
    log popularity), where users and items are unit vectors near one of `topics` topic centres and popularity
    is Zipf-like (rank^−exponent)."""
    g = torch.Generator().manual_seed(seed)
    dim = 16
    centres = torch.nn.functional.normalize(torch.randn(topics, dim, generator=g), dim=-1)
    item_topic = torch.randint(0, topics, (num_items,), generator=g)
    items = torch.nn.functional.normalize(centres[item_topic] + 0.3 * torch.randn(num_items, dim, generator=g),
                                          dim=-1)
    popularity = 1.0 / torch.arange(1, num_items + 1).float() ** popularity_exponent
    popularity = popularity[torch.randperm(num_items, generator=g)]
    log_pop = popularity.log()
    active: list[tuple[int, torch.Tensor, int]] = []  # (id, latent, day it leaves)
    days = []
    distinct = 0
    for day in range(num_days):
        active = [u for u in active if u[2] > day]
        arrivals = users_per_day // lifetime if day else users_per_day
        for _ in range(arrivals):
            uid = int(torch.randint(0, 2**62, (1,), generator=g))
            topic = int(torch.randint(0, topics, (1,), generator=g))
            latent = torch.nn.functional.normalize(centres[topic] + 0.3 * torch.randn(dim, generator=g), dim=-1)
            leaves = day + int(torch.randint(1, 2 * lifetime, (1,), generator=g))
            active.append((uid, latent, leaves))
            distinct += 1
        users = torch.tensor([u[0] for u in active], dtype=torch.long)
        latents = torch.stack([u[1] for u in active])  # [U, dim]
        logits = latents @ items.T / temperature + log_pop  # [U, items]
        picks = torch.multinomial(torch.softmax(logits, -1), events_per_user, replacement=True, generator=g)
        days.append((users.repeat_interleave(events_per_user), picks.reshape(-1)))
    return Interactions(days, num_items, distinct)


class HashedEmbedding(torch.nn.Module):
    """The fixed baseline: an nn.Embedding of `num_buckets` rows indexed by a multiplicative hash of the id."""

    def __init__(self, num_buckets: int, dim: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.table = torch.nn.Embedding(num_buckets, dim)
        torch.nn.init.normal_(self.table.weight, 0, 0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mixed = (ids * 0x9E3779B1) ^ (ids >> 29)  # wraps around in int64, fine for bucketing
        return self.table(mixed.remainder(self.num_buckets))
