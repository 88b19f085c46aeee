# syntax=docker/dockerfile:1
#
# DeepCore auditor, GPU flavour: ONNX Runtime with the CUDA execution provider (onnxruntime-gpu)
# and the Triton clients. Build: docker build -t deepcore:gpu .
# Run:   docker run --rm --gpus all -v "$PWD:/work" deepcore:gpu audit ...
#
# - The host needs an NVIDIA driver and the NVIDIA container toolkit. The CUDA 13 / cuDNN 9
#   user-space libraries come from PyPI (onnxruntime-gpu's "cuda" and "cudnn" extras), so the base
#   is a plain Python image and nothing is installed with apt.
# - Exactly one ONNX Runtime: onnxruntime-gpu. The project's core install brings the CPU package,
#   which provides the same module, so it is uninstalled before onnxruntime-gpu goes in (the
#   README's documented swap; uninstalling it afterwards would delete the GPU package's files).
# - torch is the CPU build, pinned: owner-side work (training, fingerprinting) runs on the CPU and
#   suspects run in ONNX Runtime or behind Triton; an unpinned torch would pull a multi-GB CUDA
#   build beside the libraries above.
# - CUDA libraries from PyPI are found by ONNX Runtime's preload_dlls(), which the auditor calls
#   before it opens a session on the CUDA provider (adapters/onnx.py).
# - Reports and caches default to the mounted work folder (/work), so `docker run --rm` keeps them.
# - What the image lacks: `deepcore serve-triton` and `demo --triton` need nvidia-pytriton (which
#   pins numpy<2; not installed) and say so in one line; `deepcore demo` and `bench --data
#   fashion-mnist` need the Fashion-MNIST files (Debian's dataset-fashion-mnist; give `bench` an
#   .npz, an ImageFolder or a .tar.gz under /work instead). `bench` draws its plots with the
#   bench extra, which is installed.
FROM python:3.11.11-slim-bookworm

LABEL org.opencontainers.image.title="deepcore-auditor" \
      org.opencontainers.image.description="Black-box piracy audits of deep classifiers with DeepCore core-point fingerprints (ONNX Runtime CUDA, Triton and KServe v2 clients)" \
      org.opencontainers.image.version="0.2.0" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/deepcore \
    PATH=/opt/deepcore/bin:$PATH \
    DEEPCORE_REPORTS=/work/deepcore-reports \
    DEEPCORE_CACHE=/work/.deepcore-cache

RUN python -m venv /opt/deepcore \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY deepcore_auditor ./deepcore_auditor
COPY adapters ./adapters
COPY auditor ./auditor
COPY fingerprints ./fingerprints
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir "/src[owner,triton,bench]" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
    && useradd --create-home --uid 10001 --user-group deepcore \
    && install -d -o deepcore -g deepcore /work

USER 10001:10001
WORKDIR /work
ENTRYPOINT ["deepcore"]
CMD ["--help"]
