# The newcomer's commands: `make run` and `make test`. `make check` is the static gate.
# uv from PATH, else the one pip installs (`make install` does, when neither is there).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --frozen

.PHONY: install run test check lint format soak bench clean

install:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==0.13.8"
	$(UV) sync --frozen

run: install
	$(RUN) pandasync dev

test: install
	$(RUN) pytest

# The chaos soak at full size (tests/soak, docs/reliability.md); `make test` runs it small.
SOAK_ORDERS ?= 20000
soak: install
	PANDASYNC_SOAK_ORDERS=$(SOAK_ORDERS) \
	  PANDASYNC_SOAK_TIMEOUT_S=$${PANDASYNC_SOAK_TIMEOUT_S:-10800} $(RUN) pytest tests/soak -m soak

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
