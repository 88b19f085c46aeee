"""The one channel an audit asks through: budget, retries, ledger and replay in a fixed order.

`QueryChannel` composes `Recorded(Retrying(Budgeted(WithClassCount(suspect))))`: answers already
in the ledger are never asked again (resume), every attempt — retries included, since the server
may have answered — is charged to the budget, and the budget refuses a batch before sending it if
it would go past the limit; answers are checked against the fingerprint's classes below the ledger
(a suspect need not declare its own), so a malformed batch is never recorded. The audit talks to
the channel only: what it spent, retried and replayed are the channel's to say.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from deepcore_auditor.adapters.base import Access, Oracle, OracleInfo, OracleWrapper, WithClassCount
from deepcore_auditor.adapters.errors import InputError, TransientOracleError
from deepcore_auditor.auditor.errors import BudgetExceeded
from deepcore_auditor.auditor.ledger import QueryLedger, Recorded

logger = logging.getLogger(__name__)


class Budgeted(OracleWrapper):
    """Counts every sample sent and never lets one past `budget`, not even on a retry."""

    def __init__(self, inner: Oracle, budget: int, on_charge: Callable[[int], None] | None = None) -> None:
        if budget < 0:
            raise InputError(f"budget must be >= 0, got {budget}")
        super().__init__(inner)
        self.budget, self.spent = int(budget), 0
        self._on_charge = on_charge  # e.g. QueryLedger.charge: the charge is on disk before the send

    @property
    def remaining(self) -> int:
        return self.budget - self.spent

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        if len(points) > self.remaining:
            raise BudgetExceeded(f"{len(points)} queries would exceed the budget ({self.spent} of {self.budget} used)")
        if self._on_charge is not None:
            self._on_charge(len(points))
        self.spent += len(points)  # charged before sending: a failed send may still have been answered
        return self.inner.query(points, access)


class Retrying(OracleWrapper):
    """Retries failures the backend marks as transient, with exponential backoff."""

    def __init__(
        self,
        inner: Oracle,
        attempts: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(inner)
        self.attempts, self.backoff_s, self._sleep = max(1, attempts), backoff_s, sleep
        self.retried = 0  # failed attempts that were retried

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        for attempt in range(self.attempts):
            try:
                return self.inner.query(points, access)
            except TransientOracleError as e:
                if attempt == self.attempts - 1:
                    raise
                delay = self.backoff_s * 2**attempt
                self.retried += 1
                logger.info("transient suspect error (%s); retry %d in %.1fs", e, attempt + 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")



class QueryChannel:
    """A suspect behind a hard budget, retries with backoff, and the ledger (resume and replay).

    `budget` is what this run may still spend (the audit's budget less what earlier runs of it
    charged); every sample sent is charged to it and to the ledger before it goes out.
    """

    def __init__(self, suspect: Oracle, num_classes: int, ledger: QueryLedger, budget: int, *,
                 retries: int = 3, retry_backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        self.ledger = ledger
        self._budgeted = Budgeted(WithClassCount(suspect, num_classes), budget, on_charge=ledger.charge)
        self._retrying = Retrying(self._budgeted, attempts=retries, backoff_s=retry_backoff_s, sleep=sleep)
        self._recorded = Recorded(self._retrying, ledger)

    @property
    def info(self) -> OracleInfo:
        return self._recorded.info

    @property
    def oracle(self) -> Oracle:
        """The channel as an oracle (for checks that ask through the same budget and ledger)."""
        return self._recorded

    def ask(self, points: np.ndarray, access: Access) -> np.ndarray:
        return self._recorded.query(points, access)

    def ask_again(self, points: np.ndarray, access: Access) -> np.ndarray:
        """Ask points a second time (a repeat check); see `Recorded.query_again`."""
        return self._recorded.query_again(points, access)

    @property
    def spent(self) -> int:
        """Samples sent in this run, failed attempts included."""
        return self._budgeted.spent

    @property
    def remaining(self) -> int:
        return self._budgeted.remaining

    @property
    def retried(self) -> int:
        """Failed attempts that were retried (each one charged)."""
        return self._retrying.retried

    @property
    def replayed(self) -> int:
        """Answers served from the ledger instead of the suspect."""
        return self._recorded.replayed
