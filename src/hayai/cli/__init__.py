"""The `hayai` command. Each command group lives in its own module and registers itself on `app`."""

from __future__ import annotations

import importlib
import sys

from rich.markup import escape

from hayai.cli.app import app, err, state
from hayai.errors import HayaiError

# Modules whose import registers commands on `app`, in the order `hayai --help` lists them.
_COMMAND_MODULES = [
    "hayai.cli.store_cmd",
    "hayai.cli.generate_cmd",
    "hayai.cli.quantize_cmd",
    "hayai.cli.finetune_cmd",
    "hayai.cli.compress_cmd",
    "hayai.cli.bench_cmd",
    "hayai.cli.serve_cmd",
    "hayai.cli.doctor_cmd",
    "hayai.cli.prompting_cmd",
]

for _name in _COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    """Entry point: user errors become one red line on stderr and exit status 2."""
    try:
        app()
    except HayaiError as exc:
        if state.show_traceback:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main"]
