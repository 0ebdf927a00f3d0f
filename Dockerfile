# The gateway as a container: install the locked dependencies in one stage, run them as a non-root
# user in another. Linted by hadolint in the test suite (tests/test_deploy_kubernetes.py). No Docker
# engine runs where this was written, so it has not been built there: build it with
# `docker build -t aggregation-gateway .` (docs/deploy.md).

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Every dependency from the lock, each file checked against its hash, wheels only (the slim
# image has no compiler); this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
    -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY upstreams/ upstreams/
COPY cache/ cache/
# The project alone: the lock resolved its dependencies and brought setuptools to build it, which
# the running gateway does not need.
RUN /opt/gateway/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
 && /opt/gateway/bin/pip uninstall --yes setuptools

FROM python:3.12-slim
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_LOG_FORMAT=json
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY gateway.yaml /etc/gateway/gateway.yaml
# Numeric, so that Kubernetes' runAsNonRoot can see the user is not root.
USER 10001:10001
EXPOSE 8080
# The slim image has no curl: ask /healthz with the Python that is already there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080", "--config", "/etc/gateway/gateway.yaml"]
CMD ["--workers", "1"]
