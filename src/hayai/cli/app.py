"""The typer application and the two consoles every command module shares.

stdout carries results only (so `hayai generate ... | other-tool` works); progress, reports and errors go to
stderr.
"""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="hayai",
    help="hayai (速い): cheaper fine-tuning and faster generation for language models on modest hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _State:
    show_traceback: bool = False


state = _State()


@app.callback()
def _root(
    traceback: bool = typer.Option(False, "--traceback", help="Show the full traceback when a command fails."),
) -> None:
    state.show_traceback = traceback
