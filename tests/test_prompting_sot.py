"""Skeleton-of-Thought: skeleton parsing on adversarial outputs, one batched call for all expansions, assembly,
routing (prompt-based and a trained classifier on sentence embeddings), over a loopback OpenAI server too."""

from __future__ import annotations

import re

import pytest
from openai_stub_server import serve
from prompting_helpers import RuleBackend

from hayai.prompting.backends import OpenAIBackend
from hayai.prompting.evalset import load_sot_questions
from hayai.prompting.skeleton_of_thought import SkeletonOfThought, SoTPrompts, clean_expansion, parse_skeleton
from hayai.prompting.sot_router import EmbeddingRouter, PromptRouter, parse_router_choice


def test_skeleton_in_order():
    assert parse_skeleton("1. Sleep schedule\n2. Dark room\n3. No caffeine") == [
        (1, "Sleep schedule"), (2, "Dark room"), (3, "No caffeine")]


def test_skeleton_missing_index_keeps_the_numbers_given():
    assert parse_skeleton("1. A\n2. B\n4. D") == [(1, "A"), (2, "B"), (4, "D")]


def test_skeleton_duplicates_keep_the_first():
    assert parse_skeleton("1. A\n2. B\n2. B again\n1. A again\n3. C") == [(1, "A"), (2, "B"), (3, "C")]
    assert parse_skeleton("1. Sleep.\n2. Diet.\n3. sleep\n4. Rest.") == [(1, "Sleep."), (2, "Diet."), (4, "Rest.")]


def test_skeleton_reordered_points_are_sorted():
    assert parse_skeleton("3. C\n1. A\n2. B") == [(1, "A"), (2, "B"), (3, "C")]


def test_skeleton_past_ten_points_parses_two_digits_and_caps():
    text = "\n".join(f"{i}. point {i}" for i in range(1, 14))
    points = parse_skeleton(text, max_points=10)
    assert [i for i, _ in points] == list(range(1, 11))
    assert points[9] == (10, "point 10")
    assert parse_skeleton(text, max_points=20)[12] == (13, "point 13")


def test_skeleton_formats_and_trailing_prose():
    text = "Here is the skeleton:\n1) Exercise\n  2.  **Healthy food**\n- 3. Rest\n\nNow let me explain each point"
    assert parse_skeleton(text) == [(1, "Exercise"), (2, "Healthy food"), (3, "Rest")]
    assert parse_skeleton("No list at all.") == []
    assert parse_skeleton("1.\n2. B") == [(2, "B")]  # empty point dropped


def test_expansion_is_cut_where_the_next_point_starts():
    assert clean_expansion(" keeps you rested.\n2. Dark room: blocks light.") == "keeps you rested."
    assert clean_expansion(" costs 3.5 dollars a day.") == "costs 3.5 dollars a day."
    assert clean_expansion(" keeps you rested. 2. Dark room. 3. Quiet.") == "keeps you rested."


def sot_rule(prompt) -> str:
    """Skeleton requests get 3 points (continuing the "1." prefix); point requests get one sentence."""
    user, prefill = prompt[0]["content"], prompt[-1]["content"] if prompt[-1]["role"] == "assistant" else ""
    if "skeleton (not the full content)" in user:
        return " Regular schedule\n2. Dark room\n3. Less caffeine\nThen some prose"
    if "Continue and only continue" in user:
        return f": detail about {prefill.split('. ', 1)[1].lower()}.\n4. should be cut"
    if "Just say A, B, or C" in user:
        return "A" if "tips" in user else "C."
    return "A direct answer."


