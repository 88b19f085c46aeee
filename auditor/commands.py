"""What the CLI's commands do, as plain functions over typed requests (usable from Python)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.errors import InputError, OracleError, TransientOracleError, first_line
from deepcore_auditor.adapters.files import atomic_write, check_output, same_file
from deepcore_auditor.adapters.images import ImageEncoding, require_pillow, transport_problem
from deepcore_auditor.auditor.audit import AuditConfig, AuditResult, Step, audit, ledger_header, utc_now
from deepcore_auditor.auditor.cluster import RayCluster, reachable
from deepcore_auditor.auditor.errors import ReportError
from deepcore_auditor.auditor.ledger import QueryLedger
from deepcore_auditor.auditor.report import Verification, build_report, verify_report, write_report
from deepcore_auditor.fingerprints.calibration import point_sets, rates, resolve_test, set_means
from deepcore_auditor.fingerprints.config import (
    BuildConfig,
    CoreConfig,
    KnownModelSpec,
    zoo_counts,
    zoo_of,
    zoo_with_references,
)
from deepcore_auditor.fingerprints.errors import SignatureError
from deepcore_auditor.fingerprints.format import (
    Fingerprint,
    canonical_digest,
    load_commitment,
    load_fingerprint,
    save_fingerprint,
    sign_fingerprint,
    write_commitment,
)
from deepcore_auditor.fingerprints.progress import QUIET, Progress
from deepcore_auditor.fingerprints.signing import resolve_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FingerprintRequest:
    """A fingerprint build as the CLI asks for it: how to build (`build`, holding the core-point
    parameters; their defaults are the only ones), and where the owner, data, output and keys are."""

    owner: str
    data: str
    out: Path
    build: BuildConfig = field(default_factory=BuildConfig)
    owner_weights: str | None = None
    owner_args: tuple[str, ...] = ()  # NAME=VALUE keyword arguments of a factory owner
    layout: str = "NCHW"
    scale: float = 1.0
    mean: str | None = None
    std: str | None = None
    references: tuple[str, ...] = ()
    cache_dir: Path | None = None
    key_file: Path | None = None  # sign the fingerprint with this Ed25519 private key (PEM)
    hmac_key_env: str | None = None  # or with the HMAC key held in this environment variable
    force: bool = False  # replace an existing --out (never one of the inputs)
    ray: str | None = None  # train the known models as tasks on this Ray cluster (auditor.cluster)
    created: str | None = None  # the time the file records (ISO 8601; None: now), for reproducible builds


@dataclass(frozen=True)
class ShippedOwner:
    """The owner as it was given (its file's bytes, or a factory's name, weights' bytes and
    arguments) and the convention it sees, loaded again by a worker that may not see this disk:
    a TorchScript or torch.export owner does not pickle, and loading it through the same
    `load_torch_model` keeps its checks. A factory's module must be importable on the workers."""

    spec: str  # a file's name, or package.module:factory
    owner_file: bytes | None
    weights_name: str | None
    weights: bytes | None
    factory_args: tuple[str, ...]
    convention: InputConvention

    @classmethod
    def of(cls, req: FingerprintRequest, convention: InputConvention) -> ShippedOwner:
        owner = Path(req.owner)
        weights = Path(req.owner_weights) if req.owner_weights else None
        return cls(owner.name if owner.is_file() else req.owner, owner.read_bytes() if owner.is_file() else None,
                   weights.name if weights else None, weights.read_bytes() if weights else None, req.owner_args, convention)

    def __call__(self) -> Any:
        import tempfile

        from deepcore_auditor.adapters.torch import load_torch_model, parse_factory_args
        from deepcore_auditor.fingerprints.models import Normalized

        with tempfile.TemporaryDirectory(prefix="deepcore-owner-") as d:
            spec, weights = self.spec, None
            if self.owner_file is not None:
                spec = str(Path(d) / self.spec)
                Path(spec).write_bytes(self.owner_file)
            if self.weights is not None and self.weights_name:
                weights = str(Path(d) / self.weights_name)
                Path(weights).write_bytes(self.weights)
            net, _ = load_torch_model(spec, factory_weights=weights, factory_args=parse_factory_args(self.factory_args))
        return Normalized(net, self.convention)


