# transfer serve: ONNX Runtime over HTTP, no TensorFlow in the image.
#   docker build -t transfer-serve .
#   docker run --rm -p 8080:8080 -v $PWD/artifacts/exports:/models:ro transfer-serve
# Serves every export directory mounted under /models (each by folder name). Set TRANSFER_SERVE_API_KEY to require
# a bearer token (without it the server warns, in one line, that 0.0.0.0 is reachable). One worker per container:
# scale with replicas behind a load balancer. Size the container's memory with the worst-case formula the server logs
# at start (docs/serve.md, "Limits"); connections are capped below the open-file limit (docker run --ulimit nofile=...).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# serve imports the export contract and runtime loaders (export.contract, export.formats, export.runtimes) and a
# few TensorFlow-free helpers of transfer (errors, images); none of them imports TensorFlow at import time.
COPY transfer/ transfer/
COPY export/ export/
COPY serve/ serve/
# --no-deps: the package's core dependencies are the training stack (TensorFlow); the service needs only these.
RUN pip install --no-cache-dir --prefix=/install \
        "onnxruntime>=1.17,<2" "fastapi>=0.110,<1" "uvicorn>=0.27,<1" "python-multipart>=0.0.9" \
        "pillow>=10,<14" "numpy>=1.26,<3" "prometheus-client>=0.20,<1" "httptools>=0.6" "uvloop>=0.19" \
 && pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 serve
USER serve
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
ENTRYPOINT ["python", "-m", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model-repo", "/models"]
