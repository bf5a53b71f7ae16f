"""`hayai quantize`: save a weight-only int8/int4 copy of a model in the store, loadable by name."""

from __future__ import annotations

import typer

from hayai.cli.app import app, err


@app.command()
def quantize(
    model: str = typer.Argument(None, help="Store name, known name, HF checkpoint dir or .gguf file "
                                           "(default: the default model)."),
    method: str = typer.Option("int4", "--method", help="int8 (per channel) or int4 (group-wise)."),
    group_size: int = typer.Option(None, "--group-size", help="int4: weights per group (32, 64, 128; default 32)."),
    name: str = typer.Option(None, "--name", help="Store name of the quantized copy (default: MODEL-METHOD)."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings",
                                    help="Also quantize the input embedding table."),
    dtype: str = typer.Option("auto", "--dtype", help="Dtype the weights are rounded in and the model runs in "
                                                      "(auto: bf16 where the CPU has it; the kernels need it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing entry of that name."),
) -> None:
    """Quantize a model's weights once and store the result; `hayai generate -m NAME` then loads it directly."""
    from hayai.cli.progress import progress_bar
    from hayai.errors import ConfigError
    from hayai.models.loading import quantize_to_store
    from hayai.runtime import resolve_device, resolve_dtype

    if method not in ("int8", "int4"):
        raise ConfigError(f"--method must be int8 or int4, got {method!r}")
    from hayai.quant import preferred_activation_dtype

    resolved = resolve_dtype(dtype, resolve_device("cpu"))
    if dtype == "auto":
        resolved = preferred_activation_dtype(method, "cpu") or resolved
    with progress_bar() as progress:
        entry = quantize_to_store(model, method, group_size=group_size, name=name, embeddings=embeddings,
                                  dtype=resolved, force=force, progress=progress)
    err.print(f"[green]ready:[/] {entry.name} ({entry.size_bytes / 1e6:.0f} MB) at {entry.path} — "
              f"{entry.source}")
