"""Training data: JSONL parsing and its errors, prompt masking, packing, batches and loader position."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tinymodels import VOCAB, hf_llama, native_from

from hayai.errors import DataError
from hayai.models.tokenizer import Tokenizer
from hayai.train.data import (
    IGNORE_INDEX,
    DataLoader,
    Record,
    TokenizedExample,
    collate,
    pack,
    read_jsonl,
    tokenize_record,
    tokenize_records,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread (and the tests do not fight other processes for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer, tmp_path_factory):
    from tinymodels import write_hf_checkpoint

    from hayai.models.loading import load_tokenizer

    return load_tokenizer(write_hf_checkpoint(tmp_path_factory.mktemp("tok"), tiny_tokenizer))


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CHAT = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]}


def test_every_record_shape_reads(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        CHAT,
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Say hi", "response": "hi"},
        {"prompt": "p", "completion": "c"},
        "",
        {"text": "free text"},
    ])
    data = read_jsonl(path)
    assert len(data.records) == 6 and not data.skipped
    assert data.records[1].messages == ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
    assert data.records[2].messages[0]["content"] == "Add\n\n1 2" and data.records[2].answer == "3"
    assert data.records[3].answer == "hi" and data.records[4].answer == "c"
    assert data.records[5].text == "free text" and data.records[5].messages is None
    assert data.records[0].where == f"{path}:1" and data.records[5].where == f"{path}:7"


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"question": "q"}, "unknown record shape (keys: question)"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content must be"),
    ({"instruction": "x"}, "needs an 'output'"),
    ({"prompt": "x"}, "needs a 'completion'"),
    ({"text": "  "}, "'text' is empty"),
    ({"text": 5}, "'text' must be a string"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [CHAT, CHAT, line, CHAT])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_skip_bad_counts_and_reports_the_skipped_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [CHAT, "{oops", CHAT, {"x": 1}])
    data = read_jsonl(path, skip_bad=True)
    assert len(data.records) == 2
    assert [n for n, _ in data.skipped] == [2, 4]
    assert "not valid JSON" in data.skipped[0][1]
    with pytest.raises(DataError, match="no usable records"):
        read_jsonl(write_lines(tmp_path / "all-bad.jsonl", ["{", "{"]), skip_bad=True)
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def trained_text(example: TokenizedExample, tokenizer: Tokenizer) -> list[str]:
    """Decoded runs of consecutive trained labels."""
    runs, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_prompt_masking_trains_only_the_assistant_turns(tokenizer):
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Count to 3"},
                {"role": "assistant", "content": "1 2 3"})
    example = tokenize_record(Record(messages=messages), tokenizer)
    # Inputs and labels are the shifted token sequence of the whole rendered chat.
    full = tokenizer.encode(tokenizer.apply_chat_template(list(messages), add_generation_prompt=False),
                            add_special_tokens=False)
    assert list(example.input_ids) == full[:-1]
    assert [t if t != IGNORE_INDEX else None for t in example.labels] == \
        [t if lab != IGNORE_INDEX else None for t, lab in zip(full[1:], example.labels, strict=True)]
    assert trained_text(example, tokenizer) == ["Hi there<|im_end|>\n", "1 2 3<|im_end|>\n"]
    everything = tokenize_record(Record(messages=messages), tokenizer, train_on_prompt=True)
    assert IGNORE_INDEX not in everything.labels


def test_raw_text_is_trained_in_full_and_ends_with_eos(tokenizer):
    example = tokenize_record(Record(text="Hello world"), tokenizer)
    assert IGNORE_INDEX not in example.labels
    assert example.labels[-1] == tokenizer.token_to_id("<|im_end|>")


def test_truncation_and_examples_without_loss_tokens(tokenizer):
    long_prompt = Record(messages=({"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}))
    data = tokenize_records([long_prompt, Record(text="short")], tokenizer, max_length=16)
    assert data.truncated == 1 and data.dropped == 1  # the answer of the long one was cut away
    assert len(data.examples) == 1 and len(data.examples[0]) <= 16


def example(ids, trained_from=0):
    labels = [t if i >= trained_from else IGNORE_INDEX for i, t in enumerate(ids[1:])]
    return TokenizedExample(tuple(ids[:-1]), tuple(labels))


def test_pack_fills_rows_in_order_and_keeps_document_lengths():
    examples = [example(list(range(n + 1))) for n in (5, 4, 3, 7, 2)]
    rows = pack(examples, seq_len=10)
    assert [r.documents for r in rows] == [(5, 4), (3, 7), (2,)]
    assert rows[0].input_ids == tuple(range(5)) + tuple(range(4))
    with pytest.raises(DataError, match="longer than the sequence length"):
        pack([example(list(range(12)))], seq_len=10)


def test_packed_rows_give_each_document_the_loss_of_a_separate_run():
    model = native_from(hf_llama())
    torch.manual_seed(1)
    docs = [example(torch.randint(0, VOCAB, (n + 1,)).tolist(), trained_from=2) for n in (7, 5, 9)]
    batch = collate(pack(docs, seq_len=32), pad_id=0, packed=True)
    assert batch.mask.shape == (1, 1, 21, 21)
    with torch.no_grad():
        logits = model(batch.input_ids, positions=batch.positions, mask=batch.mask)[0]  # [T, V]
        packed_losses = F.cross_entropy(logits, batch.labels[0], reduction="none")
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc.input_ids]))[0]
            expected = F.cross_entropy(alone, torch.tensor(doc.labels), reduction="none")
            assert torch.allclose(packed_losses[start: start + len(doc)], expected, atol=1e-5)
            start += len(doc)
    # Without the block-diagonal mask the later documents would see the earlier ones: the test can fail.
    with torch.no_grad():
        leaky = F.cross_entropy(model(batch.input_ids, positions=batch.positions)[0], batch.labels[0],
                                reduction="none")
    assert not torch.allclose(leaky[7:12], packed_losses[7:12], atol=1e-3)


def test_collate_pads_right_and_counts_tokens():
    batch = collate([r for r in pack([example([1, 2, 3, 4]), example([5, 6])], seq_len=3)], pad_id=0, packed=False)
    assert batch.input_ids.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert batch.labels.tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.mask is None and batch.num_tokens == 4 and batch.num_loss_tokens == 4


def test_loader_is_deterministic_and_resumes_mid_epoch():
    examples = [example(list(range(i, i + 4))) for i in range(10)]

    def take(loader, n):
        return [b.input_ids.tolist() for b in (loader.next_batch() for _ in range(n))]

    a = DataLoader(examples, batch_size=3, seq_len=8, pad_id=0, packing=False, seed=5)
    straight = take(a, 9)  # crosses two epoch boundaries (4 batches per epoch)
    assert straight[:4] != straight[4:8]  # each epoch has its own order
    b = DataLoader(examples, batch_size=3, seq_len=8, pad_id=0, packing=False, seed=5)
    first = take(b, 5)
    state = b.state_dict()
    c = DataLoader(examples, batch_size=3, seq_len=8, pad_id=0, packing=False, seed=5)
    c.load_state_dict(state)
    assert first + take(c, 4) == straight
