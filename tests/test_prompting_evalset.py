"""The bundled evaluation sets are well formed; answer matching; question files with errors naming file and line.
The integration test checks that the default model scores clearly above zero on the bundled set."""

from __future__ import annotations

import collections

import pytest

from hayai.errors import DataError
from hayai.prompting.evalset import accuracy, is_correct, load_eval_set, load_sot_questions, normalize, read_jsonl


def test_bundled_eval_set_is_well_formed():
    items = load_eval_set()
    assert len(items) == 250 and len({i.id for i in items}) == 250
    per_task = collections.Counter((i.task, i.split) for i in items)
    for task in ("capitals", "arithmetic", "sentiment", "opposites", "facts"):
        assert per_task[(task, "train")] >= 15 and per_task[(task, "test")] >= 15
    assert all(i.answer for i in items)
    assert all(i.answer in i.options for i in items if i.options)
    assert {i.question for i in load_eval_set("train")}.isdisjoint(i.question for i in load_eval_set("test"))


def test_bundled_sot_questions_have_both_labels():
    items = load_sot_questions()
    labels = collections.Counter((i.split, i.extra["suits_sot"]) for i in items)
    assert len(items) == 80 and all(n >= 15 for n in labels.values()) and len(labels) == 4


@pytest.mark.parametrize("prediction,answers,ok", [
    (" Paris.", ["Paris"], True), ("paris\nQ: next", ["Paris"], True), ("The Pacific", ["the Pacific Ocean",
                                                                                         "Pacific"], True),
    ('"positive"', ["positive"], True), ("13", ["13"], True), ("130", ["13"], False), ("Paris, France", ["Paris"],
                                                                                      False),
    (None, ["x"], False), ("", ["x"], False),
])
def test_answer_matching(prediction, answers, ok):
    assert is_correct(prediction, answers) is ok


def test_normalize():
    assert normalize("  The Sun! ") == "sun" and normalize("A cow.") == "cow"


def test_question_files_and_their_errors(tmp_path):
    (tmp_path / "q.txt").write_text("first?\n\nsecond?\n")
    assert [i.question for i in read_jsonl(tmp_path / "q.txt")] == ["first?", "second?"]
    (tmp_path / "q.jsonl").write_text('{"question": "a?", "answer": 3}\n\n{"question": ""}\n')
    with pytest.raises(DataError, match=r"q\.jsonl, line 3: 'question'"):
        read_jsonl(tmp_path / "q.jsonl")
    (tmp_path / "r.jsonl").write_text('{"question": "a?"}\nnot json\n')
    with pytest.raises(DataError, match=r"r\.jsonl, line 2: not valid JSON"):
        read_jsonl(tmp_path / "r.jsonl")
    with pytest.raises(DataError, match=r"r\.jsonl, line 1: .*needs an 'answer'"):
        read_jsonl(tmp_path / "r.jsonl", need_answer=True)
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.integration
def test_default_model_scores_clearly_above_zero(default_llm):
    from hayai.prompting.backends import LocalBackend
    from hayai.prompting.frugal_cascade import Stage

    train = load_eval_set("train")
    exemplars = [(i.question, i.answer) for task in ("capitals", "arithmetic", "sentiment", "opposites", "facts")
                 for i in [x for x in train if x.task == task][:1]]
    test = load_eval_set("test")[::3]
    results = Stage(LocalBackend.of(default_llm), exemplars).answer([i.question for i in test])
    assert accuracy([r.text for r in results], test) >= 0.35
