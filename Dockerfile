# syntax=docker/dockerfile:1
# ENACT GPU image: CUDA toolkit (nvcc, for the enact_cuda kernels), PyTorch CUDA wheels, this
# repository installed editable in /workspace/enact, and the enact_cuda extension compiled at
# build time (no GPU needed for that) for the architectures in ENACT_CUDA_ARCH_LIST.
#
#   docker build -t enact-detr .                       # or: docker compose build
#   docker run --gpus all --shm-size 16g -v /data/coco:/data/coco:ro -v $PWD/outputs:/outputs \
#       enact-detr                                     # COCO mounted: trains DETR + ENACT
#
# The nvcc major version of CUDA_IMAGE must match the CUDA of the torch wheels (torch refuses
# to build extensions otherwise). Defaults: CUDA 13.0 toolkit + PyPI's torch 2.14.1 wheels
# (built for CUDA 13.0; host driver >= 580). For a CUDA 12 host driver, e.g.:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
# A100/A10/L4-L40/H100-H200; "+PTX" lets newer GPUs JIT the sm_90 code.
ARG ENACT_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX"
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git ca-certificates \
        libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}" \
    && pip install --upgrade pip setuptools wheel

# torch + torchvision first (the largest layer, cached across code changes).
RUN pip install ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /workspace/enact

# The installable packages (enact_cuda, detr_common) and their metadata.
COPY pyproject.toml README.md ./
COPY enact_cuda ./enact_cuda
COPY detr_common ./detr_common
RUN pip install -e ".[test,plots]"

# Compile the extension now, for ENACT_CUDA_ARCH_LIST, into a fixed cache. The same two
# variables at run time make enact_cuda.build find this build instead of compiling again for
# the GPU it sees (the cache folder is named by the arch list otherwise).
ENV ENACT_CUDA_ARCH_LIST=${ENACT_CUDA_ARCH_LIST} \
    ENACT_CUDA_CACHE=/opt/enact_cuda_cache \
    MAX_JOBS=${MAX_JOBS}
RUN python -m enact_cuda.build \
    && chmod -R a+rwX "${ENACT_CUDA_CACHE}"

# The detectors, tools, tests and benchmarks (changes here do not rebuild the layers above).
COPY DETR-ENACT ./DETR-ENACT
COPY Conditional-DETR-ENACT ./Conditional-DETR-ENACT
COPY Anchor-DETR-ENACT ./Anchor-DETR-ENACT
COPY tools ./tools
COPY tests ./tests
COPY benchmarks ./benchmarks
COPY Makefile constraints.txt ./
COPY docker ./docker
RUN chmod +x docker/entrypoint.sh

ENV COCO_DIR=/data/coco \
    OUTPUT_DIR=/outputs
VOLUME ["/outputs"]
ENTRYPOINT ["/workspace/enact/docker/entrypoint.sh"]
CMD ["auto"]