def build_config(*, n_points: int = CoreConfig.n_points, candidates: int = CoreConfig.n_candidates,
                 epsilon: float | None = CoreConfig.epsilon, steps: int = CoreConfig.steps,
                 min_confidence: float = CoreConfig.min_confidence, reference_weight: float | None = CoreConfig.reference_weight,
                 train_samples: int = BuildConfig.train_samples, epochs: int = BuildConfig.epochs,
                 max_epochs: int = BuildConfig.max_epochs, sgd_epochs: int = BuildConfig.sgd_epochs,
                 seed: int = BuildConfig.seed,
                 uint8_points: bool = CoreConfig.uint8_points, error_points: int = CoreConfig.error_points,
                 zoo_size: str = "default", calibration_references: int | None = None,
                 selection_references: int | None = None,
                 device: str = BuildConfig.device) -> BuildConfig:
    """The `deepcore fingerprint` options as a `BuildConfig`: one seed for the points and the zoo;
    `device` (auto, cpu, cuda) is where it trains and grows them (checked by `make_fingerprint`).
    The reference counts not given are `zoo_size`'s (`config.ZOO_SIZES`)."""
    try:
        calibration_references, selection_references = zoo_counts(zoo_size, calibration_references, selection_references)
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        zoo_with_references(calibration_references)  # the count checked alone, for a message naming its flag
    except ValueError as e:
        raise InputError(f"--calibration-references: {e}") from None
    try:
        zoo = zoo_of(calibration_references, selection_references)
    except ValueError as e:
        raise InputError(f"--selection-references: {e}") from None
    core = CoreConfig(n_candidates=candidates, n_points=n_points, epsilon=epsilon, steps=steps,
                      min_confidence=min_confidence, reference_weight=reference_weight, seed=seed,
                      uint8_points=uint8_points, error_points=error_points)
    return BuildConfig(core=core, zoo=zoo, train_samples=train_samples, epochs=epochs, max_epochs=max_epochs,
                       sgd_epochs=sgd_epochs, seed=seed,
                       device=device)


def _parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {v}")


