"""The bench suites' pieces in-process on a tiny model: measurements, perplexity vs transformers, losslessness,
the combination choice, data loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from hayai.bench.datasets import load_bench_data
from hayai.bench.generate_suite import (
    GenerateSettings,
    GenerateTechnique,
    Measured,
    _perplexity_ids,
    combination,
    measure_generate,
    plan_techniques,
    to_result,
)
from hayai.bench.report import SuiteResult, TechniqueResult
from hayai.bench.suites import BenchOptions, check_only, suites_to_run
from hayai.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    from tinymodels import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", tiny_tokenizer,
                               max_position_embeddings=256)


@pytest.fixture(scope="module")
def settings(checkpoint):
    data = load_bench_data()
    return GenerateSettings(model=str(checkpoint), prompts=tuple(data.select_prompts(2)),
                            perplexity_records=tuple(data.perplexity_records), dtype="fp32", device="cpu",
                            threads=1, new_tokens=12, perplexity_tokens=200, window=64)


@pytest.fixture(scope="module")
def baseline(settings):
    return measure_generate(GenerateTechnique("fp32 (baseline)", "baseline"), settings)


def test_baseline_measurements(settings, baseline):
    assert len(baseline["runs"]) == 2
    for run in baseline["runs"]:
        assert run["generated"] == 12 and len(run["tokens"]) == 12  # end-of-sequence ignored: equal work
        assert run["decode_seconds"] > 0 and run["target_forwards"] == 11
    assert baseline["perplexity_tokens"] == 200 and baseline["weight_bytes_per_token"] > 0
    assert baseline["run_peak_rss"] > 0 and baseline["setup_seconds"] > 0
    assert "available" in baseline["energy"]


def test_perplexity_matches_transformers(settings, baseline, checkpoint):
    from hayai.models.loading import load_tokenizer

    ids = torch.tensor(_perplexity_ids(settings.perplexity_records, load_tokenizer(checkpoint), 200))
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 64):  # windows of 64, each scored on its own tokens after the first
            window = ids[start:start + 64][None]
            logits = hf(window).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    assert baseline["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_prompt_lookup_is_lossless_and_int8_is_scored(settings, baseline):
    base = Measured(GenerateTechnique("fp32 (baseline)", "baseline"), baseline)
    lookup_raw = measure_generate(GenerateTechnique("prompt lookup", "decoding", decoding="lookup"), settings)
    assert "perplexity" not in lookup_raw  # same weights: inherits the baseline's
    context = {"perplexity_by_weights": {"base": baseline["perplexity"]}}
    lookup = to_result(Measured(GenerateTechnique("prompt lookup", "decoding", decoding="lookup"), lookup_raw),
                       base, context)
    assert lookup.ok and lookup.lossless and lookup.quality == baseline["perplexity"]
    assert lookup.metrics["greedy_agreement"] == "2/2 prompts" and lookup.speed > 0
    int8_raw = measure_generate(GenerateTechnique("int8", "weights", weights="int8"), settings)
    int8 = to_result(Measured(GenerateTechnique("int8", "weights", weights="int8"), int8_raw), base, context)
    assert int8.quality != baseline["perplexity"] and abs(int8.quality / baseline["perplexity"] - 1) < 0.05
    assert int8.metrics["weight_bytes_per_token"] < baseline["weight_bytes_per_token"]


def _raw(tokens, eos=(), seconds=1.0):
    return {"runs": [{"prompt": 0, "repeat": 0, "tokens": tokens, "prompt_tokens": 4, "generated": len(tokens),
                      "prefill_seconds": 0.1, "decode_seconds": seconds, "target_forwards": len(tokens) - 1,
                      "drafted": 0, "accepted": 0}],
            "weight_bytes_per_token": 100, "setup_seconds": 1.0, "setup_peak_rss": 10, "run_peak_rss": 5,
            "eos": list(eos), "perplexity": 3.0}


def test_lossless_compares_tokens_up_to_end_of_sequence():
    base = Measured(GenerateTechnique("b", "baseline"), _raw([5, 6, 2, 7, 8], eos=[2]))
    same_until_eos = to_result(Measured(GenerateTechnique("x", "decoding"), _raw([5, 6, 2, 9, 9])), base, {})
    differs = to_result(Measured(GenerateTechnique("y", "decoding"), _raw([5, 7, 2, 7, 8])), base, {})
    assert same_until_eos.lossless and not differs.lossless
    assert differs.metrics["greedy_agreement"] == "0/1 prompts"
    failed = to_result(Measured(GenerateTechnique("z", "weights"), None, "ValueError: boom", "Traceback ..."), base, {})
    assert failed.status == "failed" and failed.error == "ValueError: boom"
    assert failed.metrics["traceback"] == "Traceback ..."


def test_combination_is_chosen_from_the_measurements():
    techniques = {"int8": GenerateTechnique("int8", "weights", weights="int8", description="w"),
                  "int4": GenerateTechnique("int4", "weights", weights="int4", description="w"),
                  "lookup": GenerateTechnique("lookup", "decoding", decoding="lookup", description="d"),
                  "early": GenerateTechnique("early", "decoding", decoding="early-exit", description="d")}
    suite = SuiteResult("generate", results=[
        TechniqueResult("bf16", "baseline", speed=10.0, quality=10.0),
        TechniqueResult("int8", "weights", speed=15.0, quality=10.1, lossless=False),
        TechniqueResult("int4", "weights", speed=25.0, quality=12.0, lossless=False),  # outside the 2% tolerance
        TechniqueResult("lookup", "decoding", speed=14.0, quality=10.0, lossless=True),
        TechniqueResult("early", "decoding", speed=9.0, quality=10.0, lossless=True)])
    combo = combination(suite.results, techniques, suite)
    assert combo.name == "int8 + lookup" and combo.weights == "int8" and combo.decoding == "lookup"
    assert combo.kind == "combination"
    suite.results[3].speed = 8.0  # no decoding strategy beats the baseline any more
    assert "nothing to combine" in combination(suite.results, techniques, suite)


def test_plan_and_only():
    runs, skipped = plan_techniques("fp32", quick=True, draft_model=None)
    names = [t.name for t in runs]
    assert names[0] == "fp32 (baseline)" and "fp32" not in names[1:] and "bf16" in names
    assert {r.name: r.status for r in skipped} == {"nf4": "skipped", "draft model": "skipped",
                                                   "compiled decode": "skipped"}
    assert "nf4" in [t.name for t in plan_techniques("fp32", quick=False, draft_model=None)[0]]
    runs, skipped = plan_techniques("bf16", quick=False, draft_model="small", only=("int4", "draft"))
    assert [t.name for t in runs] == ["bf16 (baseline)", "int4", "draft model (small)"] and skipped == []
    with pytest.raises(ConfigError, match="unknown technique nope"):
        check_only(("int4", "nope"), ("lora",))
    methods = ("lora", "qlora", "ia3", "full", "lomo", "adalomo")
    assert suites_to_run(BenchOptions(only=("int4",)), methods) == ("generate",)
    assert suites_to_run(BenchOptions(only=("int4", "lora-checkpointing")), methods) == ("generate", "finetune")
    with pytest.raises(ConfigError, match="selects no technique"):
        suites_to_run(BenchOptions(suites=("finetune",), only=("int4",)), methods)
    with pytest.raises(ConfigError, match="unknown suite"):
        BenchOptions(suites=("speed",))


def test_user_data(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(16)] + [{"text": "one two three four five six seven eight nine ten"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_bench_data(jsonl)
    assert len(data.train_records) == 15 and len(data.eval_records) == 2
    assert len(data.prompts) == 17 and data.prompts[-1].record.text == "one two three four five six"
    train, held_out = data.write_finetune_files(tmp_path / "out")
    assert len(train.read_text().splitlines()) == 15 and json.loads(held_out.read_text().splitlines()[-1])["text"]
    text = tmp_path / "t.txt"
    text.write_text("First paragraph here.\n\nSecond paragraph, " + "word " * 400)
    data = load_bench_data(text)
    assert [len(r.text.split()) for r in data.perplexity_records] == [3, 160, 160, 82]
    assert data.prompts[0].name == "summarise" and any("plain text" in n for n in data.notes)
    with pytest.raises(DataError, match="no such data file"):
        load_bench_data(tmp_path / "missing.jsonl")


def test_steady_tokens_per_second_excludes_the_first_step():
    from hayai.bench.finetune_suite import steady_tokens_per_second

    # step 1 ends at t=3 s (slow: 300 tokens), steps 2 and 3 take 1 s each for 300 tokens
    steps = [(3.0, 100.0), (4.0, 600 / 4), (5.0, 900 / 5)]
    assert steady_tokens_per_second(0.0, steps) == pytest.approx(300.0)
    assert steady_tokens_per_second(0.0, steps[:1]) == 100.0 and steady_tokens_per_second(0.0, []) is None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_measure_finetune_in_process(checkpoint, tmp_path, method):
    from hayai.bench.finetune_suite import FinetuneSettings, FinetuneTechnique, measure_finetune, to_result
    from hayai.bench.finetune_suite import Measured as FinetuneMeasured
    from hayai.bench.flops import training_step_flops
    from hayai.models.config import ModelConfig

    train, held_out = load_bench_data().write_finetune_files(tmp_path)
    settings = FinetuneSettings(model=str(checkpoint), train_file=str(train), eval_file=str(held_out), steps=2,
                                batch_size=2, seq_len=64, device="cpu", threads=1)
    stages = []
    raw = measure_finetune(FinetuneTechnique(method, "finetune", method), settings,
                           progress=lambda *a: stages.append(a))
    assert ("training", 2, 2) in stages and raw["steps"] == 2
    assert raw["tokens_per_second"] > 0 and math.isfinite(raw["eval_loss"]) and raw["first_loss"] > 0
    assert 0 < raw["train_peak_rss"] <= raw["process_peak_rss"]
    assert (raw["trainable_parameters"] == raw["total_parameters"]) == (method == "full")
    config = ModelConfig.from_file(checkpoint / "config.json")
    r = to_result(FinetuneMeasured(FinetuneTechnique(method, "finetune", method), raw), settings, {"config": config})
    assert r.quality == pytest.approx(math.exp(raw["eval_loss"]))
    if method == "full":
        fwd, bwd = training_step_flops(config, 64, train="all")
        assert r.metrics["flops_per_token"] == pytest.approx((fwd.total + bwd.total) / 64)
