"""Many audits from one command: a manifest of (fingerprint, suspect) pairs, each audited as
`deepcore audit` would audit it alone, a bounded number at once.

The manifest is JSON Lines (one object per line) or CSV (a header row), one pair per line; its
keys are the `deepcore audit` options (dashes or underscores: `suspect-mean`, `budget`,
`auth_token_env`, ...) plus `fingerprint`, `suspect` and an optional `id`. Relative paths are
read from the manifest's folder. Several fingerprints against one suspect (a hub screening an
upload against every owner registered with it) are several lines.

Each pair writes `OUT/<id>/ledger.jsonl` and `OUT/<id>/report.json`, exactly the ledger and
report its single audit would, so every verdict is checked by `deepcore verify-report` like
any other. `OUT/summary.json` and `OUT/summary.md` list every pair: verdict, queries, seconds,
or the one-line error. They are rewritten (atomically) as pairs finish.

Invariants, and why:
- A pair that fails (unreachable, malformed answers, a missing file, a timeout) is an error in
  the summary and never stops the others: one bad endpoint must not cost a scan of a thousand.
- Run again with the same manifest and folder, it resumes: a pair whose report verifies
  against its ledger and fingerprint is not audited again; one with a ledger and no report
  continues from its ledger (nothing asked twice: the ledger's own guarantee); the rest start.
- At most `jobs` audits run at once, and at most `per_endpoint` against one server (scheme,
  host and port), so no server is flooded by the scan; local files share the `jobs` limit only.
  Within an audit, a server suspect's own `--concurrency` still bounds its requests in flight.
- A fingerprint file is read and verified once per scan (`FingerprintCache`): a file changed
  while a scan runs is not seen by it; the reports name the digest that was used.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deepcore_auditor.adapters.base import Access
from deepcore_auditor.adapters.errors import DeepCoreError, InputError, first_line
from deepcore_auditor.adapters.files import atomic_write, write_json
from deepcore_auditor.auditor.audit import AuditConfig, utc_now
from deepcore_auditor.auditor.cluster import RayCluster
from deepcore_auditor.auditor.commands import AuditRequest, run_audit_request, verify_report_file
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint

logger = logging.getLogger(__name__)

SUMMARY_FORMAT = "deepcore-audit-many"
VERDICTS = ("piracy", "independent", "inconclusive")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CONFIG_KEYS = {f.name for f in fields(AuditConfig)}
# The request fields a manifest line may set (the CLI's audit options); the rest are the command's.
_REQUEST_KEYS = {f.name for f in fields(AuditRequest)} - {"config", "ledger", "resume", "report", "no_report", "force",
                                                         "fingerprint_path", "suspect"}
_PATH_KEYS = ("commitment", "key_file", "ssl_root_certificates")
_BOOL_KEYS = ("ssl", "ssl_insecure", "lossy_images")


@dataclass(frozen=True)
class Pair:
    """One manifest line: an audit to run and where its evidence goes."""

    id: str
    line: int
    request: AuditRequest
    endpoint: str  # what the per-endpoint limit counts: a server's scheme://host:port, "local" for files


@dataclass
class Outcome:
    """How one pair ended: a verdict or an error, with what it cost."""

    id: str
    fingerprint: str
    suspect: str
    status: str  # piracy | independent | inconclusive | error
    queries: int | None = None
    seconds: float | None = None
    error: str | None = None
    report: str | None = None
    resumed: str = "new"  # new | continued (from a ledger) | done (an earlier run's verified report)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Summary:
    manifest: str
    out: str
    started_utc: str
    runner: str = "threads"
    outcomes: list[Outcome] = field(default_factory=list)
    finished_utc: str | None = None

    @property
    def errors(self) -> int:
        return sum(o.status == "error" for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        counts = Counter(o.status for o in self.outcomes)
        return {"format": SUMMARY_FORMAT, "version": 1, "manifest": self.manifest, "out": self.out,
                "runner": self.runner, "started_utc": self.started_utc, "finished_utc": self.finished_utc,
                "counts": {k: counts.get(k, 0) for k in (*VERDICTS, "error")},
                "pairs": [o.to_dict() for o in self.outcomes]}

    def table(self) -> str:
        rows = ["| id | suspect | fingerprint | verdict | queries | seconds | error |", "|---|---|---|---|---|---|---|"]
        for o in self.outcomes:
            cells = [o.id, o.suspect, o.fingerprint, o.status, "" if o.queries is None else str(o.queries),
                     "" if o.seconds is None else f"{o.seconds:.2f}", (o.error or "").replace("|", "/")]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows) + "\n"

    def write(self) -> None:
        out = Path(self.out)
        write_json(out / "summary.json", self.to_dict())
        atomic_write(out / "summary.md", self.table().encode())


def endpoint_of(suspect: str) -> str:
    """The server a suspect lives on (scheme://host:port, lower-cased), or "local" for a file."""
    if "://" not in suspect:
        return "local"
    parts = urlsplit(suspect)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}"


