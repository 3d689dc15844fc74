# syntax=docker/dockerfile:1
# lensserve images; the runtime stages hold only the service's dependencies (no TensorFlow).
#   CPU (default target):             docker build -t lensserve:cpu .
#   GPU (CUDA + cuDNN 9 from pip):    docker build --target gpu -t lensserve:gpu .
# Both serve on port 8000 as an unprivileged user, with the models baked in at /app/models.

ARG PYTHON_IMAGE=python:3.11-slim
# The CUDA and cuDNN libraries onnxruntime-gpu loads come from its [cuda,cudnn] pip extras
# (onnxruntime-gpu 1.31: CUDA 13, so an NVIDIA driver >= 580), loaded by
# onnxruntime.preload_dlls() at start; the base image supplies the container runtime's set-up.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU: build the venv
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lensserve
WORKDIR /src
# README.md is the package long description; the wildcard lets the build go on without it.
COPY pyproject.toml LICENSE README.md* ./
COPY service ./service
RUN /opt/lensserve/bin/pip install .

# ---------------------------------------------------------------- GPU: build the venv
FROM ${CUDA_IMAGE} AS gpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/lensserve
WORKDIR /src
# README.md is the package long description; the wildcard lets the build go on without it.
COPY pyproject.toml LICENSE README.md* ./
COPY service ./service
# onnxruntime (a core dependency) and onnxruntime-gpu share the onnxruntime package folder:
# remove the CPU build, then restore the GPU build's files it overwrote.
RUN /opt/lensserve/bin/pip install '.[gpu]' \
    && /opt/lensserve/bin/pip uninstall -y onnxruntime \
    && ORT_VERSION="$(/opt/lensserve/bin/pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
    && /opt/lensserve/bin/pip install --force-reinstall --no-deps "onnxruntime-gpu==${ORT_VERSION}"

# ---------------------------------------------------------------- GPU runtime (--target gpu)
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lensserve
COPY --from=gpu-build /opt/lensserve /opt/lensserve
# The CUDA and cuDNN libraries come from onnxruntime-gpu's nvidia-* wheels: make them loadable.
RUN /opt/lensserve/bin/python -c "import nvidia, pathlib; print('\n'.join(str(p) for d in nvidia.__path__ for p in sorted(pathlib.Path(d).glob('*/lib'))))" \
        > /etc/ld.so.conf.d/lensserve-nvidia.conf \
    && ldconfig
COPY models/*.onnx models/*.json models/*.npz /app/models/
ENV PATH=/opt/lensserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LENSSERVE_MODELS_DIR=/app/models \
    LENSSERVE_DEVICE=cuda
USER lensserve
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
CMD ["lensserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------- CPU runtime (default)
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lensserve
COPY --from=cpu-build /opt/lensserve /opt/lensserve
COPY models/*.onnx models/*.json models/*.npz /app/models/
ENV PATH=/opt/lensserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LENSSERVE_MODELS_DIR=/app/models \
    LENSSERVE_DEVICE=cpu
USER lensserve
WORKDIR /app
EXPOSE 8000
# urlopen raises on a 503 (models still loading), which fails the check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
CMD ["lensserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
