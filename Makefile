# The two commands of the README: `make up` runs Flywheel, `make test` runs the tests.
# Both install into .venv first when pyproject.toml changed.

.venv/.installed: pyproject.toml scripts/install.sh
	./scripts/install.sh

.PHONY: up test
up: .venv/.installed
	.venv/bin/flywheel up

test: .venv/.installed
	.venv/bin/python -m pytest
