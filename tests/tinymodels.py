"""Tiny random models and tokenizers for tests (importable as `tinymodels` from any test module)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from hayai.models.config import ModelConfig
from hayai.models.llama import CausalLM
from hayai.models.loading import build_model

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Small models generate text quickly on modest hardware.",
    "naïve café — ünïcödé text with 日本語 and emoji 🎉",
] * 20


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (digits split, like SmolLM2's) trained on a small corpus, with chatml special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_hf_config(vocab_size: int, **overrides):
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def write_hf_checkpoint(directory: Path, tokenizer, seed: int = 0, **config_overrides) -> Path:
    """A tiny random transformers LlamaForCausalLM saved as config.json + model.safetensors + tokenizer files."""
    torch.manual_seed(seed)
    config = tiny_hf_config(tokenizer.get_vocab_size(), **config_overrides)
    model = transformers.LlamaForCausalLM(config).eval()
    # Scale up the weights so the tiny model has peaked, non-trivial next-token distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE,
    }))
    return directory


VOCAB = 97


def hf_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random transformers Llama (vocab 97, hidden 48, 2 layers, GQA 6/2 unless overridden)."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    kwargs.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def native_from(hf_model) -> CausalLM:
    """The native model holding a copy of an HF model's weights."""
    config = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    return build_model(config, state)


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    globals_ = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if base in globals_:
        return f"{globals_[base]}.{suffix}"
    _, _, index, rest = base.split(".", 3)
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}.{suffix}"


def _permute_for_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, tokenizer, seed: int = 0, quantize_embedding: bool = True) -> Path:
    """A tiny Llama written as llama.cpp would: permuted q/k, Q8_0 embedding, gpt2 BPE tokenizer metadata."""
    import gguf
    import numpy as np

    torch.manual_seed(seed)
    config = tiny_hf_config(tokenizer.get_vocab_size(), tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = tensor.detach().clone()
        if name.endswith("q_proj.weight"):
            t = _permute_for_gguf(t, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = _permute_for_gguf(t, config.num_key_value_heads)
        array = t.numpy().astype(np.float32)
        if quantize_embedding and name == "model.embed_tokens.weight":
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
