"""Model configuration: the Llama family (Llama, Mistral, Qwen2) in one dataclass.

Read from and written to Hugging Face `config.json`, so a hayai store directory is also a valid HF checkpoint
(transformers and vLLM can load it, and PEFT adapters trained on it line up by module name).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hayai.errors import UnsupportedModelError

# HF architecture name -> (model_type, q/k/v projections carry a bias by default)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", True),
}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class RopeScaling:
    """RoPE frequency scaling for context extension.

    - linear (position interpolation, Chen et al. 2023): positions are divided by `factor`.
    - dynamic (dynamic NTK): for sequences longer than `original_max_position_embeddings`, the base becomes
      base · ((factor · L / L_orig) − (factor − 1))^(d / (d − 2)).
    - llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            d["low_freq_factor"] = self.low_freq_factor
            d["high_freq_factor"] = self.high_freq_factor
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None, where: str = "config.json") -> RopeScaling:
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"{where}: rope scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        return cls(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        )


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture][0]

    @property
    def trained_window(self) -> int:
        """The window the weights were trained on, before any RoPE scaling."""
        return self.rope_scaling.original_max_position_embeddings or self.max_position_embeddings

    @property
    def context_window(self) -> int:
        """Positions the model may attend over: max_position_embeddings, times the factor under dynamic NTK
        scaling, which (as in transformers) keeps max_position_embeddings at the window the weights were trained
        on and rescales RoPE only beyond it."""
        scaling = self.rope_scaling
        if scaling.rope_type == "dynamic" and not scaling.original_max_position_embeddings:
            return int(self.max_position_embeddings * scaling.factor)
        return self.max_position_embeddings

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- HF config.json -------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], where: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or []
        arch = archs[0] if archs else _architecture_from_model_type(d.get("model_type"), where)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{where}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if d.get("use_sliding_window") or (arch == "MistralForCausalLM" and d.get("sliding_window")):
            raise UnsupportedModelError(f"{where}: sliding-window attention is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise UnsupportedModelError(f"{where}: missing field(s) {', '.join(missing)}")
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta + rope_scaling.
        rope_params = d.get("rope_parameters") or {}
        rope_theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        default_qkv_bias = SUPPORTED_ARCHITECTURES[arch][1]
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=RopeScaling.from_hf(scaling, where),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=default_qkv_bias or attention_bias,
            o_bias=attention_bias and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(d.get("mlp_bias", False)),
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnsupportedModelError(f"{path}: no config.json") from None
        except json.JSONDecodeError as exc:
            raise UnsupportedModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_hf_dict(d, where=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelConfig(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _architecture_from_model_type(model_type: str | None, where: str) -> str:
    for arch, (mtype, _) in SUPPORTED_ARCHITECTURES.items():
        if mtype == model_type:
            return arch
    raise UnsupportedModelError(
        f"{where}: model type {model_type!r} is not supported "
        f"(supported: {', '.join(m for m, _ in SUPPORTED_ARCHITECTURES.values())})"
    )
