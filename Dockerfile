# Lamina node image: slim Python, non-root user, data and keys on volumes,
# config/docker.toml as its configuration.
#   docker build -t lamina .
#   docker run --rm -v lamina-keys:/keys lamina keys init --out /keys/project.key
#   docker run --add-host=host.docker.internal:host-gateway -p 11112:11112 \
#     -v lamina-data:/data -v lamina-keys:/keys lamina
FROM python:3.11-slim

# tini: an init process as PID 1 (forwards SIGTERM to the node, reaps its workers).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 lamina \
 && mkdir -p /data /keys && chown lamina:lamina /data /keys

WORKDIR /opt/lamina
COPY pyproject.toml README.md ./
COPY node ./node
COPY config ./config
RUN pip install --no-cache-dir .

USER lamina
ENV LAMINA_CONFIG=/opt/lamina/config/docker.toml
VOLUME ["/data", "/keys"]
EXPOSE 11112
# A C-ECHO to the node from inside the container, as the `healthcheck` peer of
# config/docker.toml (tests/test_docker_config.py runs this exact command).
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
  CMD lamina echo "${LAMINA__NODE__AE_TITLE:-LAMINA}@127.0.0.1:${LAMINA__NODE__PORT:-11112}" --aet HEALTHCHECK || exit 1
ENTRYPOINT ["tini", "--", "lamina"]
CMD ["serve"]
