# One image for the backend (and, later, the RQ workers): same code, selected by env vars.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend backend
COPY workers workers
COPY qdrant qdrant
COPY echolabel echolabel
# `bench` is a package of the distribution (`echolabel bench`), so the install needs it.
COPY bench bench
RUN pip install .
# Weights for encoders other than the packaged default go here (see docs/encoders.md).
ENV MODEL_DIR=/data ECHOLABEL_WEIGHTS_DIR=/weights
VOLUME ["/data", "/weights"]
EXPOSE 9090
# `echolabel health` sends the backend's own basic auth (BASIC_AUTH_USER/PASS) when it is set.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s CMD ["echolabel", "health"]
CMD ["echolabel", "serve", "--host", "0.0.0.0", "--port", "9090"]
