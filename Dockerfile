# The autoexport image: the daemon, the built-in exporter, the CLI and the OpenSpiel selfplay
# node, with the OTLP exporter for traces. compose.yaml runs it as the daemon and as a node.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY consumer ./consumer
RUN pip install '.[selfplay,otlp]'

VOLUME ["/data"]
CMD ["autoexport", "run", "--data-dir", "/data"]
