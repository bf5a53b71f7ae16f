"""DynamicEmbedding: stable rows, admission, LRU/LFU against a reference simulation, optimizer state that
follows the rows (torch.optim oracles), fresh rows on re-admission, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError, CorruptFileError
from hayai.nn.dynamic_embedding import DEFAULT_ROW, DynamicEmbedding, RowAdagrad, RowAdam, RowSGD


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


def step(table: DynamicEmbedding, batch: torch.Tensor) -> torch.Tensor:
    """One training step with a loss that touches every looked-up row."""
    out = table(batch)
    out.pow(2).sum().backward()
    table.apply_gradients()
    return out.detach()


def test_ids_map_to_stable_rows_and_unknown_ids_use_the_default_row():
    table = DynamicEmbedding(4, capacity=10, optimizer=RowSGD(lr=0.1))
    huge = 2**62 + 12345
    first = table.lookup_rows(ids(7, huge, -3, 7))
    assert first[0] == first[3] and len(set(first.tolist())) == 3 and DEFAULT_ROW not in first.tolist()
    again = table.lookup_rows(ids(-3, huge, 7))
    assert again.tolist() == [first[2], first[1], first[0]]
    table.eval()
    with torch.no_grad():
        assert table.lookup_rows(ids(999)).tolist() == [DEFAULT_ROW]
        assert torch.equal(table(ids(999)), torch.zeros(1, 4))
        assert table.size == 3  # eval lookups admit nothing
    assert table(ids(7, 8)).shape == (2, 4)


def test_admission_after_n_sightings_counts_within_and_across_batches():
    table = DynamicEmbedding(3, capacity=10, admit_after=3)
    assert table.lookup_rows(ids(5, 6)).tolist() == [0, 0]
    assert table.lookup_rows(ids(5, 6, 6)).tolist()[2] != 0  # 6 seen 3 times now; 5 only twice
    assert table.rows_of(ids(5)).tolist() == [0] and table.rows_of(ids(6)).tolist() != [0]
    assert table.lookup_rows(ids(5)).tolist() != [0]
    assert table.size == 2


class Reference:
    """Plain-Python model of the documented policy: admission threshold, score order, batch protection."""

    def __init__(self, capacity, admit_after, policy):
        self.capacity, self.admit_after, self.policy = capacity, admit_after, policy
        self.resident: dict[int, list[int]] = {}  # id -> [count, last]
        self.candidates: dict[int, int] = {}
        self.clock = 0

    def batch(self, values):
        self.clock += 1
        counts: dict[int, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        new = []
        for v, c in counts.items():
            if v in self.resident:
                self.resident[v][0] += c
                self.resident[v][1] = self.clock
            else:
                total = self.candidates.get(v, 0) + c
                if total >= self.admit_after:
                    new.append((v, total))
                else:
                    self.candidates[v] = total
        new.sort(key=lambda vc: (-vc[1], vc[0]))
        for v, total in new:
            self.candidates.pop(v, None)
            if len(self.resident) >= self.capacity:
                movable = [k for k in self.resident if k not in counts]
                if not movable:
                    self.candidates[v] = total
                    continue
                key = (lambda k: (self.resident[k][1], k)) if self.policy == "lru" else \
                    (lambda k: (self.resident[k][0], self.resident[k][1], k))
                del self.resident[min(movable, key=key)]
            self.resident[v] = [total, self.clock]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("admit_after", [1, 2])
def test_eviction_follows_the_policy_and_the_capacity(policy, admit_after):
    capacity = 12
    table = DynamicEmbedding(2, capacity, admit_after=admit_after, eviction=policy, optimizer=RowSGD())
    ref = Reference(capacity, admit_after, policy)
    g = torch.Generator().manual_seed(0)
    for t in range(60):
        hot = torch.randint(0, 6, (3,), generator=g)  # a few frequent ids
        drift = torch.randint(10 + t, 30 + t, (5,), generator=g)  # a moving crowd of rare ones
        batch = torch.cat([hot, drift])
        step(table, batch)
        ref.batch(batch.tolist())
        assert table.size <= capacity
        assert sorted(table.resident_ids().tolist()) == sorted(ref.resident), f"batch {t}"
    assert table.evictions > 0
    assert table._values.shape[0] <= capacity + 1  # storage never beyond capacity + the default row


def test_rows_of_the_current_batch_and_pending_gradients_are_not_evicted():
    table = DynamicEmbedding(2, capacity=3)
    out = table(ids(1, 2, 3))  # gradient pending on 1, 2, 3
    table(ids(4))  # no row can be freed: 4 falls back to the default row
    assert table.rows_of(ids(4)).tolist() == [DEFAULT_ROW]
    out.sum().backward()
    table.apply_gradients()
    table(ids(4, 1))  # now 2 (least recently used, smaller id than 3) goes
    assert sorted(table.resident_ids().tolist()) == [1, 3, 4]


def test_readmitted_id_gets_a_fresh_row_and_fresh_optimizer_state():
    table = DynamicEmbedding(3, capacity=2, optimizer=RowAdam(lr=0.1), seed=3)
    for _ in range(3):
        step(table, ids(10, 11))
    trained = table(ids(10)).detach()
    table.discard_gradients()
    assert int(table.optimizer_state(ids(10))["steps"]) == 3
    step(table, ids(12, 13))  # evicts 10 and 11
    assert 10 not in table.resident_ids().tolist()
    row = int(table.lookup_rows(ids(10)))
    fresh = table._values[row].clone()
    assert not torch.allclose(fresh, trained[0])
    assert float(fresh.abs().max()) < 0.1  # drawn from N(0, init_std²), not the trained vector
    state = table.optimizer_state(ids(10))
    assert int(state["steps"]) == 0
    assert torch.all(state["exp_avg"] == 0) and torch.all(state["exp_avg_sq"] == 0)


def dense_twin(table: DynamicEmbedding, vocab: int) -> nn.Embedding:
    with torch.no_grad():
        table.lookup_rows(torch.arange(vocab))  # admit every id
    dense = nn.Embedding(vocab, table.embedding_dim)
    with torch.no_grad():
        dense.weight.copy_(table._values[table.rows_of(torch.arange(vocab))])
    return dense


def targets(vocab, dim, seed):
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def test_row_adagrad_matches_torch_adagrad_on_partial_batches():
    vocab, dim = 20, 5
    table = DynamicEmbedding(dim, capacity=vocab, optimizer=RowAdagrad(lr=0.3, initial_accumulator_value=0.1))
    dense = dense_twin(table, vocab)
    opt = torch.optim.Adagrad(dense.parameters(), lr=0.3, initial_accumulator_value=0.1)
    goal = targets(vocab, dim, 0)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        batch = torch.randint(0, vocab, (7,), generator=g)  # repeats and untouched rows
        (table(batch) - goal[batch]).pow(2).sum().backward()
        table.apply_gradients()
        opt.zero_grad()
        (dense(batch) - goal[batch]).pow(2).sum().backward()
        opt.step()
    table.eval()
    with torch.no_grad():
        torch.testing.assert_close(table(torch.arange(vocab)), dense.weight)


def test_row_adam_matches_torch_adam_when_every_row_is_touched():
    vocab, dim = 6, 4
    table = DynamicEmbedding(dim, capacity=vocab, optimizer=RowAdam(lr=0.05, weight_decay=0.01))
    dense = dense_twin(table, vocab)
    opt = torch.optim.Adam(dense.parameters(), lr=0.05, weight_decay=0.01)
    goal = targets(vocab, dim, 2)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        batch = torch.cat([torch.randperm(vocab, generator=g), torch.randint(0, vocab, (3,), generator=g)])
        (table(batch) - goal[batch]).pow(2).sum().backward()
        table.apply_gradients()
        opt.zero_grad()
        (dense(batch) - goal[batch]).pow(2).sum().backward()
        opt.step()
    table.eval()
    with torch.no_grad():
        torch.testing.assert_close(table(torch.arange(vocab)), dense.weight)


def test_untouched_rows_and_their_state_do_not_change():
    table = DynamicEmbedding(3, capacity=10, optimizer=RowAdam(lr=0.1))
    step(table, ids(1, 2))
    before = table(ids(1)).detach(), table.optimizer_state(ids(1))
    table.discard_gradients()
    for _ in range(3):
        step(table, ids(2, 3))
    table.eval()
    with torch.no_grad():
        assert torch.equal(table(ids(1)), before[0])
    after = table.optimizer_state(ids(1))
    assert all(torch.equal(after[k], before[1][k]) for k in after)


def train_a_bit(table, seed, steps=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step(table, torch.randint(0, 40, (10,), generator=g) * 7919)


@pytest.mark.parametrize("optimizer", [RowAdam(lr=0.05), RowAdagrad(lr=0.1), RowSGD(lr=0.1)])
def test_save_load_round_trip_continues_identically(tmp_path, optimizer):
    table = DynamicEmbedding(4, capacity=15, admit_after=2, eviction="lfu", optimizer=optimizer, seed=7)
    train_a_bit(table, 0)
    table.save(tmp_path / "table.safetensors")
    loaded = DynamicEmbedding.load(tmp_path / "table.safetensors")
    assert loaded.size == table.size and loaded.clock == table.clock
    assert torch.equal(loaded.resident_ids(), table.resident_ids())
    train_a_bit(table, 1)
    train_a_bit(loaded, 1)  # same admissions, evictions, fresh rows (generator state) and updates
    assert torch.equal(loaded.resident_ids(), table.resident_ids())
    table.eval(), loaded.eval()
    with torch.no_grad():
        probe = table.resident_ids()
        assert torch.equal(loaded(probe), table(probe))


def test_state_dict_of_a_model_holding_tables(tmp_path):
    model = nn.ModuleDict({"user": DynamicEmbedding(3, capacity=8), "item": DynamicEmbedding(3, capacity=8)})
    train_a_bit(model["user"], 2)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = nn.ModuleDict({"user": DynamicEmbedding(3, capacity=8), "item": DynamicEmbedding(3, capacity=8)})
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=False))
    fresh.eval(), model.eval()
    with torch.no_grad():
        probe = model["user"].resident_ids()
        assert torch.equal(fresh["user"](probe), model["user"](probe))
    wrong = nn.ModuleDict({"user": DynamicEmbedding(5, capacity=8), "item": DynamicEmbedding(3, capacity=8)})
    with pytest.raises(CorruptFileError, match="embedding_dim"):
        wrong.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=False))


def test_memory_grows_with_ids_and_is_bounded():
    table = DynamicEmbedding(8, capacity=100, initial_rows=4)
    start = table.memory_bytes()
    table.lookup_rows(torch.arange(50))
    middle = table.memory_bytes()
    table.lookup_rows(torch.arange(50, 1000))
    assert start < middle < table.memory_bytes()
    assert table._values.shape[0] == 101


def test_bad_configuration_and_files(tmp_path):
    with pytest.raises(ConfigError):
        DynamicEmbedding(4, capacity=0)
    with pytest.raises(ConfigError):
        DynamicEmbedding(4, capacity=4, eviction="fifo")
    with pytest.raises(ConfigError):
        DynamicEmbedding(4, capacity=4)(torch.tensor([1.5]))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CorruptFileError):
        DynamicEmbedding.load(tmp_path / "junk.safetensors")
