"""The auditor's own error leaves, under the one root (adapters/errors.py)."""

from __future__ import annotations

from deepcore_auditor.adapters.errors import DeepCoreError, InputError


class ReportError(InputError):
    """An audit report (or the ledger beside it) cannot be trusted: corrupt, modified, inconsistent."""


class BudgetExceeded(DeepCoreError):
    """Sending the query would exceed the hard query budget; nothing was sent."""
