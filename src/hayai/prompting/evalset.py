"""The bundled evaluation sets, question files, and answer matching.

`data/eval_qa.jsonl`: 250 short-answer questions written for this project, in five tasks the default model
(SmolLM2-135M-Instruct) answers clearly above chance with a few exemplars: capital cities, one-step arithmetic,
review sentiment (two options), opposites and everyday facts. Each line:
`{"id", "split": "train"|"test", "task", "question", "answer", "aliases"?: [...], "options"?: [...]}`.
The train split supplies exemplars and the training data of FrugalGPT scorers; the test split is for evaluation.

`data/sot_questions.jsonl`: 80 questions labelled `suits_sot` — open-ended questions whose answer is a list of
independent points (true) versus arithmetic, code, single facts or creative writing (false) — for the
Skeleton-of-Thought router and the SoT benchmark.

Answers are compared by normalised exact match: first line, lowercased, surrounding quotes and punctuation and
a leading article removed; any alias counts.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hayai.errors import DataError


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str | None = None
    id: str = ""
    task: str = ""
    split: str = ""
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def answers(self) -> tuple[str, ...]:
        return ((self.answer,) if self.answer is not None else ()) + self.aliases


def _data_path(name: str) -> Path:
    return Path(str(resources.files("hayai.prompting") / "data" / name))


def read_jsonl(path: str | Path, *, need_answer: bool = False) -> list[QAItem]:
    """Questions from a JSONL file (or a plain text file with one question per line when not `.jsonl`)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if path.suffix not in (".jsonl", ".json"):
        return [QAItem(question=line.strip(), id=str(n)) for n, line in enumerate(lines, 1) if line.strip()]
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
        items.append(_item(obj, f"{path}, line {n}", need_answer))
    return items


def _item(obj: object, where: str, need_answer: bool) -> QAItem:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with a 'question' field")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string")
    if need_answer and answer is None:
        raise DataError(f"{where}: this command needs an 'answer' on every line")
    aliases, options = obj.get("aliases", []), obj.get("options", [])
    for name, value in (("aliases", aliases), ("options", options)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: '{name}' must be a list of strings")
    known = {"id", "split", "task", "question", "answer", "aliases", "options"}
    return QAItem(question=question, answer=None if answer is None else str(answer), id=str(obj.get("id", "")),
                  task=str(obj.get("task", "")), split=str(obj.get("split", "")), aliases=tuple(aliases),
                  options=tuple(options), extra={k: v for k, v in obj.items() if k not in known})


def load_eval_set(split: str | None = None, tasks: Iterable[str] | None = None) -> list[QAItem]:
    """The bundled short-answer set, optionally one split ("train"/"test") and some tasks."""
    items = read_jsonl(_data_path("eval_qa.jsonl"), need_answer=True)
    wanted = set(tasks) if tasks is not None else None
    return [i for i in items if (split is None or i.split == split) and (wanted is None or i.task in wanted)]


def load_sot_questions(split: str | None = None) -> list[QAItem]:
    """The bundled SoT questions; `item.extra["suits_sot"]` is the router label."""
    items = read_jsonl(_data_path("sot_questions.jsonl"))
    return [i for i in items if split is None or i.split == split]


_ARTICLE = re.compile(r"^(the|a|an)\s+")
_STRIP = string.punctuation + string.whitespace + "“”‘’"


def normalize(text: str) -> str:
    lines = text.strip().splitlines()
    text = lines[0] if lines else ""
    text = text.strip(_STRIP).lower()
    return _ARTICLE.sub("", text).strip(_STRIP)


def is_correct(prediction: str | None, answers: Sequence[str]) -> bool:
    if prediction is None:
        return False
    got = normalize(prediction)
    return any(got == normalize(a) for a in answers)


def accuracy(predictions: Sequence[str | None], items: Sequence[QAItem]) -> float:
    if not items:
        return 0.0
    return sum(is_correct(p, i.answers) for p, i in zip(predictions, items, strict=True)) / len(items)
