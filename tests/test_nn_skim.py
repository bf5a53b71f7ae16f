"""LSTM-Jump: K = 0 is a plain LSTM (nn.LSTM oracle), jump bookkeeping against a brute-force reader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.nn.skim import LSTMJump, SkimOutput, skim_loss


def model(read=3, max_jump=4, max_jumps=2, seed=0) -> LSTMJump:
    torch.manual_seed(seed)
    return LSTMJump(30, 8, 12, 3, read=read, max_jump=max_jump, max_jumps=max_jumps).double()


def lstm_oracle(m: LSTMJump, sequences: list[list[int]]) -> torch.Tensor:
    """Logits of the classifier on the last hidden state of an nn.LSTMCell (same weights) stepped over each
    token sequence, one token at a time."""
    cell = nn.LSTMCell(m.embedding.embedding_dim, m.hidden_size).double()
    with torch.no_grad():
        cell.weight_ih.copy_(m.rnn.weight_ih_l0)
        cell.weight_hh.copy_(m.rnn.weight_hh_l0)
        cell.bias_ih.copy_(m.rnn.bias_ih_l0)
        cell.bias_hh.copy_(m.rnn.bias_hh_l0)
    out = []
    for seq in sequences:
        h = c = torch.zeros(1, m.hidden_size, dtype=torch.float64)
        for token in seq:
            h, c = cell(m.embedding(torch.tensor([token])), (h, c))
        out.append(m.classifier(h[0]))
    return torch.stack(out)


def padded_batch(seed=1, batch=6, length=25):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (batch, length), generator=g)
    lengths = torch.tensor([25, 1, 13, 7, 0, 20][:batch])
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n:] = 0
    return tokens, lengths


def test_k_zero_reads_everything_and_equals_an_lstm():
    m = model(max_jump=0)
    tokens, lengths = padded_batch()
    out = m(tokens, lengths)
    assert torch.equal(out.tokens_read, lengths)
    assert out.read_fraction == 1.0 and out.decisions.numel() == 0
    seqs = [tokens[i, :n].tolist() for i, n in enumerate(lengths.tolist())]
    torch.testing.assert_close(out.logits, lstm_oracle(m, seqs))


def force_jump(m: LSTMJump, kappa: int) -> None:
    with torch.no_grad():
        m.jump_head.weight.zero_()
        m.jump_head.bias.fill_(-50.0)
        m.jump_head.bias[kappa] = 50.0


def expected_positions(length: int, read: int, kappa: int, max_jumps: int) -> list[int]:
    pos, jumps, out = 0, 0, []
    while True:
        for _ in range(read):
            if pos >= length:
                return out
            out.append(pos)
            pos += 1
        if kappa == 0 or jumps == max_jumps:
            return out
        pos += kappa
        jumps += 1


@pytest.mark.parametrize(("read", "kappa", "max_jumps"), [(3, 2, 2), (2, 4, 5), (4, 0, 3), (1, 1, 0), (3, 30, 2)])
def test_forced_jumps_read_exactly_the_brute_force_positions(read, kappa, max_jumps):
    m = model(read=read, max_jump=max(kappa, 1), max_jumps=max_jumps)
    force_jump(m, kappa)
    tokens, lengths = padded_batch()
    out = m(tokens, lengths, greedy=True, record=True)
    expected = [expected_positions(n, read, kappa, max_jumps) for n in lengths.tolist()]
    assert out.positions == expected
    assert out.tokens_read.tolist() == [len(p) for p in expected]
    seqs = [[int(tokens[i, p]) for p in ps] for i, ps in enumerate(expected)]
    torch.testing.assert_close(out.logits, lstm_oracle(m, seqs))


@pytest.mark.parametrize("seed", range(4))
def test_sampled_jumps_respect_n_and_the_read_budget(seed):
    m = model(read=2, max_jump=5, max_jumps=3, seed=seed).train()
    with torch.no_grad():
        m.jump_head.bias.zero_()
        m.jump_head.bias[0] = -3.0  # rarely stop, so N binds
    tokens, lengths = padded_batch(seed=seed)
    out = m(tokens, lengths, record=True)
    assert torch.all(out.jumps <= 3)
    assert torch.all(out.tokens_read <= (3 + 1) * 2)
    assert torch.all(out.tokens_read <= lengths)
    for ps, n in zip(out.positions, lengths.tolist(), strict=True):
        assert ps == sorted(set(ps)) and all(p < n for p in ps)
    assert torch.equal(out.decisions.sum(1) >= out.jumps, torch.ones_like(out.jumps, dtype=torch.bool))
    # N and R can change at test time
    short = m(tokens, lengths, max_jumps=0, read=4)
    assert torch.equal(short.tokens_read, lengths.clamp(max=4))


def test_batched_reading_equals_one_example_at_a_time():
    m = model(read=2, max_jump=6, max_jumps=4).eval()
    with torch.no_grad():
        m.jump_head.weight.mul_(20)  # a policy that depends on the text
    tokens, lengths = padded_batch()
    batched = m(tokens, lengths, record=True)
    for i in range(len(lengths)):
        single = m(tokens[i:i + 1], lengths[i:i + 1], record=True)
        assert single.positions[0] == batched.positions[i]
        torch.testing.assert_close(single.logits[0], batched.logits[i])
    assert len({len(p) for p in batched.positions}) > 2  # the examples did read differently


def test_greedy_in_eval_is_deterministic():
    m = model(read=2, max_jump=6, max_jumps=4).eval()
    tokens, lengths = padded_batch()
    a, b = m(tokens, lengths, record=True), m(tokens, lengths, record=True)
    assert a.positions == b.positions


def test_skim_loss_by_hand():
    out = SkimOutput(
        logits=torch.tensor([[2.0, 0.0], [2.0, 0.0]]), tokens_read=torch.tensor([3, 3]),
        lengths=torch.tensor([9, 9]), jumps=torch.tensor([1, 0]),
        log_probs=torch.tensor([[-0.5, -1.0], [-0.2, 0.0]], requires_grad=True),
        baselines=torch.tensor([[0.5, 0.2], [0.1, 0.0]], requires_grad=True),
        decisions=torch.tensor([[True, True], [True, False]]))
    labels = torch.tensor([0, 1])  # first correct (r = +1), second wrong (r = −1)
    loss = skim_loss(out, labels)
    assert loss.reward.tolist() == [1.0, -1.0]
    reinforce = -((-0.5) * 0.5 + (-1.0) * 0.8 + (-0.2) * (-1.1)) / 2
    baseline = ((0.5**2 + 0.8**2) + 1.1**2) / 2
    assert float(loss.reinforce.detach()) == pytest.approx(reinforce)
    assert float(loss.baseline.detach()) == pytest.approx(baseline)
    loss.total.backward()
    # the policy gradient raises log p of the decisions of the rewarded episode, lowers the other's
    assert out.log_probs.grad[0, 0] < 0 and out.log_probs.grad[1, 0] > 0
    assert out.log_probs.grad[1, 1] == 0  # not a decision


def test_training_moves_the_policy():
    m = LSTMJump(30, 8, 12, 2, read=2, max_jump=3, max_jumps=3).train()
    tokens, lengths = padded_batch()
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    before = m.jump_head.weight.detach().clone()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = skim_loss(m(tokens, lengths), labels)
    loss.total.backward()
    assert m.baseline.weight.grad is not None and m.jump_head.weight.grad is not None
    optimizer.step()
    assert not torch.equal(before, m.jump_head.weight)