def make_fingerprint(req: FingerprintRequest, progress: Callable[[str], None] | None = None,
                     bars: Progress = QUIET) -> tuple[Fingerprint, str]:
    """Load owner and data, build the fingerprint, write it atomically; returns it and its digest.
    `progress` gets the build's phase lines, `bars` its progress bars (fingerprints.progress)."""
    from deepcore_auditor.adapters.open import open_suspect
    from deepcore_auditor.adapters.torch import load_torch_model, parse_factory_args
    from deepcore_auditor.fingerprints.build import build_device, build_fingerprint
    from deepcore_auditor.fingerprints.data import channel_stats, default_cache_dir, load_data
    from deepcore_auditor.fingerprints.models import Normalized, accuracy

    b, c = req.build, req.build.core
    build_device(b.device)  # --device cuda without a usable GPU: refused before anything is loaded or trained
    _check_positive(points=c.n_points, candidates=c.n_candidates, steps=c.steps, train_samples=b.train_samples, epochs=b.epochs)
    if c.epsilon is not None:
        _check_positive(epsilon=c.epsilon)
    if c.reference_weight is not None:
        _check_positive(reference_weight=c.reference_weight)
    if b.sgd_epochs < 0:
        raise InputError(f"--sgd-epochs must be 0 (2 x --epochs + 2) or more, got {b.sgd_epochs}")
    if b.max_epochs and b.max_epochs < b.epochs:
        raise InputError(f"--max-epochs ({b.max_epochs}) cannot be below --epochs ({b.epochs})")
    if c.n_points > c.n_candidates:
        raise InputError(f"--points ({c.n_points}) cannot exceed --candidates ({c.n_candidates})")
    if not 0 < c.min_confidence < 1:
        raise InputError(f"--min-confidence must lie in (0, 1), got {c.min_confidence}")
    if not Path(req.out).parent.is_dir():
        raise InputError(f"cannot write fingerprint: directory {Path(req.out).parent} does not exist")
    check_output(req.out, "--out", {"--owner": req.owner, "--owner-weights": req.owner_weights, "--data": req.data,
                                    "--reference": list(req.references), "--key": req.key_file}, force=req.force)
    if req.ray:
        reachable(req.ray)  # an address nobody answers at: refused before the owner and data load
    key = resolve_key(req.key_file, req.hmac_key_env)  # before the long build: a bad key fails now
    if key is not None and not key.can_sign:
        raise InputError(f"{req.key_file} is a public key: signing needs the private key")
    say = progress or logger.info
    net, identity = load_torch_model(req.owner, factory_weights=req.owner_weights,
                                     factory_args=parse_factory_args(req.owner_args))
    data = load_data(req.data, cache_dir=req.cache_dir)
    mean, std = channel_stats(data.train)
    convention = InputConvention(
        layout=req.layout.upper(), scale=req.scale,
        mean=_parse_floats(req.mean, "--mean") or tuple(m * req.scale for m in mean),
        std=_parse_floats(req.std, "--std") or tuple(s * req.scale for s in std),
    )
    owner = Normalized(net, convention)
    points, labels = data.train.points(), data.train.y
    probe_owner(owner, points[:2], data.train.num_classes)
    test_acc = accuracy(owner, data.test.points(), data.test.y) if len(data.test) else float("nan")
    say(f"owner loaded ({identity.get('sha256', '')[:12]}..), test accuracy {test_acc:.3f} on {len(data.test)} samples")
    if test_acc < 1.5 / data.train.num_classes:
        raise InputError(f"owner scores {test_acc:.3f} on the data's test split: wrong --data or input convention?")
    extra = []
    for i, ref in enumerate(req.references):
        oracle = open_suspect(ref, convention=convention, point_shape=data.train.shape, num_classes=data.train.num_classes)
        extra.append((KnownModelSpec(f"user-ref-{i + 1}:{Path(ref).name}", "independent", "user", "calibration", "supplied"), oracle))
    config = req.build
    holdout = (data.test.points(), data.test.y) if len(data.test) else None
    with contextlib.ExitStack() as stack:
        fan_out = None
        if req.ray:
            cluster = stack.enter_context(RayCluster(req.ray))
            say(f"training the known models on the Ray cluster at {req.ray}")
            fan_out = zoo_on(cluster, ShippedOwner.of(req, convention), config.device)
        fp = build_fingerprint(owner, points, labels, data.train.classes, identity, config, holdout=holdout,
                               extra_references=extra, progress=say, bars=bars, fan_out=fan_out, created=req.created,
                               cache_dir=req.cache_dir if req.cache_dir is not None else default_cache_dir())
    fp = dataclasses.replace(fp, extra={**fp.extra, "owner_test_accuracy": None if math.isnan(test_acc) else round(test_acc, 4), "data": data.source})
    return fp, save_fingerprint(fp, req.out, key)


def zoo_on(cluster: RayCluster, owner: Callable[[], Any], device: str) -> Callable[[Any, Any], Any]:
    """`build_fingerprint`'s fan-out onto `cluster`: each known model a task, run with this
    process's torch threads (auditor.cluster: identical weights need as many) and a GPU when the
    build trains on one; a cluster too small is refused now, not after the owner's radius."""
    from deepcore_auditor.fingerprints.build import build_device, train_shipped

    run = cluster.training(gpus=1 if build_device(device).type == "cuda" else 0)
    return lambda work, indices: run(train_shipped, (owner, work), list(indices))


def probe_owner(owner: Any, points: Any, num_classes: int) -> None:
    """Run the owner on two data points: a model that cannot take them fails here, in one line."""
    import torch

    try:
        with torch.no_grad():
            out = owner(torch.from_numpy(points))
    except Exception as e:  # any framework error: the owner does not fit the data
        first = first_line(e)
        raise InputError(f"owner model cannot take the data's inputs {list(points.shape[1:])} under the declared convention: {first}") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"owner model outputs {shape} for the data's {num_classes} classes")


