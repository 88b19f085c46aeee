"""Access to models: the oracle interface every backend implements, and the backends.

Backends (ONNX Runtime, PyTorch, Triton) are imported lazily by `adapters.open` so the interface loads
without every framework installed.
"""

from deepcore_auditor.adapters.base import Access, InputConvention, LabelsOnly, Oracle, OracleInfo
from deepcore_auditor.adapters.errors import (
    DeepCoreError,
    IncompatibleSuspect,
    InputError,
    OracleError,
    TransientOracleError,
)

__all__ = [
    "Access",
    "DeepCoreError",
    "IncompatibleSuspect",
    "InputConvention",
    "InputError",
    "LabelsOnly",
    "Oracle",
    "OracleError",
    "OracleInfo",
    "TransientOracleError",
]
