# Lamina node image: slim Python, non-root user, data on a volume.
#   docker build -t lamina .
#   docker run --rm -v lamina-keys:/keys lamina keys init --out /keys/project.key
#   docker run -p 11112:11112 -v lamina-data:/data -v lamina-keys:/keys \
#     -e LAMINA__PEERS__PACS__HOST=172.17.0.0/16 lamina
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 lamina \
 && mkdir -p /data /keys && chown lamina:lamina /data /keys

WORKDIR /opt/lamina
COPY pyproject.toml README.md ./
COPY node ./node
COPY config ./config
RUN pip install --no-cache-dir .

USER lamina
ENV LAMINA__STORAGE__DATA=/data \
    LAMINA__AUDIT__SIGNING_KEY=/keys/audit-signing.pem \
    LAMINA__DEIDENTIFY__KEY_FILE=/keys/project.key
VOLUME ["/data", "/keys"]
EXPOSE 11112
ENTRYPOINT ["lamina"]
CMD ["serve", "--config", "/opt/lamina/config/node.toml"]
