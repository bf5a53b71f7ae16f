"""Tokenizer (HF `tokenizer.json` through the `tokenizers` library) and chat templates (jinja2).

The chat template is rendered the way transformers' `apply_chat_template` renders it: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks, the loop-controls extension, a `{% generation %}` block that
renders its body, `raise_exception` and `strftime_now` globals, and a `tojson` filter that keeps non-ASCII text.
The rendered text is encoded without adding special tokens (the template writes them itself), as transformers
does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from hayai.errors import CorruptFileError, HayaiError

Message = dict[str, Any]

# Control tokens that end a turn in common chat formats; used when the checkpoint does not list its own.
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")


@dataclass
class TokenizerConfig:
    """The parts of HF's tokenizer_config.json / generation_config.json that generation needs."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    extra_eos_tokens: list[str] = field(default_factory=list)

    def to_hf(self) -> dict[str, Any]:
        d = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                               ("pad_token", self.pad_token), ("unk_token", self.unk_token),
                               ("chat_template", self.chat_template)) if v is not None}
        d["tokenizer_class"] = "PreTrainedTokenizerFast"
        d["clean_up_tokenization_spaces"] = False
        if self.extra_eos_tokens:
            d["hayai_extra_eos_tokens"] = self.extra_eos_tokens
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TokenizerConfig:
        def token_text(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        template = d.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            by_name = {t.get("name"): t.get("template") for t in template}
            template = by_name.get("default") or next(iter(by_name.values()), None)
        return cls(
            bos_token=token_text(d.get("bos_token")),
            eos_token=token_text(d.get("eos_token")),
            pad_token=token_text(d.get("pad_token")),
            unk_token=token_text(d.get("unk_token")),
            chat_template=template,
            extra_eos_tokens=list(d.get("hayai_extra_eos_tokens", [])),
        )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders as is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's API)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise HayaiError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise HayaiError(f"chat template does not parse: {exc.message} (line {exc.lineno})") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any) -> str:
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **variables)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat format and end-of-turn tokens."""

    def __init__(self, backend: _HFTokenizer, config: TokenizerConfig, eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        self.config = config
        self._extra_eos_ids = set(eos_token_ids)

    @classmethod
    def from_files(cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None,
                   eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        tokenizer_json = Path(tokenizer_json)
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_json))
        except FileNotFoundError:
            raise CorruptFileError(f"{tokenizer_json}: file is missing") from None
        except Exception as exc:  # the tokenizers library raises plain Exceptions on malformed files
            raise CorruptFileError(f"{tokenizer_json}: not a valid tokenizer.json ({exc})") from None
        config = TokenizerConfig()
        if tokenizer_config is not None and Path(tokenizer_config).exists():
            try:
                config = TokenizerConfig.from_hf(json.loads(Path(tokenizer_config).read_text()))
            except json.JSONDecodeError as exc:
                raise CorruptFileError(f"{tokenizer_config}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls(backend, config, eos_token_ids)

    # ---- vocabulary ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the configured EOS, the checkpoint's generation EOS ids, known turn ends."""
        ids = set(self._extra_eos_ids)
        for token in (self.config.eos_token, *self.config.extra_eos_tokens, *TURN_END_TOKENS):
            token_id = self.token_to_id(token) if token else None
            if token_id is not None and (token == self.config.eos_token or self._is_special(token)):
                ids.add(token_id)
        return frozenset(ids)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    def _is_special(self, token: str) -> bool:
        return self.token_to_id(token) in self.special_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.config.bos_token) if self.config.bos_token else None

    @property
    def pad_token_id(self) -> int:
        for token in (self.config.pad_token, self.config.eos_token):
            if token and self.token_to_id(token) is not None:
                return self.token_to_id(token)
        return 0

    # ---- text <-> ids ----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.config.chat_template)

    @cached_property
    def _chat_template(self) -> ChatTemplate:
        if not self.config.chat_template:
            raise HayaiError("this model has no chat template; use raw prompts (--raw)")
        return ChatTemplate(self.config.chat_template)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        _check_messages(messages)
        special = {"bos_token": self.config.bos_token or "", "eos_token": self.config.eos_token or "",
                   "pad_token": self.config.pad_token or "", "unk_token": self.config.unk_token or ""}
        return self._chat_template.render(messages, add_generation_prompt, **{**special, **variables})

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config.to_hf(), indent=2) + "\n")


def _check_messages(messages: Sequence[Message]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise HayaiError("messages must be a list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise HayaiError(f"message {i} must be an object with 'role' and 'content', got {message!r:.80}")


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Decoding token by token breaks UTF-8 sequences that span tokens and drops the spaces some tokenizers attach
    to the next token; instead decode a short window and emit what is new once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_start = 0  # window start: tokens before it are fully emitted
        self._read_offset = 0  # tokens [prefix_start, read_offset) are emitted

    def push(self, token_ids: Iterable[int]) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_start:self._read_offset], self.skip_special_tokens)
        text = decode(self.ids[self._prefix_start:], self.skip_special_tokens)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            delta = text[len(prefix):]
            self._prefix_start = self._read_offset
            self._read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (e.g. a truly invalid byte sequence)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_start:self._read_offset], self.skip_special_tokens)
        text = decode(self.ids[self._prefix_start:], self.skip_special_tokens)
        self._prefix_start = self._read_offset = len(self.ids)
        return text[len(prefix):]
