"""The model store: GGUF and HF imports, checksums, clear errors for bad input, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tinymodels import build_tiny_tokenizer, write_tiny_gguf

import hayai
from hayai.errors import CorruptFileError, HayaiError, ModelNotFoundError, UnsupportedModelError
from hayai.models.loading import DEFAULT_MODEL, load_model, pull
from hayai.models.store import ModelStore


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", build_tiny_tokenizer())


def test_gguf_import_matches_transformers_reading_the_same_file(hayai_home, tiny_gguf):
    entry = pull(str(tiny_gguf))
    assert entry.name == "tiny-llama" and entry.path.parent == hayai_home / "models"
    model, tokenizer, _ = load_model("tiny-llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    text = "Hello world! 12345 naïve café"
    assert tokenizer.encode(text) == hf_tok.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_loading_a_gguf_path_converts_once(hayai_home, tiny_gguf):
    hayai.load(str(tiny_gguf), dtype="fp32")
    manifest = hayai_home / "models" / "tiny-llama" / "hayai.json"
    created = json.loads(manifest.read_text())["created"]
    mtime = manifest.stat().st_mtime
    hayai.load(str(tiny_gguf), dtype="fp32")
    assert manifest.stat().st_mtime == mtime and json.loads(manifest.read_text())["created"] == created


def test_store_dir_is_a_valid_transformers_checkpoint(hayai_home, tiny_gguf):
    entry = pull(str(tiny_gguf), name="as-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(entry.path).eval()
    model, tokenizer, _ = load_model("as-hf")
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_hf_directory_imports_and_loads_directly(hayai_home, tiny_checkpoint):
    direct, tokenizer, info = load_model(str(tiny_checkpoint))
    assert info.path == tiny_checkpoint  # no copy needed
    entry = pull(str(tiny_checkpoint), name="imported")
    stored, _, _ = load_model("imported")
    ids = torch.tensor([tokenizer.encode("Hello world")])
    with torch.no_grad():
        assert torch.equal(direct(ids), stored(ids))
    assert set(entry.manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_corrupt_weight_file_is_named(hayai_home, tiny_gguf):
    entry = pull(str(tiny_gguf))
    weights = entry.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: sha256 mismatch"):
        load_model("tiny-llama")


def test_truncated_and_missing_files_are_named(hayai_home, tiny_gguf):
    entry = pull(str(tiny_gguf))
    weights = entry.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_model("tiny-llama")
    weights.unlink()
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: file is missing"):
        load_model("tiny-llama")


def test_unknown_name_lists_installed_and_known_models(hayai_home, tiny_gguf):
    pull(str(tiny_gguf))
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "tiny-llama" in message and DEFAULT_MODEL in message


def test_unsupported_architecture_is_named(tmp_path, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(tiny_checkpoint))


def test_malformed_config_and_mismatched_weights(tiny_checkpoint):
    config_path = tiny_checkpoint / "config.json"
    good = config_path.read_text()
    config_path.write_text(good[:-20])
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        load_model(str(tiny_checkpoint))
    config = json.loads(good)
    config["intermediate_size"] = 100
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="mlp"):
        load_model(str(tiny_checkpoint))


def test_a_failed_conversion_leaves_nothing_behind(hayai_home):
    store = ModelStore()

    def explode(directory):
        (directory / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.write("half", explode, {"description": "test"})
    assert store.get("half") is None
    assert not any(p.name.startswith(".tmp") for p in store.root.iterdir())


def test_existing_entries_are_not_overwritten_without_force(hayai_home, tiny_gguf):
    pull(str(tiny_gguf), name="keep")
    with pytest.raises(HayaiError, match="already exists"):
        ModelStore().write("keep", lambda d: None, {"description": "other"})


def test_not_a_gguf_file_is_a_clear_error(hayai_home, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(CorruptFileError, match=r"bogus\.gguf"):
        pull(str(bogus))


def test_invalid_names_are_rejected(hayai_home, tiny_gguf):
    with pytest.raises(HayaiError, match="invalid model name"):
        pull(str(tiny_gguf), name="../escape")
