# The two commands a new user needs: `make demo` and `make test` (each sets everything up first).
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/make_tiny_model.py examples/tiny-llama
	rm -rf runs/quickstart  # a fresh demo each time (an existing run dir would be resumed)
	.venv/bin/sharpen run examples/quickstart.yaml --output-dir runs/quickstart

test: setup
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python bench/bench_cpu.py
