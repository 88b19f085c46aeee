"""The fingerprint's own error leaves, under the one root (adapters/errors.py)."""

from __future__ import annotations

from deepcore_auditor.adapters.errors import InputError


class FingerprintError(InputError):
    """A fingerprint file cannot be trusted: corrupt, modified, or of an unknown format."""


class SignatureError(InputError):
    """A document is unsigned when a key was given, or its signature does not verify with that key."""
