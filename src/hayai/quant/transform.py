"""`quantize_model`: replace the ``nn.Linear`` (and optionally ``nn.Embedding``) modules of any model, in place.

Each plain ``nn.Linear`` whose qualified name passes the include/exclude patterns becomes an ``Int8Linear``,
``Int4Linear`` or ``NF4Linear`` (module replacement; the model's code is not touched). With
``embeddings=True`` each ``nn.Embedding`` becomes a `QuantizedEmbedding` (int8/int4 only). Layers the format
cannot or should not take are left in float with the reason recorded. Tied weights (an LM head sharing the
input embedding's Parameter) are detected by identity and handled as `hayai.quant.embedding` describes.

The returned `QuantSummary` holds the JSON-serialisable quant config that `hayai.quant.checkpoint` uses to
rebuild the module tree from a float skeleton without re-quantizing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.quant.base import QuantizedLinear, dtype_name, module_bytes
from hayai.quant.checkpoint import quant_config
from hayai.quant.embedding import QuantizedEmbedding
from hayai.quant.int4 import DEFAULT_GROUP_SIZE as INT4_GROUP_SIZE
from hayai.quant.int4 import Int4Linear, check_group_size
from hayai.quant.int8 import Int8Linear
from hayai.quant.nf4 import DEFAULT_BLOCKSIZE as NF4_BLOCKSIZE
from hayai.quant.nf4 import NF4Linear, check_blocksize

METHODS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
# QLoRA keeps the LM head in 16 bits (qlora.py find_all_linear_names; transformers llm_int8_skip_modules).
DEFAULT_EXCLUDE: dict[str, tuple[str, ...]] = {"int8": (), "int4": (), "nf4": ("lm_head",)}


@dataclasses.dataclass
class QuantSummary:
    """What `quantize_model` did."""

    method: str
    config: dict[str, Any]  # JSON-serialisable; `hayai.quant.checkpoint.load_quantized` rebuilds from it
    replaced: list[str]
    skipped: dict[str, str]  # module name -> why it stayed in float
    notes: list[str]
    bytes_before: int
    bytes_after: int

    @property
    def compression(self) -> float:
        """bytes_before / bytes_after for the whole model."""
        return self.bytes_before / max(1, self.bytes_after)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"compression": self.compression}


def matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a module name whole or as a dotted suffix, globs allowed: "lm_head", "q_proj" (any
    ``*.q_proj``), "mlp.*" (anything under an ``mlp``), "model.layers.1.*"."""
    return any(name == p or fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str]) -> str | None:
    """None when the name is selected, else the reason it is not."""
    if include is not None and not matches(name, include):
        return "not matched by include patterns"
    hit = next((p for p in exclude if matches(name, [p])), None)
    return None if hit is None else f"excluded by pattern {hit!r}"


def _linear_reason(module: nn.Linear, cls: type[QuantizedLinear], options: dict[str, Any]) -> str | None:
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} subclasses nn.Linear and may read .weight directly; only nn.Linear is replaced"
    if module.weight.device.type == "meta":
        return "weight is on the meta device (no values to quantize)"
    if module.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {module.weight.dtype} is not a float format this package quantizes"
    return cls.unsupported_reason(module, **options)


def _embedding_reason(module: nn.Embedding) -> str | None:
    if type(module) is not nn.Embedding:
        return f"{type(module).__name__} subclasses nn.Embedding; only nn.Embedding is replaced"
    if module.max_norm is not None:
        return "max_norm renormalises the table in place, which a quantized table cannot do"
    if module.weight.device.type == "meta":
        return "weight is on the meta device (no values to quantize)"
    return None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _options(method: str, group_size: int, double_quant: bool,
             compute_dtype: torch.dtype | None) -> dict[str, Any]:
    if method == "int4":
        return {"group_size": check_group_size(group_size)}
    if method == "nf4":
        return {"blocksize": check_blocksize(group_size), "double_quant": double_quant, "compute_dtype": compute_dtype}
    return {}


