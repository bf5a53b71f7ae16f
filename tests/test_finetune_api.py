"""`hayai.finetune` end to end on a tiny checkpoint: outputs that PEFT / transformers / hayai load, merging,
exact match, the memory plan and resuming an interrupted run."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import hayai
from hayai.errors import ConfigError
from hayai.finetuning import exact_match, merge_adapter, read_metadata
from hayai.train.data import Record
from hayai.train.memory import MemoryBudgetError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread (and the tests do not fight other processes for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

FAST = dict(max_steps=3, seq_len=48, batch_size=2, autocast="none", lr=5e-3, warmup=0, threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    from tinymodels import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("base"), tiny_tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                           {"role": "assistant", "content": str(2 * i + 1)}]} for i in range(16)]
    lines += [{"text": "The quick brown fox jumps over the lazy dog."}] * 2
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def lora_run(checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    events = []
    result = hayai.finetune(str(checkpoint), data, output=out, eval_data=data, eval_every=2,
                            callback=events.append, **FAST)
    return out, result, events


def ids_for(tokenizer_size=300):
    torch.manual_seed(0)
    return torch.randint(0, tokenizer_size, (2, 10))


def test_lora_run_writes_a_peft_adapter_log_plot_and_metadata(lora_run):
    out, result, events = lora_run
    assert {"adapter_config.json", "adapter_model.safetensors", "training_log.jsonl", "loss_curve.png",
            "hayai_finetune.json"} <= {p.name for p in out.iterdir()}
    assert result.steps == 3 and len(result.losses) == 3 and result.eval_losses[0][0] == 2
    assert 0 < result.trainable_parameters < result.total_parameters
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all({"lr", "tokens_per_second"} <= set(r) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    kinds = [e.kind for e in events]
    assert kinds.index("memory") < kinds.index("step") < kinds.index("done")
    assert read_metadata(out)["method"] == "lora"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16


def test_peft_loads_the_adapter_and_agrees_with_hayai(lora_run, checkpoint):
    import peft

    out, _, _ = lora_run
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(ids_for()).logits
        peft_logits = peft.PeftModel.from_pretrained(hf, out).eval()(ids_for()).logits
        ours = hayai.load(str(checkpoint), dtype="fp32", adapter=str(out)).model(ids_for())
    assert not torch.allclose(base_logits, peft_logits, atol=1e-4)  # training changed the adapter
    assert torch.allclose(ours, peft_logits, atol=1e-4)


def test_merge_folds_the_adapter_into_a_full_model(lora_run, checkpoint, tmp_path):
    out, _, _ = lora_run
    merged = merge_adapter(str(checkpoint), out, tmp_path / "merged")
    with torch.no_grad():
        expected = hayai.load(str(checkpoint), dtype="fp32", adapter=str(out)).model(ids_for())
        got = hayai.load(str(merged), dtype="fp32").model(ids_for())
        hf = transformers.LlamaForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()(ids_for())
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(hf.logits, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["lomo", "full"])
def test_full_parameter_runs_write_a_model_directory(checkpoint, data, tmp_path, method):
    result = hayai.finetune(str(checkpoint), data, output=tmp_path, method=method,
                            **(FAST | {"lr": 1e-2 if method == "lomo" else 1e-3}))
    assert result.trainable_parameters == result.total_parameters
    with torch.no_grad():
        trained = hayai.load(str(tmp_path), dtype="fp32").model(ids_for())
        base = hayai.load(str(checkpoint), dtype="fp32").model(ids_for())
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()(ids_for())
    assert not torch.allclose(trained, base, atol=1e-4)
    assert torch.allclose(hf.logits, trained, atol=1e-4)


@pytest.mark.parametrize("method", ["qlora", "ia3", "adalomo"])
def test_other_methods_train(checkpoint, data, tmp_path, method):
    result = hayai.finetune(str(checkpoint), data, output=tmp_path, method=method,
                            **(FAST | {"max_steps": 2, "lr": None}))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_an_existing_run_is_not_overwritten_by_accident(lora_run, checkpoint, data):
    out, _, _ = lora_run
    with pytest.raises(ConfigError, match="already holds a training run"):
        hayai.finetune(str(checkpoint), data, output=out, **FAST)


def test_a_run_that_cannot_fit_is_refused_before_training(checkpoint, data, tmp_path):
    with pytest.raises(MemoryBudgetError, match="training would need about"):
        hayai.finetune(str(checkpoint), data, output=tmp_path, memory_limit=2**20, **FAST)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_checkpointing_turns_on_only_when_needed(checkpoint, data, tmp_path, monkeypatch):
    import hayai.train.recipe as recipe

    monkeypatch.setattr(recipe, "current_rss_bytes", lambda: 100 * 2**20)  # a steady process size
    plans = {}
    for checkpointing in (False, True):
        events = []
        hayai.finetune(str(checkpoint), data, output=tmp_path / str(checkpointing), callback=events.append,
                       gradient_checkpointing=checkpointing, **(FAST | {"max_steps": 1, "batch_size": 8}))
        plans[checkpointing] = next(e.detail for e in events if e.kind == "memory")
    assert plans[True].total < plans[False].total
    events = []
    hayai.finetune(str(checkpoint), data, output=tmp_path / "auto", callback=events.append,
                   memory_limit=(plans[True].total + plans[False].total) // 2, **(FAST | {"max_steps": 1,
                                                                                         "batch_size": 8}))
    plan = next(e.detail for e in events if e.kind == "memory")
    assert plan.checkpointing and "turned on" in plan.notes[0]


class Interrupt(Exception):
    pass


def test_resuming_an_interrupted_run_reproduces_its_losses(checkpoint, data, tmp_path):
    settings = FAST | {"max_steps": 4, "save_every": 2, "lora_dropout": 0.1}
    straight = hayai.finetune(str(checkpoint), data, output=tmp_path / "a", **settings).losses

    def crash(event):
        if event.kind == "checkpoint" and event.step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        hayai.finetune(str(checkpoint), data, output=tmp_path / "b", callback=crash, **settings)
    resumed = hayai.finetune(str(checkpoint), data, output=tmp_path / "b", resume=True, **settings)
    assert resumed.resumed_from == 2
    assert resumed.losses == straight


def test_exact_match_compares_greedy_answers(checkpoint):
    llm = hayai.load(str(checkpoint), dtype="fp32")
    question = [{"role": "user", "content": "Hello world"}]
    answer = llm.chat(question, max_tokens=4, temperature=0.0)
    records = [Record(messages=(question[0], {"role": "assistant", "content": answer})),
               Record(messages=(question[0], {"role": "assistant", "content": answer + "!"}))]
    result = exact_match(llm.model, llm.tokenizer, records, max_new_tokens=4)
    assert (result.correct, result.total) == (1, 2) and result.accuracy == 0.5
    assert result.samples[0][1:] == (answer, answer)
    # The training layout (bf16 frozen weights, fp32 rest) generates under autocast.
    bf16 = exact_match(llm.model, llm.tokenizer, records, max_new_tokens=4, autocast_dtype=torch.bfloat16)
    assert bf16.total == 2


def test_a_qlora_adapter_merges_into_the_nf4_base_it_was_trained_on(checkpoint, data, tmp_path):
    from hayai.models.loading import load_model
    from hayai.peft import load_adapter
    from hayai.quant import quantize_model

    hayai.finetune(str(checkpoint), data, output=tmp_path / "q", method="qlora", **(FAST | {"max_steps": 2}))
    merged = merge_adapter(str(checkpoint), tmp_path / "q", tmp_path / "merged")  # base_quant "auto" -> nf4
    model, _, _ = load_model(str(checkpoint))
    quantize_model(model, "nf4")
    load_adapter(model, tmp_path / "q")
    with torch.no_grad():
        expected = model(ids_for())
        got = hayai.load(str(merged), dtype="fp32").model(ids_for())
        float_base = hayai.load(str(merge_adapter(str(checkpoint), tmp_path / "q", tmp_path / "m2", base_quant=None)),
                                dtype="fp32").model(ids_for())
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(float_base, expected, atol=1e-3)  # merging into the float base is another model
