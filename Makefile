# The two commands of the README: `make up` runs Flywheel, `make test` runs the tests.
# Both install into .venv first when pyproject.toml changed. `make test-fast` runs the tests that need
# no vLLM engine, Kafka broker or subprocess and train nothing for long, without importing vLLM (tests/conftest.py).

.venv/.installed: pyproject.toml constraints.txt scripts/install.sh
	./scripts/install.sh

.PHONY: up test test-fast lint
up: .venv/.installed
	.venv/bin/flywheel up --config flywheel/demo/up.toml

test: .venv/.installed
	.venv/bin/python -m pytest

test-fast: .venv/.installed
	.venv/bin/python -m pytest --fast

lint: .venv/.installed
	.venv/bin/ruff check
	.venv/bin/ruff format --check
