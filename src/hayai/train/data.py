"""Training data: JSONL records -> token ids with loss labels -> (packed) batches.

Records, one JSON object per line (blank lines are ignored):
  chat          {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                (ShareGPT's {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} also reads)
  instruction   {"instruction": "...", "input": "..." (optional), "output": "..."}  (Alpaca; "response" too)
  completion    {"prompt": "...", "completion": "..."}
  raw text      {"text": "..."}

Prompt masking (instruction tuning, Ouyang et al. 2022; the QLoRA paper's `train_on_source=False`): the loss
covers only what the model should learn to write. A chat is rendered with the model's chat template and cut
into segments at each assistant turn; prompt segments get label -100 (ignored), assistant turns, including the
end-of-turn token, are trained. Instruction and completion records become a one-turn chat when the tokenizer
has a chat template, else an Alpaca-style prompt. Raw text is trained in full and ends with the EOS token.

A sequence of tokens t₀..t_n gives inputs t₀..t_{n-1} and labels t₁..t_n (label -100 where masked), so a
document never predicts the first token of the next one when sequences are packed.

Packing (as in T5, Raffel et al. 2020, and torchtune's PackedDataset): documents are concatenated into rows of
at most `seq_len` tokens; each keeps its own RoPE positions 0..len-1 and a block-diagonal causal mask stops
attention across documents, so a packed row computes exactly what separate rows would, without padding.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hayai.errors import DataError
from hayai.models.tokenizer import Tokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
_ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ---- records ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One training example before tokenization: a chat (`messages`) or raw `text`."""

    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    where: str = ""  # "file:line", for error messages

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the last assistant turn."""
        messages = list(self.messages or ())
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages

    @property
    def answer(self) -> str:
        """The last assistant turn (the reference answer for exact-match evaluation)."""
        for message in reversed(self.messages or ()):
            if message["role"] == "assistant":
                return message["content"]
        return ""


@dataclass
class LoadedData:
    """Records read from a file, and the bad lines that were skipped (line number, reason)."""

    records: list[Record]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    path: str = ""


def _string_field(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_messages(raw: Any, key: str, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {type(message).__name__}")
        if key == "conversations":  # ShareGPT
            role = _SHAREGPT_ROLES.get(str(message.get("from")))
            content = message.get("value")
            if role is None:
                raise DataError(f"{where}: {key}[{i}].from must be one of {sorted(_SHAREGPT_ROLES)}, "
                                f"got {message.get('from')!r}")
        else:
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: {key}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}] content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to learn")
    return tuple(messages)


def parse_record(obj: Any, where: str) -> Record:
    """One decoded JSON value -> a Record; DataError naming `where` and the field when it has no known shape."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj or "conversations" in obj:
        key = "messages" if "messages" in obj else "conversations"
        return Record(messages=_chat_messages(obj[key], key, where), where=where)
    if "instruction" in obj:
        answer_key = next((k for k in ("output", "response") if k in obj), None)
        if answer_key is None:
            raise DataError(f"{where}: an instruction record needs an 'output' (or 'response') field")
        instruction = _string_field(obj, "instruction", where)
        extra = _string_field(obj, "input", where, required=False) or ""
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Record(messages=({"role": "user", "content": user},
                                {"role": "assistant", "content": _string_field(obj, answer_key, where)}),
                      where=where)
    if "prompt" in obj:
        if "completion" not in obj:
            raise DataError(f"{where}: a prompt record needs a 'completion' field")
        return Record(messages=({"role": "user", "content": _string_field(obj, "prompt", where)},
                                {"role": "assistant", "content": _string_field(obj, "completion", where)}),
                      where=where)
    if "text" in obj:
        text = _string_field(obj, "text", where)
        if not text.strip():
            raise DataError(f"{where}: field 'text' is empty")
        return Record(text=text, where=where)
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(f"{where}: unknown record shape (keys: {keys}); expected 'messages', 'conversations', "
                    "'instruction' + 'output', 'prompt' + 'completion', or 'text'")


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False) -> LoadedData:
    """Read a JSONL data file. A bad line raises DataError "FILE:LINE: what is wrong", or with `skip_bad` is
    skipped and recorded in `LoadedData.skipped`."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .jsonl file") from None
    records: list[Record] = []
    skipped: list[tuple[int, str]] = []
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                records.append(parse_record(obj, where))
            except DataError as exc:
                if not skip_bad:
                    raise
                skipped.append((number, str(exc).removeprefix(f"{where}: ")))
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
    if not records:
        raise DataError(f"{path}: no usable records" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return LoadedData(records, skipped, str(path))


# ---- tokenization --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedExample:
    """Model inputs t₀..t_{n-1} and labels t₁..t_n (IGNORE_INDEX where the loss is masked)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def chat_segments(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, where: str = "") -> list[tuple[str, bool]]:
    """Render a chat with the model's template, cut into (text, trained) segments: each assistant turn as
    rendered (content, end-of-turn token, and whatever the template puts after it) is trained; the rest is
    prompt. Needs a template whose render of a conversation prefix is a prefix of the whole render."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render this conversation prefix by prefix, "
                            "so prompt tokens cannot be masked; use 'text' records instead")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if whole.startswith(done) and len(whole) > len(done):
        segments.append((whole[len(done):], False))
    return [(text, trained) for text, trained in segments if text]


def _alpaca_segments(messages: Sequence[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "assistant":
            instruction = "\n\n".join(pending)
            segments += [(_ALPACA_PROMPT.format(instruction=instruction), False), (message["content"] + eos, True)]
            pending = []
        else:
            pending.append(message["content"])
    return segments


def prompt_text(record: Record, tokenizer: Tokenizer) -> str:
    """The text a model is given to produce the record's last answer (chat template or Alpaca prompt)."""
    messages = record.prompt_messages
    if tokenizer.has_chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return _ALPACA_PROMPT.format(instruction="\n\n".join(m["content"] for m in messages))