def _value(key: str, raw: Any, where: str) -> Any:
    """A manifest cell as the field wants it (CSV cells are strings; JSON values may be typed)."""
    if key in _BOOL_KEYS:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes"):
            return True
        if text in ("0", "false", "no"):
            return False
        raise InputError(f"{where}: {key} must be true or false, got {raw!r}")
    if key == "headers":
        return tuple(raw) if isinstance(raw, list) else tuple(h for h in str(raw).split(";") if h.strip())
    types = {f.name: f.type for f in fields(AuditConfig)} | {f.name: f.type for f in fields(AuditRequest)}
    kind = str(types.get(key, "str"))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key} must be a number, got {raw!r}") from None
    if isinstance(raw, (dict, list)):
        raise InputError(f"{where}: {key} must be a single value")
    return str(raw)


def _rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read manifest {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"manifest {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise InputError(f"manifest {path} line {number}: more cells than the header names")
            yield number, {k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip() != ""}
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"manifest {path} line {number}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"manifest {path} line {number}: not a JSON object")
        yield number, row


def default_id(row: dict[str, Any]) -> str:
    """A line's id when it gives none: the suspect's last path part and a digest of the whole
    line (canonical JSON), so that it names the same audit however the manifest is reordered or
    grown — a resumed scan finds each pair's folder again (an id by position would hand one
    pair's ledger to another, which the ledger's own header check would then refuse)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(row["suspect"]).rstrip("/").rsplit("/", 1)[-1]).lstrip("._-") or "suspect"
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
    return f"{stem[:80]}-{digest[:12]}"


def read_manifest(path: Path) -> list[Pair]:
    """Every pair of the manifest at `path` (`.csv`: CSV with a header row; anything else: JSON
    Lines, `#` lines and blank lines skipped); a malformed line is a one-line InputError that
    names it, before anything is audited."""
    path = Path(path)
    pairs: list[Pair] = []
    seen: set[str] = set()
    for number, row in _rows(path):
        where = f"manifest {path} line {number}"
        row = {str(k).replace("-", "_"): v for k, v in row.items()}
        for needed in ("fingerprint", "suspect"):
            if not row.get(needed):
                raise InputError(f"{where}: no {needed}")
        unknown = sorted(set(row) - _CONFIG_KEYS - _REQUEST_KEYS - {"fingerprint", "suspect", "id"})
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r} (the keys are deepcore audit's options, "
                             "plus fingerprint, suspect and id)")
        suspect = str(row["suspect"])
        pid = str(row.get("id") or default_id(row))
        if not _ID.match(pid):
            raise InputError(f"{where}: id {pid!r} must be 1-100 letters, digits, '.', '_' or '-' (it names a folder)")
        if pid in seen:
            raise InputError(f"{where}: id {pid!r} is given twice")
        seen.add(pid)
        if "://" not in suspect and not Path(suspect).is_absolute():
            suspect = str(path.parent / suspect)
        values = {k: _value(k, v, where) for k, v in row.items() if k not in ("fingerprint", "suspect", "id")}
        for k in _PATH_KEYS:
            if k in values:
                values[k] = path.parent / values[k] if not Path(values[k]).is_absolute() else Path(values[k])
        fingerprint = Path(str(row["fingerprint"]))
        fingerprint = fingerprint if fingerprint.is_absolute() else path.parent / fingerprint
        try:
            access = Access(values.pop("access", AuditConfig.access.value))
        except ValueError:
            raise InputError(f"{where}: access must be one of {', '.join(a.value for a in Access)}") from None
        config = AuditConfig(access=access, **{k: values.pop(k) for k in list(values) if k in _CONFIG_KEYS})
        try:
            config.validate()
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        request = AuditRequest(fingerprint_path=fingerprint, suspect=suspect, config=config, **values)
        pairs.append(Pair(pid, number, request, endpoint_of(suspect)))
    if not pairs:
        raise InputError(f"manifest {path} lists no pair")
    return pairs


def check_limits(jobs: int, per_endpoint: int) -> None:
    if jobs < 1 or per_endpoint < 1:
        raise InputError(f"--jobs and --per-endpoint must be at least 1, got {jobs} and {per_endpoint}")


class FingerprintCache:
    """Each fingerprint file read and verified once per scan, whatever the number of its pairs:
    reading one (its canonical digest, its arrays) and computing its rates cost about 20 ms of
    an audit's 60 of CPU (2026-12-06, the demo's fingerprint), and a fingerprint object keeps its
    rates (`Fingerprint.derived`). Keyed by the path and the key that verified it; a file that
    fails to load is not kept (each of its pairs reports the error). Threads share it; a Ray
    task has none (each process reads its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str | None], Fingerprint] = {}

    def load(self, path: Path, key: Any) -> Fingerprint:
        name = (str(Path(path).resolve()), None if key is None else getattr(key, "key_id", repr(key)))
        with self._lock:
            fp = self._kept.get(name)
        if fp is None:
            fp = load_fingerprint(path, key)
            with self._lock:
                fp = self._kept.setdefault(name, fp)
        return fp


