"""Batch Prompting: the Q[i]/A[i] format, an index-keyed parser on adversarial outputs, retries of missing answers."""

from __future__ import annotations

import re

from prompting_helpers import RuleBackend

from hayai.prompting.batch_prompting import batch_prompt, format_batch_prompt, parse_batch_answers

EXEMPLARS = [("What is 1 + 1?", "2"), ("Capital of Italy?", "Rome"), ("Opposite of up?", "down")]


def test_prompt_format_batches_the_exemplars_too():
    prompt = format_batch_prompt(["Q one", "Q two"], EXEMPLARS, k=2)
    assert prompt == (
        "Q[1]: What is 1 + 1?\nQ[2]: Capital of Italy?\nA[1]: 2\nA[2]: Rome\n\n"
        "Q[1]: Opposite of up?\nA[1]: down\n\n"
        "Q[1]: Q one\nQ[2]: Q two\nA[1]:"
    )


def test_parser_in_order():
    assert parse_batch_answers("A[1]: x\nA[2]: y\nA[3]: z", 3) == ["x", "y", "z"]


def test_parser_missing_answers_are_none():
    assert parse_batch_answers("A[1]: x\nA[3]: z", 3) == ["x", None, "z"]
    assert parse_batch_answers("", 2) == [None, None]
    assert parse_batch_answers("A[1]:\nA[2]: y", 2) == [None, "y"]  # empty counts as missing


def test_parser_duplicates_keep_the_first():
    assert parse_batch_answers("A[1]: x\nA[2]: y\nA[1]: other\nA[2]: again", 2) == ["x", "y"]


def test_parser_reordered():
    assert parse_batch_answers("A[3]: z\nA[1]: x\nA[2]: y", 3) == ["x", "y", "z"]


def test_parser_indices_past_nine():
    text = "\n".join(f"A[{i}]: answer {i}" for i in range(1, 13))
    got = parse_batch_answers(text, 12)
    assert got == [f"answer {i}" for i in range(1, 13)]
    assert got[9] == "answer 10" and got[11] == "answer 12"  # a fixed-width slice would give "] answer 10"


def test_parser_ignores_out_of_range_and_noise():
    text = "A[0]: zero\nA[1]: x\nSome chatter\nQ[2]: repeated question\nA[2]: y\nA[7]: beyond"
    assert parse_batch_answers(text, 2) == ["x", "y"]


def test_parser_answers_on_one_line_and_spacing():
    assert parse_batch_answers("A[1]: Paris A[2]: 13 A [3] :  blue ", 3) == ["Paris", "13", "blue"]


def answer_all_but(skip: set[str]):
    """A rule backend answering each batched question with its own text reversed, except some."""

    def rule(prompt: str) -> str:
        last_block = prompt.rsplit("\n\n", 1)[-1]
        questions = re.findall(r"^Q\[(\d+)\]: (.*)$", last_block, flags=re.M)
        lines = [f"A[{i}]: {q[::-1]}" for i, q in questions if q not in skip or len(questions) == 1]
        return lines[0][len("A[1]:"):] + "\n" + "\n".join(lines[1:]) if lines and lines[0].startswith("A[1]:") \
            else "\n" + "\n".join(lines)

    return rule


def test_batch_prompt_maps_answers_and_retries_missing_alone():
    questions = [f"question {i}" for i in range(11)]
    backend = RuleBackend(answer_all_but({"question 2", "question 9"}))
    out = batch_prompt(backend, questions, EXEMPLARS, k=4)
    assert len(backend.calls) == 2 and len(backend.calls[0]) == 3  # 3 batches in one call, then the retries
    assert out.retried == [2, 9]
    assert [p.count("Q[") for p in backend.calls[1]] == [1 + 3, 1 + 3]  # K = 1: 3 exemplar groups + 1 question
    assert out.answers == [q[::-1] for q in questions]
    assert out.cost == sum(r.cost for r in out.results) and len(out.results) == 5


def test_batch_prompt_retry_answers_fill_in_and_silence_stays_none():
    backend = RuleBackend(lambda p: " same" if p.count("Q[") > 4 else " alone")
    out = batch_prompt(backend, ["a", "b", "c"], EXEMPLARS, k=3)
    assert out.answers == ["same", "alone", "alone"] and out.retried == [1, 2]
    silent = batch_prompt(RuleBackend(lambda p: " "), ["a", "b"], EXEMPLARS, k=2)
    assert silent.answers == [None, None] and silent.retried == [0, 1]
