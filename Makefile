# The README's two commands: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install model browser demo test lint clean

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

# The chat page is tested in a real headless browser: Debian's chromium + chromedriver (installed when missing and
# we may install system packages; otherwise that one test skips and says why).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "note: chromium not installed; the browser test will be skipped"; }

test: model browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