@dataclass(frozen=True)
class AuditRequest:
    """An audit as the CLI asks for it: the test itself (`config`, whose defaults are the only
    ones), and where the fingerprint, suspect, ledger, report and keys are."""

    fingerprint_path: Path
    suspect: str
    config: AuditConfig = field(default_factory=AuditConfig)
    suspect_layout: str | None = None
    suspect_scale: float | None = None
    suspect_mean: str | None = None
    suspect_std: str | None = None
    device: str = "auto"
    ledger: Path | None = None
    resume: bool = False
    report: Path | None = None  # None: a report under default_reports_dir(), unless no_report
    no_report: bool = False
    retries: int = 3
    retry_backoff: float = 0.5  # seconds before the first retry; doubles each time
    key_file: Path | None = None  # Ed25519 PEM: verifies the fingerprint; a private key also signs the report
    hmac_key_env: str | None = None  # HMAC key in this environment variable: verifies and signs
    commitment: Path | None = None  # the owner's published commitment: the fingerprint must match it
    # Server (Triton and v2) suspects only; None (or empty/False) = the adapter's default, and a local suspect
    # refuses any that is set.
    concurrency: int | None = None
    request_timeout: float | None = None
    connect_timeout: float | None = None
    auth_token_env: str | None = None
    headers: tuple[str, ...] = ()  # "Name: value" each
    ssl: bool | None = None
    ssl_root_certificates: Path | None = None
    ssl_insecure: bool = False
    labels_via: str | None = None
    # Send each point as an encoded image ("png", "jpeg:Q") to a server model whose input is the
    # bytes of an image file; lossy formats only with lossy_images (adapters.images).
    image_format: str | None = None
    lossy_images: bool = False
    ort_providers: str | None = None  # "cuda,cpu": ONNX Runtime execution providers, in order (ONNX suspects)
    force: bool = False  # replace an existing --report (never one of the inputs)


class AuditInterrupted(OracleError):
    """The suspect failed mid-audit; its answers so far are in the ledger and --resume continues."""

    def __init__(self, message: str, *, ledger: Path, answered: int) -> None:
        super().__init__(message)
        self.ledger = ledger
        self.answered = answered


def parse_headers(items: tuple[str, ...] | list[str]) -> dict[str, str] | None:
    """`("Name: value", ...)` -> {name: value}; None when there are none. Values are never echoed."""
    headers: dict[str, str] = {}
    for i, item in enumerate(items, start=1):
        name, sep, value = item.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or any(c.isspace() for c in name):  # not echoed: it may hold a secret
            raise InputError(f"--header number {i} must look like 'Name: value'")
        if name.lower() in (k.lower() for k in headers):
            raise InputError(f"--header {name!r} given twice")
        headers[name] = value
    return headers or None


def triton_options(req: AuditRequest) -> dict[str, Any]:
    """The request's Triton options, named as `adapters.triton.open_triton` takes them (unset: None)."""
    return {
        "concurrency": req.concurrency,
        "request_timeout_s": req.request_timeout,
        "connect_timeout_s": req.connect_timeout,
        "auth_token_env": req.auth_token_env,
        "headers": parse_headers(req.headers),
        "ssl": req.ssl,
        "ssl_root_certificates": None if req.ssl_root_certificates is None else str(req.ssl_root_certificates),
        "ssl_insecure": True if req.ssl_insecure else None,
        "labels_via": req.labels_via,
        "image_format": req.image_format,
    }


# The Triton options' library names (adapters.triton) and the flags a user typed for them.
_TRITON_FLAGS = {"request_timeout_s": "--request-timeout", "connect_timeout_s": "--connect-timeout",
                 "auth_token_env": "--auth-token-env", "ssl_root_certificates": "--ssl-root-certificates",
                 "ssl_insecure": "--ssl-insecure", "labels_via": "--labels-via", "concurrency": "--concurrency",
                 "headers": "--header", "ssl": "--ssl", "image_format": "--image-format"}


def as_typed(message: str) -> str:
    """An adapter's message with its option names as the user typed them on the command line.
    Names with an underscore are replaced wherever they stand; the one-word ones (ssl, headers,
    concurrency) only where the message says "option(s) ...", so no other word is touched."""
    for name, flag in _TRITON_FLAGS.items():
        if "_" in name:
            message = re.sub(rf"\b{name}\b", flag, message)

    def names(m: re.Match[str]) -> str:
        return m.group(1) + re.sub(r"[a-z_]+", lambda w: _TRITON_FLAGS.get(w.group(0), w.group(0)), m.group(2))

    return re.sub(r"(\boption(?:\(s\))?\s+)((?:[a-z_-]+(?:,\s*)?)+)", names, message)


