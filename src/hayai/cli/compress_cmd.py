"""`hayai compress`: Deep Compression of a language model, with its size and perplexity after each stage."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from hayai.cli.app import app, err, out
from hayai.errors import ConfigError, DataError

# Used when no --data file is given: plain English prose, so the perplexities are comparable between runs.
SAMPLE_TEXT = """\
The old lighthouse stood at the end of a narrow path of stones, where the land gave way to the sea. For more
than a hundred years its lamp had turned through the night, and sailors who saw it knew that the rocks were
near and that the harbour was not far. The keeper lived in a small house beside the tower. Every evening he
climbed the stairs, cleaned the glass, trimmed the wick and lit the flame, and every morning he wrote a few
lines in a book: the weather, the ships he had seen, and anything else that seemed worth remembering.

When the lamp was replaced by an electric light, the keeper was no longer needed. The light now switched
itself on at dusk and off at dawn, and a technician came from the city twice a year to check the batteries.
The house was sold to a family who wanted a quiet place by the water. They found the keeper's books in a
cupboard under the stairs, forty years of short entries in the same careful hand, and they read them in the
evenings, one year at a time.

Most entries were ordinary. Wind from the west, light rain, two fishing boats returned before noon. But some
described storms that lasted for days, a ship that ran aground in the fog, and a winter so cold that the bay
froze and children walked across the ice to the island. Reading them, the family began to understand how much
of the keeper's life had been spent watching and waiting, and how much care had gone into a task that most
people never thought about at all.

Science works in a similar way. A measurement is repeated, written down, compared with the last one, and only
after many careful observations does a pattern become clear. The people who make those observations are rarely
remembered, but without their patience there would be nothing to explain. A good record, kept honestly, is
worth more than a clever guess, because it can be checked by anyone who comes later.
"""


def _read_text(path: Path | None) -> str:
    if path is None:
        return SAMPLE_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{path}: empty text file")
    return text


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


@app.command()
def compress(
    model: str = typer.Argument(None, help="Store name, known name, HF checkpoint dir or .gguf (default model)."),
    prune: float = typer.Option(0.5, "--prune", help="Fraction of each targeted weight to remove (0 = none)."),
    bits: int = typer.Option(4, "--bits", help="Weight-sharing bits: at most 2^bits values per layer."),
    data: Path = typer.Option(None, "--data", help="UTF-8 text file for the perplexity (default: a sample)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Score at most this many tokens of the text."),
    window: int = typer.Option(256, "--window", help="Perplexity window in tokens."),
    steps: int = typer.Option(1, "--steps", help="Pruning steps towards --prune (geometric schedule)."),
    scope: str = typer.Option("layer", "--scope", help="'layer': every layer loses --prune; 'global': one "
                                                      "threshold over all targeted weights."),
    include: str = typer.Option(None, "--include", help="Comma-separated module-name globs to compress "
                                                        "(default: every Linear and the embedding)."),
    exclude: str = typer.Option(None, "--exclude", help="Comma-separated module-name globs to leave alone."),
    layers: bool = typer.Option(False, "--layers", help="Also print the size of every compressed weight."),
    json_path: Path = typer.Option(None, "--json", help="Write the report (stages and layers) as JSON here."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
) -> None:
    """Deep Compression (prune -> k-means weight sharing -> Huffman coding): size and perplexity per stage.

    One-shot, without retraining: magnitude pruning, per-layer k-means with linear initialisation (code 0 is
    the exact zero of pruned weights), and Huffman coding of the codes and sparse relative offsets. Sizes
    count the targeted weights as the paper stores them and every other parameter at its in-memory size.
    """
    import torch

    from hayai.cli.progress import progress_bar
    from hayai.compress.pipeline import deep_compress
    from hayai.compress.quality import perplexity
    from hayai.models.loading import load_model
    from hayai.runtime import configure_threads

    if not 0.0 <= prune < 1.0:
        raise ConfigError(f"--prune must be in [0, 1), got {prune}")
    if not 1 <= bits <= 16:
        raise ConfigError(f"--bits must be in 1..16, got {bits}")
    if max_tokens < 2:
        raise ConfigError(f"--max-tokens must be >= 2, got {max_tokens}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"--scope must be 'layer' or 'global', got {scope!r}")
    configure_threads(threads)
    text = _read_text(data)
    with progress_bar() as progress:
        lm, tokenizer, info = load_model(model, dtype=torch.float32, progress=progress)
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        if len(ids) < 2:
            raise DataError(f"{data or 'sample text'}: fewer than 2 tokens")

        def quality(m: torch.nn.Module) -> float:
            return perplexity(m, ids, window, progress=lambda d, t: progress("perplexity", d, t))

        report = deep_compress(lm, sparsity=prune, bits=bits, prune_steps=steps, scope=scope, include=include,
                               exclude=exclude, quality=quality,
                               progress=lambda stage, d, t: progress(stage, d, t))

    table = Table(title=f"{info.name}: prune {prune:g}, {bits}-bit sharing, perplexity on {len(ids)} tokens",
                  title_justify="left")
    for column in ("stage", "size", "ratio", "perplexity", "elapsed"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in report.stages:
        ppl = "-" if stage.quality is None else f"{stage.quality:.3f}"
        if stage.name == "huffman":
            ppl += " (lossless)"
        table.add_row(stage.name, _mb(stage.bytes), f"{stage.ratio:.2f}x", ppl, f"{stage.seconds:.0f}s")
    out.print(table)
    compressed = sum(layer.original for layer in report.layers)
    err.print(f"{len(report.layers)} weights compressed ({_mb(compressed)} of {_mb(report.stages[0].bytes)}); "
              f"{_mb(report.other_bytes)} of other parameters counted at full size", style="dim")
    if layers:
        detail = Table(title="compressed weights", title_justify="left")
        for column in ("weight", "shape", "nonzero", "codes", "index bits", "pruned", "shared", "huffman"):
            detail.add_column(column, justify="left" if column == "weight" else "right",
                              overflow="fold" if column == "weight" else "ellipsis")
        for layer in report.layers:
            detail.add_row(layer.name, "x".join(map(str, layer.shape)), f"{layer.nonzero / layer.numel:.1%}",
                           str(layer.codes), str(layer.index_bits), _mb(layer.pruned), _mb(layer.shared),
                           _mb(layer.huffman))
        out.print(detail)
    if json_path is not None:
        json_path.write_text(json.dumps({"model": info.name, "prune": prune, "bits": bits, "tokens": len(ids),
                                         **report.to_dict()}, indent=2) + "\n")
        err.print(f"wrote {json_path}")
