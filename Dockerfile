# Build stage: resolve the locked dependencies into a virtualenv. --no-default-groups: the
# project's dependencies only, neither the dev tools nor the embedded Postgres (the `embedded`
# group), so every role needs PANDASYNC_DATABASE_URL.
FROM python:3.11-slim-bookworm AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir "uv==0.13.8"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-default-groups --no-install-project
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY alembic.ini ./
RUN uv sync --frozen --no-default-groups

# Runtime stage: the virtualenv and the code, run as an unprivileged user.
FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 pandasync
WORKDIR /app
COPY --from=build --chown=pandasync:pandasync /app /app
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1 PANDASYNC_HOST=0.0.0.0 PANDASYNC_LOG_FORMAT=json
USER pandasync
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["pandasync", "serve"]