def suspect_convention(fp: Fingerprint, req: AuditRequest) -> InputConvention:
    """The owner's convention, with whatever the user declared about the suspect's input."""
    base = fp.convention
    return InputConvention(
        layout=(req.suspect_layout or base.layout).upper(),
        scale=base.scale if req.suspect_scale is None else req.suspect_scale,
        mean=_parse_floats(req.suspect_mean, "--suspect-mean") or base.mean,
        std=_parse_floats(req.suspect_std, "--suspect-std") or base.std,
        dtype=base.dtype,
    )


def run_audit_request(req: AuditRequest, progress: Callable[[Step], None] | None = None,
                      load: Callable[[Path, Any], Fingerprint] = load_fingerprint) -> AuditResult:
    """Open fingerprint and suspect, check they fit, audit, write the report if asked. `load`
    reads (and verifies, with the key) the fingerprint: `load_fingerprint`, or a scan's cache of
    it (auditor.many), so that one fingerprint read for a thousand suspects is read once."""
    from deepcore_auditor.adapters.open import open_suspect

    if req.resume and req.ledger is None:
        raise InputError("--resume needs --ledger: the file that holds the answered queries")
    if req.retries < 1:
        raise InputError(f"--retries counts attempts per batch and must be at least 1, got {req.retries}")
    if not (0 <= req.retry_backoff <= 3600):
        raise InputError(f"--retry-backoff must be between 0 and 3600 seconds, got {req.retry_backoff}")
    if req.ledger is not None and not req.resume:  # before the report's check: its message says --resume
        QueryLedger.check_new(req.ledger)
    if req.report is not None and req.no_report:
        raise InputError("--report and --no-report contradict each other: give one")
    if req.report is not None:
        if not Path(req.report).parent.is_dir():
            raise InputError(f"cannot write report: directory {Path(req.report).parent} does not exist")
        check_output(req.report, "--report", {"--fingerprint": req.fingerprint_path, "--suspect": req.suspect, "--ledger": req.ledger,
                                              "--commitment": req.commitment, "--key": req.key_file,
                                              "--ssl-root-certificates": req.ssl_root_certificates}, force=req.force)
    options = triton_options(req)
    key = resolve_key(req.key_file, req.hmac_key_env)
    fp = load(req.fingerprint_path, key)
    commitment = None
    if req.commitment is not None:
        commitment = load_commitment(req.commitment)
        if key is not None and commitment.signature is not None:  # an unsigned commitment is still a published digest
            key.verify(commitment.signature, "commitment", commitment.digest, str(req.commitment))
        if commitment.content["fingerprint_sha256"] != fp.digest:
            raise InputError(f"fingerprint {req.fingerprint_path} is not the one committed to in {req.commitment} (sha256 differs)")
    if req.image_format is not None:  # the points must reach the suspect as the fingerprint holds them
        encoding = ImageEncoding.parse(req.image_format)
        require_pillow()
        problem = transport_problem(fp.points, encoding, allow_lossy=req.lossy_images)
        if problem:
            raise InputError(problem)
        options["image_format"] = encoding
    elif req.lossy_images:
        raise InputError("--lossy-images applies only with --image-format jpeg:QUALITY")
    config = req.config
    config.validate()
    started = utc_now()
    try:
        providers = None if req.ort_providers is None else [p for p in req.ort_providers.split(",") if p.strip()]
        if providers is not None and req.device != "auto":
            raise InputError("--device and --ort-providers both choose where an ONNX suspect runs: give one")
        opened = open_suspect(req.suspect, convention=suspect_convention(fp, req), point_shape=fp.point_shape,
                              num_classes=fp.num_classes, device=req.device, ort_providers=providers, **options)
    except InputError as e:  # translated once, here at the boundary: the flags as typed
        raise InputError(as_typed(str(e))) from e
    with opened as suspect:
        ledger = QueryLedger.open(req.ledger, ledger_header(fp, suspect, config), req.resume, lock=True)
        try:
            if ledger.spent > config.budget:
                raise InputError(
                    f"the ledger {req.ledger} has already charged {ledger.spent} queries, more than --budget {config.budget}: "
                    "resume with a budget at least that large"
                )
            result = audit(fp, suspect, config, ledger=ledger, retries=req.retries, retry_backoff_s=req.retry_backoff, progress=progress)
        except TransientOracleError as e:  # retries ran out: worth resuming later
            if req.ledger is None:
                raise
            cause = first_line(e)
            answered = _answered_on_disk(ledger)
            raise AuditInterrupted(f"{cause}; {_resume_hint(req.ledger, answered)}", ledger=req.ledger, answered=answered) from e
        except KeyboardInterrupt as e:
            if req.ledger is not None:
                e.add_note(_resume_hint(req.ledger, _answered_on_disk(ledger)))
            raise
        finally:
            ledger.close()
    encoding = options.get("image_format")
    if encoding is not None and not encoding.lossless:
        result.notes.append(f"points sent as {encoding} images: the suspect answered altered points, on which the "
                            "fingerprint's p0 and p1 were never measured")
    if req.no_report:
        return result
    content = build_report(result, ledger, started_utc=started, finished_utc=utc_now(), retries=req.retries,
                           fingerprint_signature=fp.signature, signature_verified=key is not None, commitment=commitment)
    signer = key if key is not None and key.can_sign else None
    if req.report is not None:
        write_report(content, req.report, signer)
        return dataclasses.replace(result, report=str(req.report))
    # Every audit keeps its evidence: without --report, under the reports directory.
    folder = default_reports_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = started.replace("-", "").replace(":", "")[:15]
        path = folder / f"audit-{stamp}Z-{result.verdict}-{canonical_digest(content)[:12]}.json"
        write_report(content, path, signer)
    except OSError as e:
        logger.warning("could not keep the audit report under %s (%s); pass --report PATH", folder, e.strerror or e)
        return result
    return dataclasses.replace(result, report=str(path))


