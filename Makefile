# The newcomer's commands: `make run` and `make test`. `make check` is the static gate.
UV ?= uv
RUN := $(UV) run --frozen

.PHONY: install run test check lint format soak bench clean

install:
	@command -v $(UV) >/dev/null || python3 -m pip install --quiet "uv==0.13.8"
	$(UV) sync --frozen

run: install
	$(RUN) pandasync dev

test: install
	$(RUN) pytest

check: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy --strict service workers
	$(RUN) python -m service.checks alembic-check

format: install
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

clean:
	rm -rf .pandasync .pytest_cache .mypy_cache .ruff_cache
