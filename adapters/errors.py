"""The project's one exception tree; every backend error is translated into it at the boundary.

    DeepCoreError                 root: the CLI catches only this, prints one line, exits 2
    ├── InputError                a file, name or option the user gave is missing or malformed
    │   ├── FingerprintError      a fingerprint file is corrupt, tampered with or of an unknown version  (fingerprints.errors)
    │   ├── SignatureError        a signature is missing, malformed, or not made by the key given        (fingerprints.errors)
    │   └── ReportError           an audit report or its ledger is corrupt, tampered with or inconsistent (auditor.errors)
    ├── IncompatibleSuspect       the suspect cannot answer this fingerprint (shape, classes, access)
    ├── OracleError               the suspect failed while answering (runtime error, bad output)
    │   └── TransientOracleError  a failure that is safe to retry (timeout, 429, unavailable)
    └── BudgetExceeded            a query would go past the hard budget                                   (auditor.errors)

The root and the leaves every layer raises live here, in the lowest layer; each package above
owns the leaves only it raises (`fingerprints/errors.py`, `auditor/errors.py`).
"""

from __future__ import annotations


class DeepCoreError(Exception):
    """Root of every error the project raises on purpose."""


class InputError(DeepCoreError):
    """A user-supplied file, name or option is missing or malformed."""


class IncompatibleSuspect(DeepCoreError):
    """The suspect model cannot be audited with this fingerprint (input shape, classes, access)."""


class OracleError(DeepCoreError):
    """The suspect failed while answering a query, or answered something malformed."""


class TransientOracleError(OracleError):
    """A failure worth retrying with backoff (timeout, rate limit, server briefly unavailable).

    Retrying is the auditor's policy, not the adapter's: a retry goes back through the budget.
    """


def first_line(e: BaseException, *, empty: str | None = None, whole: bool = False) -> str:
    """An exception's message on one line, for wrapping into a one-line error (backend messages
    can run to pages).

    The message's first line, stripped; with `whole`, all of it with every run of whitespace
    (newlines included) made one space. An empty message gives `empty`, or the exception's class
    name when `empty` is None.
    """
    text = " ".join(str(e).split()) if whole else str(e).strip()
    if text:
        return text if whole else text.splitlines()[0]
    return type(e).__name__ if empty is None else empty