@dataclass(frozen=True)
class ChallengeResult:
    """How the fingerprint's own test treated models a challenger trained independently.

    With error points the audit holds each set of points to its own p0 (`p0_per_set`, by
    `calibration.SET_NAMES`), and each model's agreement is given per set too: a model above
    one set's p0 breaks the premise of that set's test, even where its agreement over the whole
    fingerprint stays under `p0` (the mean over every point)."""

    fingerprint_sha256: str
    p0: float
    test: str
    models: list[dict[str, Any]]
    p0_per_set: dict[str, float] = field(default_factory=dict)  # empty: one set of points

    @property
    def accused(self) -> list[str]:
        return [m["suspect"] for m in self.models if m["verdict"] == "piracy"]

    @property
    def above_p0(self) -> list[str]:
        """The models whose agreement exceeds p0: over the whole fingerprint, or with error
        points on any set against that set's own p0."""
        if not self.p0_per_set:
            return [m["suspect"] for m in self.models if m["agreement_all_points"] > self.p0]
        return [m["suspect"] for m in self.models
                if any(m["agreement_per_set"][k] > p for k, p in self.p0_per_set.items())]

    def to_dict(self) -> dict[str, Any]:
        d = {"fingerprint_sha256": self.fingerprint_sha256, "test": self.test, "p0": self.p0,
             "models": self.models, "accused": self.accused, "above_p0": self.above_p0,
             "passed": not self.accused}
        if self.p0_per_set:
            d["p0_per_set"] = self.p0_per_set
        return d


