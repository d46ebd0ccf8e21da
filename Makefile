.PHONY: demo test bench lint
demo:   ## run the main job on the embedded default (broker, Redis and model started for you)
	scripts/demo
test:   ## install what the tests need, start their services, run them
	scripts/test
bench:  ## run the benchmark suite (writes bench/results/*.json and prints tables)
	scripts/bootstrap && .venv/bin/python -m bench
lint:   ## the static checks of the test command, alone
	.venv/bin/ruff format --check . && .venv/bin/ruff check . && .venv/bin/mypy