def quantize_model(model: nn.Module, method: str, *, group_size: int | None = None,
                   include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   embeddings: bool = False, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   progress: Callable[[int, int], None] | None = None) -> QuantSummary:
    """Quantize ``model``'s linear layers (and embeddings) in place; returns a `QuantSummary`.

    Args:
        method: "int8" (per-channel), "int4" (group-wise, ``group_size``, default 32) or "nf4" (QLoRA, blocks
            of ``group_size``, default 64, with ``double_quant`` and an optional ``compute_dtype``).
        include / exclude: module-name patterns (exact, dotted suffix or glob). ``exclude=None`` means the
            method's default: nothing for int8/int4, ``["lm_head"]`` for nf4 (QLoRA keeps the head in float).
        embeddings: also replace ``nn.Embedding`` modules (int8: per-row; int4: group-wise).
        progress: called as ``progress(done, total)`` after each replaced module.
    """
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")
    if embeddings and method == "nf4":
        raise ConfigError("embeddings=True needs method int8 or int4; QLoRA keeps embeddings in float")
    cls = METHODS[method]
    if group_size is None:
        group_size = NF4_BLOCKSIZE if method == "nf4" else INT4_GROUP_SIZE
    options = _options(method, group_size, double_quant, compute_dtype)
    exclude = DEFAULT_EXCLUDE[method] if exclude is None else tuple(exclude)
    bytes_before = module_bytes(model)
    skipped: dict[str, str] = {}
    notes: list[str] = []

    linears: list[tuple[str, nn.Linear]] = []
    embeds: list[tuple[str, nn.Embedding]] = []
    owners: dict[int, list[str]] = {}  # id(weight) -> names of the modules holding it (finds tied weights)
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            owners.setdefault(id(module.weight), []).append(name)
        if isinstance(module, nn.Linear):
            reason = _selected(name, include, exclude) or _linear_reason(module, cls, options)
            targets: list[Any] = linears
        elif isinstance(module, nn.Embedding) and embeddings:
            reason = _selected(name, include, exclude) or _embedding_reason(module)
            targets = embeds
        else:
            continue
        if reason is None:
            targets.append((name, module))
        else:
            skipped.setdefault(name, reason)
    total = len(linears) + len(embeds)

    replaced: list[str] = []
    new_by_module: dict[int, nn.Module] = {}  # a module reachable under two names is quantized once
    head_by_weight: dict[int, tuple[str, QuantizedLinear]] = {}
    for name, linear in linears:
        if id(linear) not in new_by_module:
            new_by_module[id(linear)] = cls.from_linear(linear, **options)
            head_by_weight[id(linear.weight)] = (name, new_by_module[id(linear)])
        _set_module(model, name, new_by_module[id(linear)])
        replaced.append(name)
        if progress is not None:
            progress(len(replaced), total)

    for name, embedding in embeds:
        if id(embedding) not in new_by_module:
            others = [n for n in owners[id(embedding.weight)] if n != name]
            new_by_module[id(embedding)] = _quantize_embedding(name, embedding, method, group_size,
                                                               head_by_weight, others, notes)
        _set_module(model, name, new_by_module[id(embedding)])
        replaced.append(name)
        if progress is not None:
            progress(len(replaced), total)

    config = quant_config(model) | {"method": method, "options": _json_options(options), "skipped": skipped}
    return QuantSummary(method=method, config=config, replaced=replaced, skipped=skipped, notes=notes,
                        bytes_before=bytes_before, bytes_after=module_bytes(model))


def _quantize_embedding(name: str, embedding: nn.Embedding, method: str, group_size: int,
                        head_by_weight: dict[int, tuple[str, QuantizedLinear]], sharers: list[str],
                        notes: list[str]) -> QuantizedEmbedding:
    head_name, head = head_by_weight.get(id(embedding.weight), (None, None))
    if isinstance(head, Int8Linear):
        notes.append(f"{name} is tied to {head_name}: it reads {head_name}'s int8 table (one copy)")
        return QuantizedEmbedding.tied_to(head, embedding.padding_idx)
    if isinstance(head, Int4Linear):
        copy = QuantizedEmbedding.from_int4_linear(head, embedding.padding_idx)
        notes.append(f"{name} is tied to {head_name}: the int4 head runs on a row-interleaved kernel layout that "
                     f"cannot be gathered by row, so {name} keeps its own copy of the same codes "
                     f"(+{module_bytes(copy)} bytes)")
        return copy
    if sharers:
        notes.append(f"{name} shares its weight with {', '.join(sharers)}, left in float: that keeps the float "
                     "table, and the embedding gets its own quantized copy")
    return QuantizedEmbedding.from_embedding(embedding, bits=8 if method == "int8" else 4, group_size=group_size)


def _json_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in options.items()}


def model_activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The activation dtype the packed kernels of `model`'s quantized layers are fast in (see
    `kernels.preferred_activation_dtype`), or None where no quantized layer has a preference."""
    from hayai.quant.kernels import preferred_activation_dtype

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            device = next((b.device for b in module.buffers()), torch.device("cpu"))
            preferred = preferred_activation_dtype(module.kind, device.type)
            if preferred is not None:
                return preferred
    return None