def run_challenge(fingerprint_path: Path, independents: list[str], config: AuditConfig,
                  progress: Callable[[str], None] | None = None) -> ChallengeResult:
    """Audit models the challenger chose and knows to be independent with the fingerprint's own
    test (`config`), as a suspect would be, and ask each of them every point once to set its
    agreement over the whole fingerprint beside p0. A fingerprint that accuses any of them, or
    whose p0 they exceed, does not bound independent models as its owner claims: the check a
    judge or an accused party runs against points every model answers the owner's way."""
    from deepcore_auditor.adapters.open import open_suspect

    if not independents:
        raise InputError("give at least one --independent model to challenge the fingerprint with")
    fp = load_fingerprint(fingerprint_path)
    config.validate()
    config = dataclasses.replace(config, test=resolve_test(fp, config.mode, config.test, config.alpha, config.budget))
    per_point = rates(fp, config.mode, config.test).p0
    p0 = float(per_point.mean())
    p0_per_set = set_means(fp, per_point)
    rows = []
    for suspect in independents:
        result = run_audit_request(AuditRequest(fingerprint_path=fingerprint_path, suspect=suspect, config=config, no_report=True))
        try:
            opened = open_suspect(suspect, convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes)
        except InputError as e:
            raise InputError(as_typed(str(e))) from e
        with opened as oracle:
            labels = oracle.query(fp.points, Access.LABELS)
        agree = labels == fp.owner_labels
        agreement = round(float(np.mean(agree)), 4)
        row = {"suspect": suspect, "verdict": result.verdict, "queries": result.queries_used,
               "agreement_audited": None if math.isnan(result.agreement) else result.agreement,
               "agreement_all_points": agreement}
        if p0_per_set:
            row["agreement_per_set"] = set_means(fp, agree)
        rows.append(row)
        if progress:
            each = "".join(f"; {name} {row['agreement_per_set'][name]:.3f} (p0 {p:.3f})" for name, p in p0_per_set.items())
            progress(f"{suspect}: {result.verdict} after {result.queries_used} queries; agreement {agreement:.3f} on all "
                     f"{len(fp)} points (p0 {p0:.3f}){each}")
    return ChallengeResult(fp.digest, round(p0, 4), config.test, rows, p0_per_set)


REPORTS_ENV = "DEEPCORE_REPORTS"


