"""Compact and dynamic networks, each against its own baseline in the same run.

    .venv/bin/python benchmarks/compact.py [--quick] [--sections deep,llm,padnet,skim,embedding] [--threads N]

Sections (data: examples/compact_data.py, generated or bundled, no downloads):
- deep       Deep Compression of a LeNet-300-100-style MLP on scikit-learn's bundled 8x8 digits: prune to 90%
             in 3 steps with retraining, 5-bit sharing with centroid fine-tuning, Huffman coding; vs the
             uncompressed model. Target: >= 10x smaller at <= 1 point accuracy loss.
- llm        Deep Compression of the default model (SmolLM2-135M, when `hayai pull` has installed it), one-shot
             (no retraining): prune 50%, 4-bit sharing; size and perplexity per stage on a sample text. --quick
             compresses only the first decoder layer.
- padnet     A small CNN on mixed-polarity digits (half inverted, shifted, noisy) with static convolutions, fully
             dynamic ones (DY-Conv, 4 kernels) and PAD-Net (IMP to 30% dynamic); accuracy (mean over seeds,
             each test image 4 times) and parameters. Target: PAD-Net accuracy >= fully
             dynamic with fewer dynamic parameters.
- skim       LSTM-Jump (R=4, K=15, N=9) vs the same LSTM reading everything (K=0) on generated reviews with
             one opinion passage; accuracy, fraction of tokens read, test-pass time. Target: <= 0.5x tokens at
             <= 1 point accuracy loss.
- embedding  Two-tower recommender trained online on a generated interaction stream whose users come and go;
             the user table is a DynamicEmbedding (admission after 2 sightings, LRU) or a hashed nn.Embedding
             with the same number of rows, plus an unbounded DynamicEmbedding as the no-eviction reference;
             recall@10 and user-table memory (rows + optimizer state + bookkeeping).

Prints each comparison, its ratio and the hardware; writes benchmarks/results/compact.json and compact.png.
Run on a quiet machine: every section trains models, and their times depend on the other load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "examples"))
import deep_compression  # noqa: E402
import lstm_jump  # noqa: E402
import padnet  # noqa: E402
import two_tower  # noqa: E402
from compact_data import interaction_stream  # noqa: E402

from hayai.bench.hardware import describe, one_line  # noqa: E402
from hayai.runtime import configure_threads  # noqa: E402

RESULTS = ROOT / "results"
SECTIONS = ("deep", "llm", "padnet", "skim", "embedding")


def section_deep(quick: bool) -> dict:
    start = time.perf_counter()
    base, report = deep_compression.compress_classifier(epochs=15 if quick else 30,
                                                        retrain_epochs=4 if quick else 8)
    final = report.stages[-1]
    out = {"baseline_accuracy": base, "stages": [vars(s) for s in report.stages],
           "ratio": final.ratio, "accuracy_loss_points": 100 * (base - final.quality),
           "seconds": time.perf_counter() - start}
    out["target_met"] = out["ratio"] >= 10 and out["accuracy_loss_points"] <= 1.0
    print("\n[deep] Deep Compression, MLP 64-300-100-10 on digits (prune 90% in 3 steps, 5 bits, Huffman)")
    for s in report.stages:
        print(f"  {s.name:<9} {s.bytes / 1024:8.1f} KB  {s.ratio:6.1f}x  accuracy {100 * s.quality:6.2f}%")
    print(f"  ratio {final.ratio:.1f}x at {out['accuracy_loss_points']:+.2f} points accuracy loss "
          f"(target >= 10x at <= 1 point: {'met' if out['target_met'] else 'NOT met'})")
    return out


def section_llm(quick: bool) -> dict:
    from hayai.cli.compress_cmd import SAMPLE_TEXT
    from hayai.compress import deep_compress
    from hayai.compress.quality import perplexity
    from hayai.errors import HayaiError
    from hayai.models.loading import load_model

    print("\n[llm] Deep Compression of the default model, one-shot (prune 50%, 4-bit sharing)")
    try:
        model, tokenizer, info = load_model(dtype=torch.float32)
    except HayaiError as exc:
        print(f"  skipped: {exc}")
        return {"skipped": str(exc)}
    ids = tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)[: 128 if quick else 512]
    include = "model.layers.0.*" if quick else None
    start = time.perf_counter()
    report = deep_compress(model, sparsity=0.5, bits=4, include=include,
                           quality=lambda m: perplexity(m, ids, window=128 if quick else 256))
    for s in report.stages:
        print(f"  {s.name:<9} {s.bytes / 1e6:8.2f} MB  {s.ratio:6.2f}x  perplexity {s.quality:10.3f}")
    compressed = sum(layer.original for layer in report.layers)
    print(f"  ({len(report.layers)} weights, {compressed / 1e6:.1f} MB of {report.stages[0].bytes / 1e6:.1f} MB "
          f"compressed; perplexity on {len(ids)} tokens of the sample text)")
    return {"model": info.name, "tokens": len(ids), "layers": include or "all",
            "stages": [vars(s) for s in report.stages], "seconds": time.perf_counter() - start}


def section_padnet(quick: bool) -> dict:
    seeds = [0] if quick else [0, 1, 2]
    epochs = 4 if quick else 15
    runs: dict[str, list[dict]] = {"static": [], "dynamic": [], "pad": []}
    start = time.perf_counter()
    for seed in seeds:
        for kind in runs:
            runs[kind].append(padnet.run(kind, epochs=epochs, seed=seed))
    summary = {kind: {"accuracy": statistics.mean(r["accuracy"] for r in rs),
                      "accuracy_per_seed": [r["accuracy"] for r in rs],
                      "dynamic_params": rs[0]["dynamic_params"], "static_params": rs[0]["static_params"],
                      "total_params": rs[0]["total_params"]} for kind, rs in runs.items()}
    pad, dyn = summary["pad"], summary["dynamic"]
    out = {"seeds": seeds, "epochs": epochs, "results": summary,
           "dynamic_param_ratio": pad["dynamic_params"] / dyn["dynamic_params"],
           "accuracy_delta_points": 100 * (pad["accuracy"] - dyn["accuracy"]),
           "seconds": time.perf_counter() - start}
    out["target_met"] = out["accuracy_delta_points"] >= 0 and out["dynamic_param_ratio"] < 1
    print(f"\n[padnet] small CNN on mixed-polarity digits, {len(seeds)} seed(s), {epochs} epochs")
    for kind, r in summary.items():
        print(f"  {kind:<8} accuracy {100 * r['accuracy']:6.2f}%  dynamic params {r['dynamic_params']:>7}  "
              f"static params {r['static_params']:>6}  total {r['total_params']:>7}")
    print(f"  PAD-Net vs fully dynamic: {out['accuracy_delta_points']:+.2f} points with "
          f"{out['dynamic_param_ratio']:.2f}x the dynamic parameters "
          f"(target >= 0 points with < 1x: {'met' if out['target_met'] else 'NOT met'})")
    return out


@torch.no_grad()
def _timed_eval(model, data) -> tuple[float, float, float]:
    start = time.perf_counter()
    acc, read = lstm_jump.evaluate(model, data)
    return acc, read, time.perf_counter() - start


def section_skim(quick: bool) -> dict:
    n_train, n_test = (1200, 400) if quick else (2000, 500)
    plain_epochs, jump_epochs = (4, 6) if quick else (9, 30)
    start = time.perf_counter()
    r = lstm_jump.run(n_train, n_test, plain_epochs, jump_epochs)
    plain_acc, plain_read, plain_s = _timed_eval(r["plain"], r["test_set"])
    jump_acc, jump_read, jump_s = _timed_eval(r["jump"], r["test_set"])
    out = {"train": n_train, "test": n_test, "plain_epochs": plain_epochs, "jump_epochs": jump_epochs,
           "plain": {"accuracy": plain_acc, "read_fraction": plain_read, "test_seconds": plain_s},
           "jump": {"accuracy": jump_acc, "read_fraction": jump_read, "test_seconds": jump_s},
           "token_ratio": jump_read / plain_read, "accuracy_loss_points": 100 * (plain_acc - jump_acc),
           "seconds": time.perf_counter() - start}
    out["target_met"] = out["token_ratio"] <= 0.5 and out["accuracy_loss_points"] <= 1.0
    print(f"\n[skim] LSTM-Jump (R=4, K=15, N=9) vs plain LSTM, generated reviews ({n_train} train, {n_test} test)")
    print(f"  plain LSTM  accuracy {100 * plain_acc:6.2f}%  tokens read {plain_read:6.1%}  test pass {plain_s:.2f}s")
    print(f"  LSTM-Jump   accuracy {100 * jump_acc:6.2f}%  tokens read {jump_read:6.1%}  test pass {jump_s:.2f}s")
    print(f"  {out['token_ratio']:.2f}x tokens, {plain_s / max(jump_s, 1e-9):.2f}x faster test pass, "
          f"{out['accuracy_loss_points']:+.2f} points accuracy loss "
          f"(target <= 0.5x at <= 1 point: {'met' if out['target_met'] else 'NOT met'})")
    return out


def section_embedding(quick: bool) -> dict:
    days = 12 if quick else 30
    capacity = 800
    data = interaction_stream(num_days=days)
    start = time.perf_counter()
    dynamic = two_tower.run("dynamic", data, capacity)
    hashed = two_tower.run("hashed", data, capacity)
    unbounded = two_tower.run("dynamic", data, data.distinct_users + 1)
    out = {"days": days, "capacity": capacity, "distinct_users": data.distinct_users, "dynamic": dynamic,
           "hashed": hashed, "unbounded_dynamic": unbounded,
           "recall_ratio": dynamic["recall@10"] / max(hashed["recall@10"], 1e-9),
           "memory_ratio": dynamic["user_table_bytes"] / hashed["user_table_bytes"],
           "seconds": time.perf_counter() - start}
    print(f"\n[embedding] two-tower, {data.distinct_users} distinct users over {days} days, {capacity}-row user "
          "tables")
    for name, r in (("dynamic", dynamic), ("hashed", hashed), ("unbounded", unbounded)):
        print(f"  {name:<10} recall@10 {r['recall@10']:.3f}  user table {r['user_table_bytes'] / 1e6:6.2f} MB")
    print(f"  dynamic vs hashed at equal rows: {out['recall_ratio']:.2f}x recall@10, "
          f"{out['memory_ratio']:.2f}x memory")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    if "deep" in results:
        ax = axes[0][0]
        stages = results["deep"]["stages"]
        ax.bar([s["name"] for s in stages], [s["bytes"] / 1024 for s in stages], color="tab:blue")
        ax.set_yscale("log")
        ax.set_ylabel("size (KB, log)")
        twin = ax.twinx()
        twin.plot([s["name"] for s in stages], [100 * s["quality"] for s in stages], "o-", color="tab:red")
        twin.set_ylabel("test accuracy (%)", color="tab:red")
        ax.set_title("Deep Compression (MLP on digits)")
    if "padnet" in results:
        ax = axes[0][1]
        for kind, r in results["padnet"]["results"].items():
            ax.scatter(r["dynamic_params"] + r["static_params"], 100 * r["accuracy"], label=kind, s=60)
        ax.set_xlabel("conv weights stored (dynamic k·|M| + static)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend()
        ax.set_title("PAD-Net vs static / fully dynamic")
    if "skim" in results:
        ax = axes[1][0]
        for name in ("plain", "jump"):
            r = results["skim"][name]
            ax.scatter(100 * r["read_fraction"], 100 * r["accuracy"], label=name, s=60)
        ax.set_xlabel("tokens read (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend()
        ax.set_title("LSTM-Jump vs plain LSTM")
    if "embedding" in results:
        ax = axes[1][1]
        for name in ("dynamic", "hashed", "unbounded_dynamic"):
            r = results["embedding"][name]
            ax.scatter(r["user_table_bytes"] / 1e6, r["recall@10"], label=name, s=60)
        ax.set_xlabel("user table memory (MB)")
        ax.set_ylabel("recall@10")
        ax.legend()
        ax.set_title("Dynamic vs hashed embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs, seeds and days (checks that it runs)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where compact.json and compact.png go")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    configure_threads(args.threads)
    info = describe()
    print(f"hardware: {one_line(info)}")
    runners = {"deep": section_deep, "llm": section_llm, "padnet": section_padnet, "skim": section_skim,
               "embedding": section_embedding}
    results = {name: runners[name](args.quick) for name in sections}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compact.json").write_text(json.dumps({"hardware": info, "quick": args.quick, **results},
                                                      indent=2, default=str) + "\n")
    plot(results, args.out / "compact.png")
    print(f"\nwrote {args.out / 'compact.json'} and compact.png")


if __name__ == "__main__":
    main()
