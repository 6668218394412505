# syntax=docker/dockerfile:1
# credproxy sidecar: non-root, read-only root filesystem friendly (writes go to /var/run/credproxy).
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install . botocore==1.44.5  # the aws extra, pinned

FROM python:3.11.10-slim-bookworm
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home credproxy \
    && mkdir -p /var/run/credproxy && chown credproxy /var/run/credproxy
USER 10001
EXPOSE 15001 15090
HEALTHCHECK --interval=10s --timeout=2s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15090/healthz', timeout=2)"]
ENTRYPOINT ["credproxy", "run"]
CMD ["-c", "/etc/credproxy/config.yaml"]