def default_reports_dir() -> Path:
    """Where audits keep their reports without --report: `$DEEPCORE_REPORTS`, else
    `$XDG_DATA_HOME/deepcore/reports` (`~/.local/share/deepcore/reports`)."""
    env = os.environ.get(REPORTS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME", "").strip()
    return (Path(data).expanduser() if data else Path.home() / ".local" / "share") / "deepcore" / "reports"


def sign_fingerprint_file(path: Path, key_file: Path | None, hmac_key_env: str | None, out: Path | None = None,
                          force: bool = False) -> str:
    """Sign a fingerprint (in place, or into `out`: never the key, nor an existing file unless
    `force`); returns its digest, unchanged by signing."""
    if out is not None and Path(path).exists() and same_file(out, path):
        out = None  # --out naming the fingerprint itself: signing in place, as without --out
    if out is not None:
        check_output(out, "--out", {"--key": key_file}, force=force)
    key = resolve_key(key_file, hmac_key_env)
    if key is None:
        raise InputError("signing needs a key: --key (an Ed25519 private key PEM) or --hmac-key-env")
    return sign_fingerprint(path, key, out)


def commit_fingerprint(path: Path, out: Path, key_file: Path | None = None, hmac_key_env: str | None = None,
                       force: bool = False) -> tuple[str, str]:
    """Write the commitment to a verified fingerprint; returns (fingerprint digest, commitment digest)."""
    check_output(out, "--out", {"fingerprint": path, "--key": key_file}, force=force)
    key = resolve_key(key_file, hmac_key_env)
    fp = load_fingerprint(path, key)
    return fp.digest, write_commitment(fp, out, utc_now(), key if key is not None and key.can_sign else None)


def verify_report_file(path: Path, key_file: Path | None = None, hmac_key_env: str | None = None,
                       ledger: Path | None = None, fingerprint: Path | None = None) -> Verification:
    return verify_report(path, resolve_key(key_file, hmac_key_env), ledger, fingerprint)


def render_report_file(path: Path, fmt: str, out: Path | None = None, key_file: Path | None = None,
                       hmac_key_env: str | None = None, ledger: Path | None = None, fingerprint: Path | None = None,
                       force: bool = False) -> tuple[str, Any]:
    """A report rendered for people (auditor.render): written to `out` all or nothing, and returned
    with what verifying it found (`auditor.render.Verified`).

    A file that is not a readable report is an error (one line); a report that reads but fails a
    verification check is rendered, with the failure in a banner: the page shows what was claimed
    and that it does not hold."""
    from deepcore_auditor.auditor.render import FORMATS, Verified, render_html, render_markdown
    from deepcore_auditor.auditor.report import REPORT_FORMAT, REPORT_VERSION
    from deepcore_auditor.fingerprints.format import read_document

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out is not None:
        if not Path(out).parent.is_dir():
            raise InputError(f"cannot write {out}: directory {Path(out).parent} does not exist")
        check_output(out, "--out", {"REPORT": path, "--ledger": ledger, "--fingerprint": fingerprint, "--key": key_file},
                     force=force)
    key = resolve_key(key_file, hmac_key_env)  # a key that cannot be read is the user's error, not the report's
    content = read_document(path, REPORT_FORMAT, REPORT_VERSION, ReportError, "audit report").content
    try:
        v = verify_report(path, key, ledger, fingerprint)
        verified = Verified(True, v.checks, caveat=v.caveat, signature=v.signature)
    except (ReportError, SignatureError) as e:  # a failed check or signature: shown on the page, not hidden
        verified = Verified(False, (), problem=first_line(e))
    try:
        text = (render_html if fmt == "html" else render_markdown)(content, verified)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as e:
        raise ReportError(f"{path}: malformed report content ({type(e).__name__}: {e})") from None
    if out is not None:
        atomic_write(out, text.encode())
    return text, verified


def _answered_on_disk(ledger: QueryLedger) -> int:
    """Answers the ledger file holds (what --resume will replay): an interrupt may land between
    a batch's write and its bookkeeping in memory, so the file is counted, not the object."""
    if ledger.path is None:
        return len(ledger)
    try:
        return len(QueryLedger.read(ledger.path, quiet=True))
    except InputError as e:
        logger.debug("counting the answers in %s failed: %s", ledger.path, e)
        return len(ledger)


def _resume_hint(ledger: Path, answered: int) -> str:
    return f"the ledger {ledger} holds {answered} answered queries: rerun with --resume to continue without asking them again"


def _describe_known(fp: Any, m: Any) -> str:
    """One known model: what it is, how it did on held-out data, its agreement on the kept points."""
    sets = point_sets(fp)
    same = m.labels == fp.owner_labels
    kept = f"{float(same[sets == 0].mean()):.3f}" + (f", on the error points {float(same[sets == 1].mean()):.3f}" if sets.max() else "")
    q = m.quality
    measured = (f"held-out accuracy {q['accuracy']:.3f}, agreement {q['agreement']:.3f}; " if q is not None
                else "held-out accuracy not measured; ")
    return f"{m.name} ({m.kind}, {m.family}, {m.role}): {measured}agreement on the kept points {kept}"


def describe_fingerprint(path: Path, key_file: Path | None = None, hmac_key_env: str | None = None) -> dict[str, Any]:
    """A verified fingerprint's summary: what it is, how it was made, its calibration, its signature."""
    key = resolve_key(key_file, hmac_key_env)
    fp = load_fingerprint(path, key)
    try:
        calibration: Any = rates(fp, "agreement", resolve_test(fp, "agreement", AuditConfig.test, AuditConfig.alpha, AuditConfig.budget)).summary
    except InputError as e:  # shown, not raised: inspect is where a user sees why audits refuse it
        calibration = f"refused: {e}"
    sig = fp.signature
    return {
        "sha256": fp.digest,
        "signature": "unsigned" if sig is None else (
            f"{sig.get('scheme')} key {sig.get('key_id')}, " + ("verified" if key is not None else "not verified (no key given)")
        ),
        "created": fp.created,
        "points": len(fp),
        "error_points": int(point_sets(fp).sum()),  # of which the owner's mistakes (calibration.point_sets)
        "point_shape": list(fp.point_shape),
        "classes": list(fp.classes),
        "convention": fp.convention.to_dict(),
        "owner": fp.owner_identity,
        "method": fp.method.get("name"),
        "owner_accuracy": fp.extra.get("owner_holdout_accuracy", fp.extra.get("owner_test_accuracy")),
        "epsilon": fp.method.get("params", {}).get("core", {}).get("epsilon"),
        "build_device": fp.extra.get("build_device"),  # None: built before it was recorded
        "known_models": [_describe_known(fp, m) for m in fp.known_models],
        "calibration": calibration,
    }
