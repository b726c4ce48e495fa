# The zerosum agents (coordinator and institutions) for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agents ./agents
COPY protocol ./protocol
COPY broker_config ./broker_config
RUN pip install --no-cache-dir . && useradd --create-home zerosum
USER zerosum
ENTRYPOINT ["zerosum"]
