# The README's two commands: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install model demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench,serve,prompting]'
	touch $(STAMP)

install: $(STAMP)

# The default model (SmolLM2-135M-Instruct) converted once into the store (~/.cache/hayai or $HAYAI_HOME).
model: install
	$(BIN)/hayai pull

demo: model
	$(BIN)/hayai generate --max-tokens 96 "Explain in two sentences why a smaller model can generate text faster."

test: model
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
