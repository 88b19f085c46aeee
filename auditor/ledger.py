"""The ledger of an audit: every point asked and every answer, and the wrapper that replays it.

`QueryLedger` holds what was asked and answered (in memory, optionally mirrored to a JSONL file
with a lock, so a killed audit resumes where it stopped); `Recorded` answers from it when it can
and asks its inner oracle only for the rest, so a resumed audit never asks a point twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access, Oracle, OracleWrapper, check_answer
from deepcore_auditor.adapters.errors import InputError

logger = logging.getLogger(__name__)


def point_digest(point: np.ndarray) -> str:
    """sha256 of one canonical point's float32 bytes: how the ledger names a query."""
    return hashlib.sha256(np.ascontiguousarray(point, dtype="<f4").tobytes()).hexdigest()


@dataclass
class QueryLedger:
    """What was asked and answered, keyed by point digest; optionally mirrored to a JSONL file.

    The file's first line is a header naming the fingerprint, suspect, access and the audit's
    plan; each further line is one answered query `{"digest", "answer", "t"}` (a repeat check,
    the same point asked again, adds `"repeat": true`). Lines are flushed and fsynced per
    batch, so an audit killed midway loses nothing it was answered, and a torn last line is
    ignored on resume.
    """

    header: dict[str, Any]
    path: Path | None = None
    entries: dict[str, Any] = field(default_factory=dict)  # digest -> first answer
    repeats: dict[str, Any] = field(default_factory=dict)  # digest -> answer when asked again
    records: list[dict[str, Any]] = field(default_factory=list)  # every line after the header
    charged: int | None = None  # queries charged to the budget, from `{"charge": n}` lines (None: none yet)

    # Header keys a resumed audit must match: the same fingerprint, suspect, access and plan.
    RESUME_KEYS = ("fingerprint_sha256", "suspect", "access", "plan")

    def __post_init__(self) -> None:
        self._held: Any = None  # the locked file, while an audit holds the ledger

    def close(self) -> None:
        """Release the lock taken by `open(..., lock=True)`; idempotent."""
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> QueryLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def order(self) -> list[str]:
        """Digests of the first answers, in the order they were recorded."""
        return [r["digest"] for r in self.records if "digest" in r and not r.get("repeat")]

    @staticmethod
    def check_new(path: Path) -> None:
        """Refuse a new ledger at `path` that already exists or has no directory to live in."""
        if os.path.lexists(path):
            raise InputError(f"ledger {path} already exists: pass --resume to continue it, or choose another path")
        if not Path(path).parent.exists():
            raise InputError(f"cannot write ledger: directory {Path(path).parent} does not exist")

    @classmethod
    def open(cls, path: Path | None, header: dict[str, Any], resume: bool, *, lock: bool = True) -> QueryLedger:
        """A fresh ledger, or (resume) the one at `path`, checked against `header`.

        The file is locked (flock) until `close()` unless `lock` is False: a second audit on the
        same ledger is refused instead of asking every query again and interleaving its lines.
        """
        if path is None:
            return cls(header)
        path = Path(path)
        if not resume:
            cls.check_new(path)
            f = open(path, "x")
            try:
                if lock:
                    _lock(f, path)  # before the header is written, so no resume can read it half-made
                f.write(json.dumps({"ledger": header}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                f.close()
                raise
            ledger = cls(header, path)
            if lock:
                ledger._held = f
            else:
                f.close()
            return ledger
        if not path.is_file():
            raise InputError(f"cannot resume: ledger {path} not found")
        held = _lock(open(path, "rb"), path) if lock else None  # locked before it is read
        try:
            ledger = cls.read(path)
        except BaseException:
            if held is not None:
                held.close()
            raise
        ledger._held = held
        for key in cls.RESUME_KEYS:
            if ledger.header.get(key) != header.get(key):
                raise InputError(
                    f"cannot resume: ledger {path} was written for another {key.replace('_', ' ')}"
                    f"{_differing(ledger.header.get(key), header.get(key))}"
                )
        ledger._cut_torn_tail()
        return ledger

    def _cut_torn_tail(self) -> None:
        """Cut a torn last line (a write interrupted midway) so that new answers start on a line
        of their own; otherwise the next answer would be glued to it and the file be corrupt."""
        assert self.path is not None
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())
            logger.debug("cut a torn last line off ledger %s", self.path)

    @classmethod
    def read(cls, path: Path, *, quiet: bool = False) -> QueryLedger:
        """The ledger stored at `path`, not checked against any audit; a torn last line is ignored
        (with a warning unless `quiet`)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"cannot resume: ledger {path} not found")
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise InputError(f"{path} is not a query ledger (not text)") from None
        try:
            first = json.loads(lines[0])["ledger"]
            if not isinstance(first, dict):
                raise TypeError("header is not an object")
        except (IndexError, KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"{path} is not a query ledger") from e
        ledger = cls(first, path)
        for n, line in enumerate(lines[1:], start=2):
            try:
                ledger._remember(_parse_record(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError):
                if n == len(lines):
                    (logger.debug if quiet else logger.info)("ignoring a torn last line in ledger %s (a write cut short)", path)
                    break
                raise InputError(f"ledger {path} is corrupt at line {n}") from None
        return ledger

    @classmethod
    def from_lines(cls, header: Any, records: Any) -> QueryLedger:
        """A ledger from its parsed lines (as embedded in a report); malformed -> ValueError."""
        if not isinstance(header, dict) or not isinstance(records, list):
            raise ValueError("a ledger is a header object and a list of records")
        ledger = cls(header)
        for rec in records:
            ledger._remember(_parse_record(rec))
        return ledger

    @property
    def spent(self) -> int:
        """Queries charged so far: the charge lines, or (a ledger without them) the answers."""
        return self.charged if self.charged is not None else len(self.entries) + len(self.repeats)

    def charge(self, n: int) -> None:
        """Record, before sending, that n queries are charged to the budget."""
        rec = {"charge": int(n), "t": round(time.time(), 3)}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._remember(rec)

    def _remember(self, rec: dict[str, Any]) -> None:
        if "charge" in rec:
            # Answers recorded before the first charge line (a ledger written before charges were
            # recorded) were charged too.
            base = self.charged if self.charged is not None else len(self.entries) + len(self.repeats)
            self.charged = base + rec["charge"]
            self.records.append(rec)
            return
        table = self.repeats if rec.get("repeat") else self.entries
        if rec["digest"] in table:
            raise ValueError(f"query {rec['digest'][:12]}.. recorded twice")
        table[rec["digest"]] = rec["answer"]
        self.records.append(rec)

    def record(self, digests: list[str], answers: np.ndarray, repeat: bool = False) -> None:
        table = self.repeats if repeat else self.entries
        now = round(time.time(), 3)
        new = [
            {"digest": d, "answer": a, "t": now, **({"repeat": True} if repeat else {})}
            for d, a in zip(digests, answers.tolist(), strict=False)
            if d not in table
        ]
        # Disk first, then memory: an audit interrupted in between never counts (in len()) an
        # answer the file does not hold.
        if self.path is not None and new:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
        for r in new:
            self._remember(r)

    def __len__(self) -> int:
        return len(self.entries)


def _lock(f: Any, path: Path) -> Any:
    """Lock an open file exclusively without waiting; refuse (and close it) if another holds it."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InputError(f"ledger {path} is in use by another audit (locked): wait for it to finish") from None
    return f


def _parse_record(rec: Any) -> dict[str, Any]:
    """One ledger line, checked: a 64-hex digest, a label or a list of numbers, a time."""
    if not isinstance(rec, dict):
        raise TypeError("a record is an object")
    if "charge" in rec:
        n = rec["charge"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError("bad charge")
        return rec
    digest, answer = rec["digest"], rec["answer"]
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("bad digest")
    ok = (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 2**31) or (
        isinstance(answer, list)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 1e6 for v in answer)
    )
    if not ok:
        raise ValueError("bad answer")
    return rec


def _differing(old: Any, new: Any) -> str:
    """' (differs in: a, b)' for two dicts, else ''; names only, never values."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return f" (differs in: {', '.join(map(str, keys))})" if keys else ""


class Recorded(OracleWrapper):
    """Answers from the ledger when it has them; asks the rest and records every answer once."""

    def __init__(self, inner: Oracle, ledger: QueryLedger) -> None:
        super().__init__(inner)
        self.ledger = ledger
        self.replayed = 0

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        return self._ask(points, access, repeat=False)

    def query_again(self, points: np.ndarray, access: Access) -> np.ndarray:
        """Ask points a second time (a repeat check): recorded apart from their first answers,
        and replayed from the ledger on resume like any other answer."""
        return self._ask(points, access, repeat=True)

    def _ask(self, points: np.ndarray, access: Access, repeat: bool) -> np.ndarray:
        table = self.ledger.repeats if repeat else self.ledger.entries
        digests = [point_digest(p) for p in points]
        missing, asked = [], set()  # each unknown point once, even when a batch holds it twice
        for i, d in enumerate(digests):
            if d not in table and d not in asked:
                missing.append(i)
                asked.add(d)
        if missing:
            fresh = self.inner.query(points[missing], access)
            self.ledger.record([digests[i] for i in missing], fresh, repeat=repeat)
        self.replayed += len(points) - len(missing)
        dtype = np.int64 if access is Access.LABELS else np.float64
        answer = np.asarray([table[d] for d in digests], dtype=dtype)
        if len(missing) < len(points):  # answers from the file: the ledger is a boundary too
            answer = check_answer(answer, len(points), access, self.info.num_classes)
        return answer