def test_sot_skeleton_then_all_points_in_one_call():
    backend = RuleBackend(sot_rule)
    answer = SkeletonOfThought(backend)("What are some tips for better sleep?")
    assert len(backend.calls) == 2 and len(backend.calls[1]) == 3
    skeleton_prompt = backend.calls[0][0]
    assert skeleton_prompt[-1] == {"role": "assistant", "content": "1."}
    assert "What are some tips for better sleep?" in skeleton_prompt[0]["content"]
    point_prompts = backend.calls[1]
    assert [p[-1]["content"] for p in point_prompts] == ["1. Regular schedule", "2. Dark room", "3. Less caffeine"]
    assert "1. Regular schedule\n2. Dark room\n3. Less caffeine" in point_prompts[1][0]["content"]
    assert "point 2" in point_prompts[1][0]["content"]
    assert answer.used_sot and answer.points == [(1, "Regular schedule"), (2, "Dark room"), (3, "Less caffeine")]
    assert answer.text == ("1. Regular schedule: detail about regular schedule.\n\n"
                           "2. Dark room: detail about dark room.\n\n"
                           "3. Less caffeine: detail about less caffeine.")
    assert answer.cost == pytest.approx(sum(r.cost for r in answer.results)) and len(answer.results) == 4


def test_sot_falls_back_to_normal_generation_without_a_skeleton():
    backend = RuleBackend(lambda p: "I cannot make a list." if "skeleton" in p[0]["content"] else "Plain answer.")
    answer = SkeletonOfThought(backend)("What is 2 + 2?")
    assert not answer.used_sot and answer.text == "Plain answer."
    assert len(backend.calls) == 2 and backend.calls[1] == [[{"role": "user", "content": "What is 2 + 2?"}]]


def test_prompt_router_gates_sot_per_question():
    backend = RuleBackend(sot_rule)
    sot = SkeletonOfThought(backend, router=PromptRouter(backend))
    tips, arithmetic = sot.answer_many(["What are some tips for better sleep?", "What is 17 times 23?"])
    assert tips.used_sot and not arithmetic.used_sot and arithmetic.text == "A direct answer."
    assert len(backend.calls[0]) == 2  # both routing questions in one call


@pytest.mark.parametrize("reply,choice", [("A", "A"), (" A.", "A"), ("Answer: B", "B"), ("C) no list", "C"),
                                          ("", None), ("Absolutely", None)])
def test_router_reply_parsing(reply, choice):
    assert parse_router_choice(reply) == choice


def test_embedding_router_learns_the_bundled_labels(tmp_path):
    router = EmbeddingRouter.from_items(load_sot_questions("train"))
    test = load_sot_questions("test")
    predicted = router([i.question for i in test])
    accuracy = sum(p == i.extra["suits_sot"] for p, i in zip(predicted, test, strict=True)) / len(test)
    assert accuracy >= 0.8
    router.save(tmp_path / "router.json")
    again = EmbeddingRouter.load(tmp_path / "router.json", router.embedder)
    assert again([i.question for i in test]) == predicted


def test_sot_over_a_loopback_openai_server_expands_points_concurrently():
    inner = RuleBackend(sot_rule)
    with serve(inner, "m", delay=0.1) as (url, state):
        remote = OpenAIBackend("m", base_url=url, prefill_body={"continue_final_message": True})
        answer = SkeletonOfThought(remote)("What are some tips for better sleep?")
        assert state.requests == 4 and state.max_in_flight >= 2
    assert answer.text.startswith("1. Regular schedule: detail") and answer.text.count("\n\n") == 2


def test_sot_when_the_server_ignores_the_prefill():
    def restating(prompt):  # answers from scratch, repeating the numbered point
        user = prompt[0]["content"]
        if "skeleton (not the full content)" in user:
            return "1. Alpha\n2. Beta"
        index = re.search(r"writing of point (\d+)", user).group(1)
        point = {"1": "Alpha", "2": "Beta"}[index]
        return f"{index}. {point} is explained here."

    backend = RuleBackend(restating)
    answer = SkeletonOfThought(backend)("q?")
    assert answer.points == [(1, "Alpha"), (2, "Beta")]
    assert answer.text == "1. Alpha is explained here.\n\n2. Beta is explained here."


def test_bundled_prompts_load_and_custom_files_are_checked(tmp_path):
    prompts = SoTPrompts.load()
    assert "{question}" in prompts.skeleton.user and prompts.skeleton.prefill == "1."
    (tmp_path / "p.json").write_text('{"skeleton": {"user": "x"}}')
    with pytest.raises(Exception, match=r"p\.json.*'point'"):
        SoTPrompts.load(tmp_path / "p.json")
