"""The data a bench run measures quality and speed on: the user's file, or the small sets bundled with hayai.

One file serves every suite:

- a JSONL file of training records (chat `messages`, instruction/output, prompt/completion, or `text`; the
  formats of `hayai.train.data`): perplexity is scored on the records rendered as the model sees them in
  training, generation prompts are the records' prompts (the first words of `text` records), and the finetune
  suite trains on the first 7/8 of the records and evaluates on the rest;
- any other file is read as plain UTF-8 text: perplexity is scored on it, the finetune suite trains on
  paragraph chunks of it, and generation uses the bundled prompts.

Without a file: `data/eval_text.jsonl` (ten short expository paragraphs written for hayai), `data/prompts.jsonl`
(four grounded prompts that quote their material, the case prompt lookup helps, and four open ones) and
`data/finetune.jsonl` (54 short question-answer chats).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hayai.errors import DataError
from hayai.train.data import Record, read_jsonl

DATA_DIR = Path(__file__).resolve().parent / "data"
EVAL_FRACTION = 1 / 8


@dataclass(frozen=True)
class Prompt:
    """A generation prompt: a record whose last user turn asks for the answer, or raw text to continue."""

    name: str
    kind: str  # "grounded" | "open" | "data"
    record: Record


@dataclass
class BenchData:
    source: str  # a path, or "bundled"
    perplexity_records: list[Record]
    prompts: list[Prompt]
    train_records: list[Record]
    eval_records: list[Record]
    notes: list[str] = field(default_factory=list)

    def select_prompts(self, count: int) -> list[Prompt]:
        """`count` prompts, alternating kinds (grounded, open, ...) so a short run still sees both."""
        by_kind: dict[str, list[Prompt]] = {}
        for p in self.prompts:
            by_kind.setdefault(p.kind, []).append(p)
        chosen: list[Prompt] = []
        while len(chosen) < min(count, len(self.prompts)):
            for group in by_kind.values():
                if group and len(chosen) < count:
                    chosen.append(group.pop(0))
        return chosen

    def write_finetune_files(self, directory: Path) -> tuple[Path, Path]:
        """The train and eval records as JSONL files (the finetune facade reads files)."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / "train.jsonl", directory / "eval.jsonl")
        for path, records in zip(paths, (self.train_records, self.eval_records), strict=True):
            with path.open("w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(record_json(r)) + "\n")
        return paths


def record_json(record: Record) -> dict:
    if record.text is not None:
        return {"text": record.text}
    return {"messages": [dict(m) for m in record.messages or ()]}


def _chat(text: str, where: str) -> Record:
    return Record(messages=({"role": "user", "content": text},), where=where)


def bundled_prompts() -> list[Prompt]:
    prompts = []
    path = DATA_DIR / "prompts.jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            obj = json.loads(line)
            prompts.append(Prompt(obj["name"], obj["kind"], _chat(obj["prompt"], f"{path}:{number}")))
    return prompts


def _split(records: list[Record]) -> tuple[list[Record], list[Record], list[str]]:
    if len(records) < 2:
        return records, records, ["only one record: the finetune suite evaluates on its training data"]
    n_eval = max(1, round(len(records) * EVAL_FRACTION))
    return records[:-n_eval], records[-n_eval:], []


def _text_chunks(text: str, words: int = 160) -> list[str]:
    """Paragraphs, with long ones cut into pieces of about `words` words."""
    chunks = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        tokens = paragraph.split()
        chunks += [" ".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]
    return [c for c in chunks if c]


def _prompts_from_records(records: list[Record]) -> list[Prompt]:
    prompts = []
    for i, r in enumerate(records):
        if r.messages and r.prompt_messages:
            prompts.append(Prompt(f"record {i + 1}", "data", r))
        elif r.text:
            words = r.text.split()
            if len(words) >= 8:
                head = " ".join(words[: max(4, len(words) * 3 // 5)])
                prompts.append(Prompt(f"record {i + 1}", "data", Record(text=head, where=r.where)))
    return prompts


def load_bench_data(path: str | os.PathLike | None = None) -> BenchData:
    """Read the user's data file (JSONL records or plain text), or the bundled sets; see the module docstring."""
    if path is None:
        text_records = read_jsonl(DATA_DIR / "eval_text.jsonl").records
        train, held_out, notes = _split(read_jsonl(DATA_DIR / "finetune.jsonl").records)
        return BenchData("bundled", text_records, bundled_prompts(), train, held_out, notes)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix.lower() == ".jsonl":
        records = read_jsonl(path).records
        prompts = _prompts_from_records(records) or bundled_prompts()
        train, held_out, notes = _split(records)
        if not _prompts_from_records(records):
            notes.append("no record has a prompt to answer or enough text to continue: generation uses the "
                         "bundled prompts")
        return BenchData(str(path), records, prompts, train, held_out, notes)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (give a .jsonl file of records or a plain text file)") from None
    chunks = _text_chunks(text)
    if not chunks:
        raise DataError(f"{path}: the file holds no text")
    records = [Record(text=c, where=f"{path}:chunk {i + 1}") for i, c in enumerate(chunks)]
    train, held_out, notes = _split(records)
    notes.append("plain text: generation uses the bundled prompts")
    return BenchData(str(path), records, bundled_prompts(), train, held_out, notes)
