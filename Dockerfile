# syntax=docker/dockerfile:1
# cnnkit serve on the CPU: a slim Python base, the locked dependencies in a layer of their own,
# cnnkit itself on top, a non-root user, the model under /opt/ml/model (mounted there, or baked in
# with --build-arg MODEL_DIR=...). The same image runs on SageMaker unchanged: SageMaker starts it
# as "docker run IMAGE serve" and expects port 8080, GET /ping, POST /invocations and the model
# unpacked into /opt/ml/model; all four hold here. See "Deploy" in README.md.
#
#   docker build -t cnnkit .
#   docker run --rm -p 8080:8080 -v "$PWD/checkpoints/demo:/opt/ml/model:ro" cnnkit
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# PyTorch's CPU-only wheels (torch==X matches X+cpu there): no CUDA libraries, gigabytes less.
# Set it empty to take torch from the pip index alone.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A folder of the build context whose model file (.pt or .onnx) is baked into /opt/ml/model.
ARG MODEL_DIR=deploy/model

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The dependencies, from the lock (runtime + the serve and export extras, without CUDA):
#    rebuilt only when the lock changes.
COPY requirements/lock-serve.txt /opt/cnnkit/requirements/lock-serve.txt
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /opt/cnnkit/requirements/lock-serve.txt

# 2. cnnkit itself, without dependencies (all of them are installed above).
COPY pyproject.toml README.md /opt/cnnkit/src/
COPY cnnkit/ /opt/cnnkit/src/cnnkit/
RUN pip install --no-cache-dir --no-deps /opt/cnnkit/src && rm -rf /opt/cnnkit/src

# 3. A user without a login or a home, and the model.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cnnkit
COPY ${MODEL_DIR}/ /opt/ml/model/

# cnnkit serve reads these (its flags win): the model (a file, or a folder holding one), the
# address and the port (SageMaker's SAGEMAKER_BIND_TO_PORT, when it sets one, wins over CNNKIT_PORT).
ENV CNNKIT_MODEL=/opt/ml/model \
    CNNKIT_HOST=0.0.0.0 \
    CNNKIT_PORT=8080
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SAGEMAKER_BIND_TO_PORT') or os.environ.get('CNNKIT_PORT', '8080'); urllib.request.urlopen('http://127.0.0.1:' + port + '/ready', timeout=4)"]
ENTRYPOINT ["cnnkit"]
CMD ["serve"]
