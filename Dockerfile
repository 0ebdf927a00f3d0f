# The gateway as a container: build wheels in one stage, run them as a non-root user in another.
# (No Docker engine runs where this was written: the file is kept simple so it can be read as
# correct; build with `docker build -t gateway .`.)

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY upstreams/ upstreams/
COPY cache/ cache/
RUN python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install --upgrade pip \
 && /opt/gateway/bin/pip install .

FROM python:3.12-slim
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_LOG_FORMAT=json
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY gateway.yaml /etc/gateway/gateway.yaml
USER gateway
EXPOSE 8080
# The slim image has no curl: ask /healthz with the Python that is already there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080", "--config", "/etc/gateway/gateway.yaml"]
CMD ["--workers", "1"]