def _audit_pair(pair: Pair, out: Path, cache: FingerprintCache | None = None) -> Outcome:
    """One pair, start to end; every failure becomes its Outcome's error (never raised)."""
    folder = out / pair.id
    ledger, report = folder / "ledger.jsonl", folder / "report.json"
    base = Outcome(pair.id, str(pair.request.fingerprint_path), pair.request.suspect, "error")
    t0 = time.perf_counter()
    try:
        if report.is_file():  # an earlier run finished it: believe the report only once it verifies
            v = verify_report_file(report, pair.request.key_file, pair.request.hmac_key_env, ledger=ledger,
                                   fingerprint=pair.request.fingerprint_path)
            base.status, base.queries, base.report, base.resumed = v.verdict, v.queries_used, str(report), "done"
            return base
        folder.mkdir(parents=True, exist_ok=True)
        resume = ledger.is_file()
        request = replace(pair.request, ledger=ledger, resume=resume, report=report)
        result = run_audit_request(request, load=cache.load if cache is not None else load_fingerprint)
        base.status, base.queries, base.report = result.verdict, result.queries_used, result.report
        base.resumed = "continued" if resume else "new"
    except DeepCoreError as e:
        base.error = first_line(e)
    except OSError as e:
        base.error = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
    except Exception as e:  # a fault of this tool on one pair must not end the others; say what it was
        logger.debug("pair %s failed", pair.id, exc_info=True)
        base.error = f"internal error ({type(e).__name__}): {first_line(e)}"
    finally:
        base.seconds = round(time.perf_counter() - t0, 3)
    return base