def tokenize_record(record: Record, tokenizer: Tokenizer, max_length: int | None = None,
                    train_on_prompt: bool = False) -> TokenizedExample:
    """Token ids and loss labels for one record (see the module docstring); truncated to `max_length` inputs."""
    eos_token = tokenizer.config.eos_token or ""
    if record.text is not None:
        segments = [(record.text + eos_token, True)]
        add_special = True
    elif tokenizer.has_chat_template:
        segments = chat_segments(record.messages, tokenizer, record.where)
        add_special = False
    else:
        segments = _alpaca_segments(record.messages, eos_token)
        add_special = True
    tokens: list[int] = []
    trained: list[bool] = []
    for index, (text, is_trained) in enumerate(segments):
        ids = tokenizer.encode(text, add_special_tokens=add_special and index == 0)
        tokens += ids
        trained += [is_trained or train_on_prompt] * len(ids)
    if max_length is not None:
        tokens, trained = tokens[: max_length + 1], trained[: max_length + 1]
    labels = tuple(t if keep else IGNORE_INDEX for t, keep in zip(tokens[1:], trained[1:], strict=True))
    return TokenizedExample(tuple(tokens[:-1]), labels)


@dataclass
class TokenizedData:
    examples: list[TokenizedExample]
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # examples with no loss token left (after truncation)


def tokenize_records(records: Iterable[Record], tokenizer: Tokenizer, max_length: int,
                     train_on_prompt: bool = False) -> TokenizedData:
    examples, truncated, dropped = [], 0, 0
    for record in records:
        full = tokenize_record(record, tokenizer, None, train_on_prompt)
        example = full
        if len(full) > max_length:
            truncated += 1
            example = TokenizedExample(full.input_ids[:max_length], full.labels[:max_length])
        if example.num_loss_tokens == 0:
            dropped += 1
            continue
        examples.append(example)
    return TokenizedData(examples, truncated, dropped)


