"""Read a GGUF file (llama.cpp's format) of the Llama family into hayai's native form.

The `gguf` package parses the file and dequantizes its blocks (Q4_0, Q4_1, Q8_0, K-quants, ...) to fp32. What
this module adds is the mapping to Hugging Face conventions:

- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, etc.;
- the rotary permutation: llama.cpp's converter reorders the rows of q_proj and k_proj of `llama` models from
  HF's rotate-half layout to interleaved pairs, W_gguf = W.reshape(h, 2, d/2, in).swapaxes(1, 2); we undo it;
- the config (`llama.block_count`, ...) -> `ModelConfig`;
- the tokenizer: vocabulary, merges and pre-tokenizer name -> a `tokenizers` BPE tokenizer equal to the
  original tokenizer.json; special tokens from the token types; chat template and BOS/EOS from the metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hayai.errors import CorruptFileError, UnsupportedModelError
from hayai.models.config import ModelConfig, RopeScaling
from hayai.models.tokenizer import TokenizerConfig

# GGUF architecture -> HF architecture, and whether llama.cpp permuted q/k rows for interleaved RoPE.
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# The GPT-2 pre-tokenizer regex, and pre-tokenizer names (tokenizer.ggml.pre) that add only a digit split to it.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


class GGUFModel:
    """A parsed GGUF file: config, tokenizer and a lazy iterator over HF-named fp32 tensors."""

    def __init__(self, path: str | Path):
        import gguf  # only needed when reading GGUF

        self.path = Path(path)
        if not self.path.is_file():
            raise CorruptFileError(f"{self.path}: no such file")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # gguf raises ValueError/struct errors on truncated or foreign files
            raise CorruptFileError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.arch = self._field("general.architecture")
        if self.arch not in _ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(_ARCHITECTURES)})"
            )
        self.config = self._read_config()

    # ---- metadata --------------------------------------------------------------------------------------------
    def _field(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CorruptFileError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def _read_config(self) -> ModelConfig:
        a = self.arch
        tokens = self._field("tokenizer.ggml.tokens", None)
        n_heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        scaling_type = self._field(f"{a}.rope.scaling.type", "none")
        scaling = RopeScaling()
        if scaling_type not in ("none", None):
            if scaling_type != "linear":
                raise UnsupportedModelError(f"{self.path}: rope scaling {scaling_type!r} is not supported")
            scaling = RopeScaling("linear", float(self._field(f"{a}.rope.scaling.factor")))
        names = {t.name for t in self.reader.tensors}
        eos = self._field("tokenizer.ggml.eos_token_id", None)
        return ModelConfig(
            vocab_size=int(self._field(f"{a}.vocab_size", len(tokens) if tokens else 0)),
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self._field(f"{a}.block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(self._field(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=int(self._field(f"{a}.attention.key_length", hidden // n_heads)),
            max_position_embeddings=int(self._field(f"{a}.context_length", 2048)),
            rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            architecture=_ARCHITECTURES[a][0],
            bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=eos,
            pad_token_id=self._field("tokenizer.ggml.padding_token_id", None),
        )

    # ---- tensors ---------------------------------------------------------------------------------------------
    def tensor_count(self) -> int:
        return len(self.reader.tensors)

    def tensors(self, progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, fp32 tensor) pairs, dequantized one at a time."""
        from gguf import quants

        permute_qk = _ARCHITECTURES[self.arch][1]
        total = len(self.reader.tensors)
        for i, t in enumerate(self.reader.tensors):
            name = _hf_name(t.name, self.path)
            try:
                array = quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {t.name} uses quantization {t.tensor_type.name}, "
                    "which the gguf package cannot dequantize"
                ) from None
            array = np.asarray(array, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
            tensor = torch.from_numpy(array.copy())
            if permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _unpermute_rotary(tensor, self.config.num_attention_heads)
            elif permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _unpermute_rotary(tensor, self.config.num_key_value_heads)
            if progress:
                progress(i + 1, total)
            yield name, tensor

    # ---- tokenizer -------------------------------------------------------------------------------------------
    def tokenizer(self):
        """Build (tokenizers.Tokenizer, TokenizerConfig, eos ids) from the metadata."""
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        model = self._field("tokenizer.ggml.model", None)
        if model != "gpt2":
            raise UnsupportedModelError(
                f"{self.path}: tokenizer type {model!r} is not supported (supported: gpt2 byte-level BPE)"
            )
        tokens: list[str] = self._field("tokenizer.ggml.tokens")
        types: list[int] = self._field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = self._pre_tokenizer(pre_tokenizers, Regex)
        backend.decoder = decoders.ByteLevel()
        pairs = list(zip(tokens, types, strict=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in pairs if ty == _TOKEN_CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in pairs if ty == _TOKEN_USER_DEFINED])

        def token(key: str) -> str | None:
            idx = self._field(f"tokenizer.ggml.{key}_token_id", None)
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos = token("bos")
        if self._field("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        config = TokenizerConfig(
            bos_token=bos, eos_token=token("eos"), pad_token=token("padding"), unk_token=token("unknown"),
            chat_template=self._field("tokenizer.chat_template", None),
        )
        eos = self._field("tokenizer.ggml.eos_token_id", None)
        return backend, config, [eos] if eos is not None else []

    def _pre_tokenizer(self, pre_tokenizers, Regex):
        pre = self._field("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in ("gpt2", "default"):
            return byte_level
        if pre in _DIGIT_SPLIT_PRE:
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        patterns = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
        if pre in patterns:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ])
        raise UnsupportedModelError(
            f"{self.path}: pre-tokenizer {pre!r} is not supported "
            f"(supported: gpt2, llama-bpe, qwen2, {', '.join(sorted(_DIGIT_SPLIT_PRE))})"
        )


def _hf_name(gguf_name: str, path: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise UnsupportedModelError(f"{path}: unexpected tensor {gguf_name!r} for a Llama-family model")


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved rotary pairs back to HF's rotate-half halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