class _Threads:
    """Pairs run on a pool of threads in this process (the default)."""

    name = "threads"

    def __init__(self, jobs: int) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="audit")
        self._fingerprints = FingerprintCache()

    def start(self, pair: Pair, out: Path) -> Any:
        return self._pool.submit(_audit_pair, pair, out, self._fingerprints)

    def wait(self, handles: list[Any]) -> list[Any]:
        return list(cf.wait(handles, return_when=cf.FIRST_COMPLETED)[0])

    def result(self, handle: Any) -> Outcome:
        return handle.result()

    def cancel(self, handles: list[Any]) -> None:
        for h in handles:
            h.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Ray:
    """Pairs run as Ray tasks on the cluster at `address` ("auto": the one RAY_ADDRESS or a local
    `ray start` names). Every worker needs deepcore-auditor installed and must see the paths
    the manifest names and `--out` (a shared file system): each task writes its pair's ledger
    and report there itself, exactly as a thread would. A pair with a local model file asks for
    one CPU (it computes the answers); one with a server suspect asks for none (it waits on the
    network), so the cluster's CPUs bound the former and --jobs and --per-endpoint the latter."""

    def __init__(self, address: str) -> None:
        self._cluster = RayCluster(address)
        self._ray = self._cluster.ray
        self.name = self._cluster.name
        self._task = self._ray.remote(max_retries=0)(_audit_pair)

    def start(self, pair: Pair, out: Path) -> Any:
        cpus = 1 if pair.endpoint == "local" else 0
        return self._task.options(num_cpus=cpus).remote(pair, out)

    def wait(self, handles: list[Any]) -> list[Any]:
        ready, _ = self._ray.wait(handles, num_returns=1)
        return list(ready)

    def result(self, handle: Any) -> Outcome:
        try:
            return self._ray.get(handle)
        except Exception as e:  # the task itself never raises (see _audit_pair): its worker died
            raise DeepCoreError(f"a Ray worker failed: {first_line(e)}") from e

    def cancel(self, handles: list[Any]) -> None:
        for h in handles:
            self._ray.cancel(h, force=True)

    def close(self) -> None:
        self._cluster.close()


def run_many(pairs: list[Pair], out: Path, *, jobs: int = 8, per_endpoint: int = 4, manifest: str = "",
             on_done: Callable[[Outcome], None] | None = None, ray_address: str | None = None) -> Summary:
    """Audit every pair (see the module doc), on threads here or, with `ray_address`, as Ray
    tasks; the summary is in manifest order."""
    check_limits(jobs, per_endpoint)
    out = Path(out)
    runner: _Threads | _Ray = _Ray(ray_address) if ray_address else _Threads(jobs)  # a cluster refused: nothing written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        runner.close()
        raise InputError(f"cannot create output folder {out}: {e.strerror or e}") from None
    summary = Summary(manifest=manifest, out=str(out), started_utc=utc_now(), runner=runner.name)
    done: dict[str, Outcome] = {}
    pending = list(pairs)
    busy: Counter[str] = Counter()
    running: dict[Any, Pair] = {}

    def publish() -> None:
        summary.outcomes = [done[p.id] for p in pairs if p.id in done]
        summary.write()

    try:
        while pending or running:
            # Start every pair whose endpoint has room, in manifest order, up to `jobs` at once.
            for pair in list(pending):
                if len(running) >= jobs:
                    break
                if pair.endpoint != "local" and busy[pair.endpoint] >= per_endpoint:
                    continue
                pending.remove(pair)
                busy[pair.endpoint] += 1
                running[runner.start(pair, out)] = pair
            for handle in runner.wait(list(running)):
                pair = running.pop(handle)
                busy[pair.endpoint] -= 1
                try:
                    outcome = runner.result(handle)
                except DeepCoreError as e:
                    outcome = Outcome(pair.id, str(pair.request.fingerprint_path), pair.request.suspect, "error", error=first_line(e))
                done[pair.id] = outcome
                publish()
                if on_done is not None:
                    on_done(outcome)
    except KeyboardInterrupt:
        runner.cancel(list(running))
        publish()
        raise
    finally:
        runner.close()
    summary.finished_utc = utc_now()
    publish()
    return summary
