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

# The main job on the default model: a streamed answer with its speed report; a code edit through lossless
# speculative decoding (prompt lookup: the report adds tokens per forward pass); a 40-step LoRA fine-tune that
# teaches the model to turn free-text orders into JSON (exact match on 100 held-out orders before and after) and
# the tuned model answering one; last, `hayai bench --quick`: every technique against the baseline on this
# machine, report in out/demo-bench.
ORDER_SYSTEM := Extract the order as JSON with the keys item, quantity, city and date (YYYY-MM-DD).
demo: model
	$(BIN)/hayai generate --max-tokens 96 "Explain in two sentences why a smaller model can generate text faster."
	printf 'Add a docstring to each function and return the full code.\n\ndef area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n' \
		| $(BIN)/hayai generate --max-tokens 128 --speculate lookup -
	$(BIN)/hayai finetune --data examples/finetune/orders_train.jsonl --eval-data examples/finetune/orders_test.jsonl \
		--exact-match --output out/demo-orders --overwrite --max-steps 40 --batch-size 2 --seq-len 512 \
		--lr 1e-3 --lora-r 16 --lora-alpha 32 --warmup 0.1
	$(BIN)/hayai generate --adapter out/demo-orders --max-tokens 48 --system "$(ORDER_SYSTEM)" \
		"Could you ship 12 crates of lemons to Oslo before 4 July 2026?"
	$(BIN)/hayai bench --quick --out out/demo-bench

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
