"""Tokenizer round trips, streaming detokenisation, and chat templates equal to transformers' rendering."""

from __future__ import annotations

import pytest
from tinymodels import CHATML_TEMPLATE, build_tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from hayai.errors import HayaiError
from hayai.models.tokenizer import ChatTemplate, IncrementalDecoder, Tokenizer, TokenizerConfig

TEXTS = ["Hello world! 12345", "  two  spaces\n\nand lines\ttab", "naïve café 日本語 🎉", "def add(a, b): return a+b",
         ""]

LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] == 'system' %}"
    "{% set content = '<|start_header_id|>system<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% else %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
STRICT_ALTERNATION = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TOOLS_AND_CONTROLS = (
    "{%- for message in messages %}\n  {%- if message['role'] == 'system' %}{% continue %}{% endif %}\n"
    "  <{{ message['role'] }}>{{ message['content'] | tojson }}</{{ message['role'] }}>\n"
    "  {%- if loop.index > 3 %}{% break %}{% endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, ünïcode?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": 'Say "two" words.'},
    {"role": "assistant", "content": "Two words."},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def pair():
    backend = build_tiny_tokenizer()
    config = TokenizerConfig(bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    ours = Tokenizer(backend, config)
    theirs = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip_and_match_transformers(pair, text):
    ours, theirs = pair
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == text


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_LIKE, TOOLS_AND_CONTROLS])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_exactly_like_transformers(pair, template, generation_prompt):
    ours, theirs = pair
    ours = Tokenizer(ours.backend, TokenizerConfig(bos_token="<|im_start|>", eos_token="<|im_end|>",
                                                   chat_template=template))
    for turns in (1, 2, 4, 6):
        messages = CONVERSATION[:turns]
        expected = theirs.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
        expected_ids = theirs.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                  add_generation_prompt=generation_prompt)
        expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
        assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == list(expected_ids)


def test_template_exceptions_become_clear_errors(pair):
    ours = Tokenizer(pair[0].backend, TokenizerConfig(eos_token="</s>", chat_template=STRICT_ALTERNATION))
    assert ours.apply_chat_template(CONVERSATION[1:3]) == "[INST] Hi there, ünïcode? [/INST]Hello.</s>"
    with pytest.raises(HayaiError, match="roles must alternate"):
        ours.apply_chat_template(CONVERSATION[1:2] * 2)


def test_generation_block_renders_its_body():
    template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert ChatTemplate(template).render([{"role": "assistant", "content": "x"}]) == "x"


def test_malformed_messages_are_rejected(pair):
    with pytest.raises(HayaiError, match="message 1"):
        pair[0].apply_chat_template([{"role": "user", "content": "a"}, {"content": "no role"}])


def test_eos_ids_include_the_configured_eos_and_turn_ends(pair):
    ours = pair[0]
    assert ours.token_to_id("<|im_end|>") in ours.eos_token_ids
    assert ours.token_to_id("<|endoftext|>") in ours.eos_token_ids


@pytest.mark.parametrize("text", TEXTS[:4])
def test_incremental_decoding_reassembles_the_text(pair, text):
    ours = pair[0]
    decoder = IncrementalDecoder(ours)
    pieces = [decoder.push([i]) for i in ours.encode(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