# ---- rows, packing and batches ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One row of a batch: one document, or several packed ones (`documents` holds their lengths)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    documents: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Sequence[TokenizedExample], seq_len: int) -> list[Row]:
    """Concatenate examples, in order, into rows of at most `seq_len` tokens (greedy, next-fit)."""
    rows: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    docs: list[int] = []
    for example in examples:
        if len(example) > seq_len:
            raise DataError(f"an example of {len(example)} tokens is longer than the sequence length {seq_len}")
        if ids and len(ids) + len(example) > seq_len:
            rows.append(Row(tuple(ids), tuple(labels), tuple(docs)))
            ids, labels, docs = [], [], []
        ids += example.input_ids
        labels += example.labels
        docs.append(len(example))
    if ids:
        rows.append(Row(tuple(ids), tuple(labels), tuple(docs)))
    return rows


@dataclass
class Batch:
    """A batch of rows, right-padded to the longest.

    input_ids, labels, positions: [B, T]; mask: bool [B, 1, T, T] (True = may attend) for packed rows, None
    for one document per row (plain causal attention; padding comes last, so it is never attended to).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    num_tokens: int  # real (non-padding) input tokens
    num_loss_tokens: int  # labels != IGNORE_INDEX

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.positions), move(self.mask),
                     self.num_tokens, self.num_loss_tokens)


def block_diagonal_causal_mask(documents: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """bool [B, 1, T, T]: position i may attend to j iff j <= i and both lie in the same document (padding
    forms a document of its own, so every row attends to at least itself)."""
    segment = torch.full((len(documents), width), -1, dtype=torch.long)
    for b, lengths in enumerate(documents):
        segment[b, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (same & causal)[:, None]


def collate(rows: Sequence[Row], pad_id: int, packed: bool, width: int | None = None) -> Batch:
    """Rows right-padded to the longest, or to `width` when given (e.g. S²-Attn needs whole groups)."""
    width = max(width or 0, max(len(row) for row in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        positions[b, :n] = torch.cat([torch.arange(length) for length in row.documents])
        positions[b, n:] = torch.arange(width - n) + (row.documents[-1] if row.documents else 0)
    mask = block_diagonal_causal_mask([row.documents for row in rows], width) if packed else None
    return Batch(input_ids, labels, positions, mask, sum(len(r) for r in rows),
                 int((labels != IGNORE_INDEX).sum()))


class DataLoader:
    """Deterministic batches over epochs: each epoch shuffles the examples with `seed + epoch`, packs them (or
    not), and cuts the rows into batches (the last, smaller batch of an epoch is kept). Its position is
    `state_dict()` {"epoch", "batch"}, so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, examples: Sequence[TokenizedExample], *, batch_size: int, seq_len: int, pad_id: int,
                 packing: bool = True, shuffle: bool = True, seed: int = 0, fixed_width: bool = False) -> None:
        if not examples:
            raise DataError("no training examples")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.width = seq_len if fixed_width else None  # every batch padded to seq_len
        self.epoch = 0
        self.batch = 0
        self._rows_epoch: int | None = None
        self._rows: list[Row] = []

    def _epoch_rows(self, epoch: int) -> list[Row]:
        if self._rows_epoch != epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            ordered = [self.examples[i] for i in order]
            if self.packing:
                self._rows = pack(ordered, self.seq_len)
            else:
                self._rows = [Row(e.input_ids, e.labels, (len(e),)) for e in ordered]
            self._rows_epoch = epoch
        return self._rows

    def batches_per_epoch(self) -> int:
        return -(-len(self._epoch_rows(self.epoch)) // self.batch_size)

    def tokens_per_epoch(self) -> int:
        return sum(len(e) for e in self.examples)

    def next_batch(self) -> Batch:
        rows = self._epoch_rows(self.epoch)
        start = self.batch * self.batch_size
        if start >= len(rows):
            self.epoch, self.batch = self.epoch + 1, 0
            return self.next_batch()
        self.batch += 1
        return collate(rows[start: start + self.batch_size], self.pad_id, self.packing, self.width)

    def epoch_batches(self) -> list[Batch]:
        """Every batch of one pass in order, without moving the position (for evaluation)."""
        rows = self._epoch_rows(0) if not self.shuffle else self._epoch_rows(self.epoch)
        return [collate(rows[i: i + self.batch_size], self.pad_id, self.packing, self.width)
                for i in range(0, len(rows), self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
