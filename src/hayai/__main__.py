"""`python -m hayai` runs the CLI."""

from hayai.cli import main

main()
