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
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/deepcore \
    PATH=/opt/deepcore/bin:$PATH

RUN python -m venv /opt/deepcore \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY deepcore_auditor ./deepcore_auditor
COPY adapters ./adapters
COPY auditor ./auditor
COPY fingerprints ./fingerprints
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir "/src[owner,triton]" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
    && useradd --create-home --uid 10001 --user-group deepcore \
    && install -d -o deepcore -g deepcore /work

USER 10001:10001
WORKDIR /work
ENTRYPOINT ["deepcore"]
CMD ["--help"]
