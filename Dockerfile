# pypooler as a container: `pypooler run` on 6432, /metrics /healthz /readyz on 9127.
#
#   docker build -t pypooler .
#   docker run -p 6432:6432 -p 9127:9127 \
#     -e PYPOOLER_DATABASES__APP__HOST=db.internal -e PYPOOLER_DATABASES__APP__PASSWORD=... pypooler
#   docker run -v "$PWD/pypooler.toml:/etc/pypooler/pypooler.toml:ro" pypooler
#   docker build --build-arg PYPOOLER_GIT_REVISION="$(git rev-parse --short=12 HEAD)" -t pypooler .
#     (the revision pypooler_build_info reports; the build context has no .git to read it from)
#
# Configuration: the TOML file named by PYPOOLER_CONFIG (the image's own docker/pypooler.toml
# listens on all interfaces; mount yours over it) plus PYPOOLER_* variables, which win over
# the file. The entrypoint refuses to start without a [databases] entry: outside this image
# that would start a throwaway PostgreSQL, which the image does not have.

FROM python:3.11-slim-bookworm AS build
# The wheel compiles the hot path with mypyc (setup.py), which needs a C compiler; the image
# below gets the wheel only, not the compiler.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ARG PYPOOLER_GIT_REVISION=unknown
COPY pyproject.toml setup.py README.md ./
COPY pypooler ./pypooler
# A wheel built here, installed below without pip's cache or the build tools. Compiled or
# nothing: the image must not ship the slow build by accident.
RUN PYPOOLER_MYPYC=1 pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pypooler
COPY docker/pypooler.toml /etc/pypooler/pypooler.toml
COPY docker/entrypoint.sh /usr/local/bin/docker-entrypoint.sh

ENV PYPOOLER_CONFIG=/etc/pypooler/pypooler.toml \
    PYTHONUNBUFFERED=1 \
    PYPOOLER_PIDFILE=/tmp/pypooler.pid
USER 10001
EXPOSE 6432 9127
# /healthz answers while the process serves; the port follows PYPOOLER_METRICS_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["docker-entrypoint.sh", "healthcheck"]
# SIGTERM drains (running transactions finish within shutdown_drain_timeout) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["run"]
