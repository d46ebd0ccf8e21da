.PHONY: demo test bench lint
demo:   ## run the main job on the embedded default (broker, Redis and model started for you)
	scripts/demo
test:   ## install what the tests need, start their services, run them
	scripts/test
bench:  ## run the benchmark suite (writes bench/results/*.json and prints tables)
	scripts/bootstrap && .venv/bin/python -m bench
lint:
	.venv/bin/ruff check core stream connectors tests bench
