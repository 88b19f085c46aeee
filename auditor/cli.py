"""The `deepcore` command: a thin layer over the library. It parses, calls, prints.

Exit status: 0 independent, 1 piracy, 3 inconclusive, 2 error (bad input, unusable suspect, a
usage error, an interrupt, an output that cannot be written, or an internal error: no failure
ever exits with a verdict's status). Every way out passes through `DeepcoreGroup.main`: click's
own standalone handlers would exit 1 — "piracy" — on a broken pipe or an abort. Progress lines
on stderr are best-effort (an unwritable stderr does not stop an audit); the error line is too:
when even it cannot be written, the status is still 2. A verdict's status is returned only once
its line is written and flushed to stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from inspect import signature
from pathlib import Path
from typing import Any, TypeVar

import click

from deepcore_auditor.adapters.base import LAYOUTS, Access
from deepcore_auditor.adapters.errors import DeepCoreError, InputError, first_line
from deepcore_auditor.auditor.audit import AuditConfig
from deepcore_auditor.auditor.bars import terminal_bars
from deepcore_auditor.fingerprints.calibration import MODES, TEST_CHOICES
from deepcore_auditor.fingerprints.config import (
    BUILD_DEVICES,
    ZOO_SIZES,
    BuildConfig,
    CoreConfig,
)
from deepcore_auditor.fingerprints.progress import QUIET

EXIT = {"independent": 0, "piracy": 1, "inconclusive": 3}
EXIT_ERROR = 2
_AUDIT_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(AuditConfig))  # the options that make the test
F = TypeVar("F", bound=Callable[..., Any])


def _say(message: str) -> None:
    """A progress or notice line on stderr, best-effort: a lost progress line loses no result."""
    try:
        click.echo(message, err=True)
    except (OSError, ValueError):  # stderr closed, full or a broken pipe
        pass


def _fail(message: str) -> None:
    _say(f"deepcore: error: {message}")
    sys.exit(EXIT_ERROR)


def _flush_or_error(code: int) -> int:
    """Flush stdout and stderr; a verdict's (or success's) status holds only if its output got out.
    Whatever could not be written is then discarded (stdout and stderr pointed at /dev/null), so
    that Python's own flush at exit cannot fail again and exit 120."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        code = EXIT_ERROR
        _discard(sys.stdout)
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        _discard(sys.stderr)
    return code


def _discard(stream: Any) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's buffer)
        pass


class DeepcoreGroup(click.Group):
    """The command group whose `main` owns the exit status (see the module's docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0  # an Exit (--help, --version) returns its code
        except SystemExit as e:  # the commands' own sys.exit: verdicts and _fail
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else EXIT_ERROR
        except click.exceptions.Abort:  # Ctrl-C or end of input while click parses or prompts
            _say("deepcore: error: interrupted")
            code = EXIT_ERROR
        except click.ClickException as e:  # usage errors: one line, naming the option as typed
            where = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx is not None else "deepcore"
            _say(f"deepcore: error: {first_line(click.ClickException(e.format_message()), whole=True)} (see '{where} --help')")
            code = EXIT_ERROR
        except OSError as e:  # stdout gone while click itself wrote (help, version)
            logging.getLogger(__name__).debug("output failed", exc_info=True)
            _say(f"deepcore: error: cannot write output: {e.strerror or e}")
            code = EXIT_ERROR
        except Exception as e:  # a bug outside any command: still never a verdict's status
            logging.getLogger(__name__).debug("internal error", exc_info=True)
            _say(f"deepcore: error: internal error ({type(e).__name__}: {first_line(e, empty='')})")
            code = EXIT_ERROR
        code = _flush_or_error(code)
        if not standalone_mode:
            return code
        sys.exit(code)


def _guarded(fn: F) -> F:
    """Translate the project's errors (and OS errors on user files) into one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeepCoreError as e:
            _fail(first_line(e))
        except OSError as e:
            _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        except KeyboardInterrupt as e:  # notes say what was kept (e.g. the ledger and --resume)
            _fail("; ".join(["interrupted", *getattr(e, "__notes__", [])]))
        except Exception as e:  # a bug: never let it leave with exit 1, which means "piracy"
            logging.getLogger(__name__).debug("internal error", exc_info=True)
            _fail(f"internal error ({type(e).__name__}: {first_line(e, empty='')}); run with -vv for the traceback")

    return wrapper  # type: ignore[return-value]


def _auto_or_float(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """`auto` (None: chosen by the builder) or a number; positivity is checked with the other values."""
    if value is None or value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected auto or a number, got {value!r}") from None


def _key_options(fn: F) -> F:
    """--key / --hmac-key-env: the key that signs or verifies (give at most one)."""
    fn = click.option("--hmac-key-env", metavar="NAME", help="Environment variable holding an HMAC-SHA256 key (16+ bytes; never shown).")(fn)
    return click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), help="Ed25519 key, PEM: a private key signs (and verifies), a public key verifies.")(fn)


@click.group(cls=DeepcoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(package_name="deepcore-auditor")
def cli(verbose: int) -> None:
    """DeepCore: tell pirated copies of your classifier from independent look-alikes, black-box."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


_RAY_TRAINS = ("Train the simulated pirates and references (the benchmark's zoo, for bench) as tasks on a Ray cluster "
               "(auto: the one RAY_ADDRESS or `ray start` names), each with this run's torch threads, so the results "
               "are the local run's; its workers need this package with its owner extra.")


def _source_date() -> str | None:
    """SOURCE_DATE_EPOCH (reproducible-builds.org) as the ISO 8601 time a built file records."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not raw:
        return None
    if not raw.isdigit():
        raise InputError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {raw!r}")
    return datetime.datetime.fromtimestamp(int(raw), datetime.timezone.utc).isoformat(timespec="seconds")


@cli.command()
@click.option("--owner", required=True, help="TorchScript file, torch.export .pt2, or package.module:factory.")
@click.option("--owner-weights", help="Weights for a factory owner: .safetensors or a state dict.")
@click.option("--owner-arg", "owner_args", multiple=True, metavar="NAME=VALUE",
              help="A keyword argument of a factory owner, VALUE as JSON when it is (num_classes=10, widths=[32,64]); repeatable.")
@click.option("--data", required=True, help="fashion-mnist, an .npz (x, y), an ImageFolder dir or a .tar.gz of one.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Fingerprint file to write.")
@click.option("--layout", type=click.Choice(LAYOUTS, case_sensitive=False), default="NCHW", show_default=True, help="Owner input layout.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Owner input = (x*scale - mean)/std, x in [0,1].")
@click.option("--mean", help="Per-channel mean, comma-separated (default: the data's own).")
@click.option("--std", help="Per-channel std, comma-separated (default: the data's own).")
@click.option("--reference", "references", multiple=True, help="An independent model you own (any suspect format); held out for calibration. Repeatable.")
@click.option("--zoo", "zoo_size", type=click.Choice(list(ZOO_SIZES)), default="default", show_default=True,
              help="How many references the builder trains: " + "; ".join(
                  f"{k}: {c} calibration and {s} selection per recipe" for k, (c, s) in ZOO_SIZES.items())
              + " (smaller: a faster build, a higher p0).")
@click.option("--calibration-references", type=int,
              help="Independent references the builder trains and holds out to set p0 (more: a surer, often tighter bound; "
                   "each costs a training) [default: the --zoo size's].")
@click.option("--selection-references", type=int,
              help="Independent references of the owner's architecture per training recipe (Adam, SGD) that the core points "
                   "are pushed away from (more: points unseen models of the owner's kind share less, a lower p0; each costs "
                   "a training) [default: the --zoo size's].")
@click.option("--points", "n_points", type=int, default=CoreConfig.n_points, show_default=True, help="Core points kept.")
@click.option("--candidates", type=int, default=CoreConfig.n_candidates, show_default=True, help="Candidate points optimized.")
@click.option("--epsilon", type=float, default=CoreConfig.epsilon, help="L-inf radius around each seed, in [0,1] pixel units (default: 3x the radius at which the owner flips, measured).")
@click.option("--steps", type=int, default=CoreConfig.steps, show_default=True, help="Optimization steps per point.")
@click.option("--min-confidence", type=float, default=CoreConfig.min_confidence, show_default=True, help="Owner confidence a core point must reach.")
@click.option("--uint8-points", is_flag=True, help="Keep the core points on the 8-bit grid (values k/255), so they travel unchanged as PNG images (audit --image-format png).")
@click.option("--error-points", type=click.IntRange(min=0), default=CoreConfig.error_points, show_default=True,
              help="Also keep up to this many held-out samples the owner gets wrong and its simulated students copy: "
                   "a second set of points with its own test, for students of other architectures (0: core points only).")
@click.option("--reference-weight", default="auto", show_default=True, callback=_auto_or_float,
              help="Weight of pushing references away; auto: the smallest of 2, 4, 8, 16 on which an exact copy is identified within a quarter of the points.")
@click.option("--train-samples", type=int, default=BuildConfig.train_samples, show_default=True, help="Owner-data samples for each simulation/reference (train them as well as the owner: weak references understate p0).")
@click.option("--epochs", type=int, default=BuildConfig.epochs, show_default=True, help="Least training epochs of simulations and references.")
@click.option("--max-epochs", type=int, default=BuildConfig.max_epochs, show_default=True, help="Most epochs for a model still below the owner's accuracy (0: 4 x --epochs).")
@click.option("--sgd-epochs", type=int, default=BuildConfig.sgd_epochs, show_default=True,
              help="Epochs of the references trained by the SGD recipe, a fixed one-cycle schedule (0: 2 x --epochs + 2).")
@click.option("--seed", type=click.IntRange(min=0), default=BuildConfig.seed, show_default=True)
@click.option("--device", type=click.Choice(BUILD_DEVICES), default=BuildConfig.device, show_default=True,
              help="Where the simulated pirates and references train and the core points grow: auto (a CUDA GPU when "
                   "PyTorch sees one, else the CPU), cpu, or cuda (refused without a GPU). Recorded in the fingerprint; "
                   "cached models serve either.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where decoded data and trained known models are cached, so a stopped or repeated build reuses them "
                   "[default: $DEEPCORE_CACHE or ~/.cache/deepcore].")
@click.option("--ray", metavar="auto|ADDRESS", help=_RAY_TRAINS)
@_key_options
@click.option("--force", is_flag=True, help="Replace an existing output file (never one of the inputs or a key).")
@_guarded
def fingerprint(**o: Any) -> None:
    """Build a DeepCore fingerprint from the owner's model and data.

    SOURCE_DATE_EPOCH, when set, is the time the file records (whole seconds since 1970): two
    builds of the same owner, data and options then write the same bytes (its sha256 equal)."""
    from deepcore_auditor.auditor.commands import FingerprintRequest, build_config, make_fingerprint

    o["created"] = _source_date()
    build = build_config(**{k: o.pop(k) for k in signature(build_config).parameters})
    fp, digest = make_fingerprint(FingerprintRequest(build=build, **o), progress=_say, bars=terminal_bars())
    errors = int(fp.extra.get("error_points", 0))  # the file just built
    click.echo(f"wrote {o['out']}: {len(fp) - errors} core points" + (f" and {errors} error points" if errors else "")
               + f", sha256 {digest}")


@cli.command()
@click.option("--fingerprint", "fingerprint_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--suspect", required=True, help="Suspect: .onnx, TorchScript/.pt2, triton+http(s)/grpc(s)://HOST:PORT/MODEL[/VERSION] (Triton), or v2+http(s)/grpc(s)://... (any KServe v2 / Open Inference Protocol server).")
@click.option("--access", type=click.Choice([a.value for a in Access]), default=AuditConfig.access.value, show_default=True)
@click.option("--mode", type=click.Choice(MODES), default=AuditConfig.mode, show_default=True)
@click.option("--budget", type=int, default=AuditConfig.budget, show_default=True, help="Hard limit on queries sent.")
@click.option("--batch-size", type=int, default=AuditConfig.batch_size, show_default=True, help="Queries per sequential step.")
@click.option("--alpha", type=float, default=AuditConfig.alpha, show_default=True, help="False identification rate.")
@click.option("--beta", type=float, default=AuditConfig.beta, show_default=True, help="Missed identification rate.")
@click.option("--test", type=click.Choice(TEST_CHOICES), default=AuditConfig.test, show_default=True, help="Sequential test: betting (anytime-valid, sampling without replacement), sprt (Wald's, as reports before it), or auto: betting when the fingerprint's p0 is a prediction bound for unseen models, else Wald's.")
@click.option("--seed", type=click.IntRange(min=0), default=AuditConfig.seed, show_default=True, help="Order in which points are asked.")
@click.option("--suspect-layout", type=click.Choice(LAYOUTS, case_sensitive=False), help="Suspect input layout (default: owner's).")
@click.option("--suspect-scale", type=float, help="Suspect input scale (default: owner's).")
@click.option("--suspect-mean", help="Suspect per-channel mean (default: owner's).")
@click.option("--suspect-std", help="Suspect per-channel std (default: owner's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--ort-providers", metavar="P1,P2", help="ONNX suspects: ONNX Runtime execution providers, in order, instead of --device (cuda, tensorrt, openvino, cpu, or full names); each must load. The report records the providers used.")
@click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path), help="Keep every answered query in this JSONL file.")
@click.option("--resume", is_flag=True, help="Continue the audit in --ledger without asking its points again.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the audit report here [default: a new file under $DEEPCORE_REPORTS or ~/.local/share/deepcore/reports].")
@click.option("--no-report", is_flag=True, help="Keep no report of this audit.")
@click.option("--retries", type=int, default=3, show_default=True, help="Attempts per batch when the suspect fails transiently (timeout, 503); each is charged to the budget.")
@click.option("--retry-backoff", type=float, default=0.5, show_default=True, help="Seconds before the first retry, doubling after each (raise it for a rate-limited endpoint).")
@click.option("--concurrency", type=int, help="Server suspects: requests in flight at once [default: 4].")
@click.option("--request-timeout", type=float, help="Seconds to wait for one request (server) or one batch (ONNX) before the audit ends with an error [default: 60 server, 300 ONNX].")
@click.option("--connect-timeout", type=float, help="Server suspects: seconds to wait for the server when opening [default: 10].")
@click.option("--auth-token-env", metavar="NAME", help="Server suspects: environment variable holding a bearer token (sent as Authorization, never shown).")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'", help="Server suspects: extra request header; repeatable.")
@click.option("--ssl/--no-ssl", default=None, help="Server suspects: use TLS with a +http/+grpc URL (same as +https/+grpcs).")
@click.option("--ssl-root-certificates", type=click.Path(dir_okay=False, path_type=Path), help="Server TLS: PEM file of the certificates to trust.")
@click.option("--ssl-insecure", is_flag=True, help="Server HTTPS: skip certificate verification (trials only).")
@click.option("--image-format", help="Server suspects whose input is an encoded image (BYTES): send each point as png (lossless; needs a fingerprint built with --uint8-points) or jpeg:QUALITY.")
@click.option("--lossy-images", is_flag=True, help="Accept --image-format jpeg:Q, which alters every point (the report says so).")
@click.option("--labels-via", type=click.Choice(["auto", "classification", "argmax"]), help="Triton --access labels: top-1 from the classification extension or argmax of the output [default: auto; v2+ URLs: argmax].")
@click.option("--repeat-checks", type=int, default=AuditConfig.repeat_checks, show_default=True, help="Points asked again before an independent verdict; a suspect that answers differently gets inconclusive (0: off).")
@click.option("--commitment", type=click.Path(dir_okay=False, path_type=Path), help="The owner's published commitment: refuse any other fingerprint, and record it in the report.")
@_key_options
@click.option("--force", is_flag=True, help="Replace an existing output file (never one of the inputs or a key).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_guarded
def audit(**o: Any) -> None:
    """Audit a suspect model against a fingerprint; exit 0 independent, 1 piracy, 3 inconclusive."""
    from deepcore_auditor.auditor.commands import AuditRequest, run_audit_request

    as_json = o.pop("as_json")
    o["headers"] = tuple(o["headers"])
    config = AuditConfig(access=Access(o.pop("access")), **{k: o.pop(k) for k in _AUDIT_CONFIG_FIELDS if k != "access"})
    bars = terminal_bars(enabled=not as_json)  # on a terminal, a bar over the budget replaces the step lines
    with bars.bar(f"auditing (budget {config.budget} queries)", config.budget) as advance:
        asked = [0]

        def tick(s: Any) -> None:  # the bar moves by the queries charged since the last step
            advance(s.queries - asked[0])
            asked[0] = s.queries

        def line(s: Any) -> None:
            against = "" if s.llr_independent is None else f"  (against piracy {s.llr_independent:+.2f})"
            _say(f"  {s.queries:4d} queries  agreement {s.agreement:.3f}  {'llr' if s.llr_independent is None else 'log wealth'} "
                 f"{s.llr:+.2f}{against}")

        step = None if as_json else line if bars is QUIET else tick
        result = run_audit_request(AuditRequest(config=config, **o), progress=step)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(
            f"verdict: {result.verdict}  ({result.queries_used}/{result.budget} queries, agreement {result.agreement:.3f}, "
            f"p0 {result.p0:.3f}, p1 {result.p1:.3f}, alpha {result.alpha}, {result.elapsed_s:.2f}s)"
        )
        for note in result.notes:
            click.echo(f"note: {note}")
    if result.report:
        _say(f"report: {result.report}")
    sys.exit(EXIT[result.verdict])


@cli.command("audit-many")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for each pair's ledger and report (OUT/ID/) and the summary; run again with the same folder to resume.")
@click.option("--jobs", type=int, default=8, show_default=True, help="Audits at once.")
@click.option("--per-endpoint", type=int, default=4, show_default=True, help="Audits at once against one server (scheme, host, port).")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", help="Run the pairs as tasks on a Ray cluster (auto: the one RAY_ADDRESS or `ray start` names); its workers need this package and the same paths.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@_guarded
def audit_many(manifest: Path, out: Path, jobs: int, per_endpoint: int, ray_address: str | None, as_json: bool) -> None:
    """Audit every (fingerprint, suspect) pair of MANIFEST (JSON Lines or .csv; keys: the audit
    options, fingerprint, suspect, id); exit 0 when each ended with a verdict, 2 when any errored."""
    from deepcore_auditor.auditor.many import check_limits, read_manifest, run_many

    check_limits(jobs, per_endpoint)
    pairs = read_manifest(manifest)

    def said(o: Any) -> None:
        what = o.error if o.status == "error" else f"{o.queries} queries" + ("" if o.resumed == "new" else f", {o.resumed}")
        _say(f"  {o.id}: {o.status} ({what})")

    # Ray's driver prints its cluster's warnings on stdout ("(raylet) WARNING: ..."): they go to
    # stderr here, so that stdout holds the summary alone (one JSON object with --json).
    with contextlib.redirect_stdout(sys.stderr) if ray_address else contextlib.nullcontext():
        summary = run_many(pairs, out, jobs=jobs, per_endpoint=per_endpoint, manifest=str(manifest),
                           on_done=None if as_json else said, ray_address=ray_address)
    d = summary.to_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        click.echo(", ".join(f"{v} {k}" for k, v in d["counts"].items()) + f"; summary: {out / 'summary.md'}")
    sys.exit(EXIT_ERROR if summary.errors else 0)


@cli.command()
@click.argument("fingerprint_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@_key_options
@_guarded
def inspect(fingerprint_path: Path, as_json: bool, key_file: Path | None, hmac_key_env: str | None) -> None:
    """Verify a fingerprint file (its digest; its signature with a key) and summarize it."""
    from deepcore_auditor.auditor.commands import describe_fingerprint

    d = describe_fingerprint(fingerprint_path, key_file, hmac_key_env)
    click.echo(json.dumps(d) if as_json else "\n".join(f"{k}: {v}" for k, v in d.items()))


@cli.command()
@click.argument("fingerprint_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the signed copy here [default: sign in place].")
@_key_options
@click.option("--force", is_flag=True, help="Replace an existing output file (never one of the inputs or a key).")
@_guarded
def sign(fingerprint_path: Path, out: Path | None, key_file: Path | None, hmac_key_env: str | None, force: bool) -> None:
    """Sign a fingerprint with an Ed25519 private key or an HMAC key (its digest is unchanged)."""
    from deepcore_auditor.auditor.commands import sign_fingerprint_file

    digest = sign_fingerprint_file(fingerprint_path, key_file, hmac_key_env, out, force)
    click.echo(f"signed {out or fingerprint_path}: sha256 {digest}")


@cli.command()
@click.argument("fingerprint_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Commitment file to write.")
@_key_options
@click.option("--force", is_flag=True, help="Replace an existing output file (never one of the inputs or a key).")
@_guarded
def commit(fingerprint_path: Path, out: Path, key_file: Path | None, hmac_key_env: str | None, force: bool) -> None:
    """Write the commitment to publish before auditing; prints the fingerprint digest it fixes."""
    from deepcore_auditor.auditor.commands import commit_fingerprint

    fp_digest, _ = commit_fingerprint(fingerprint_path, out, key_file, hmac_key_env, force)
    click.echo(f"wrote {out}: publish this digest before auditing: sha256 {fp_digest}")


@cli.command()
@click.option("--private", "private_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Private key PEM to write (mode 0600).")
@click.option("--public", "public_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Public key PEM to write.")
@_guarded
def keygen(private_path: Path, public_path: Path) -> None:
    """Make an Ed25519 key pair for signing fingerprints and reports (never overwrites a file)."""
    from deepcore_auditor.fingerprints.signing import generate_ed25519

    key = generate_ed25519(private_path, public_path)
    click.echo(f"wrote {private_path} and {public_path}: key id {key.key_id}")


@cli.command("verify-report")
@click.argument("report_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path), help="Also check that this ledger file is the one the report embeds.")
@click.option("--fingerprint", "fingerprint_path", type=click.Path(dir_okay=False, path_type=Path), help="Also recompute the plan from this fingerprint.")
@_key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_guarded
def verify_report(report_path: Path, ledger: Path | None, fingerprint_path: Path | None, key_file: Path | None,
                  hmac_key_env: str | None, as_json: bool) -> None:
    """Recompute an audit report's verdict from its ledger and check its digests (and signature).

    Exit 0 when everything verifies; 2, with the first failed check, when it does not.
    """
    from deepcore_auditor.auditor.commands import verify_report_file

    v = verify_report_file(report_path, key_file, hmac_key_env, ledger, fingerprint_path)
    if as_json:
        click.echo(json.dumps(v.to_dict()))
        return
    click.echo(f"report verifies: verdict {v.verdict} on {v.answered} points ({v.queries_used} queries charged); {v.signature}")
    for check in v.checks:
        click.echo(f"  ok  {check}")
    if v.caveat:
        click.echo(f"note: {v.caveat}")


@cli.command()
@click.option("--fingerprint", "fingerprint_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--independent", "independents", multiple=True, required=True, metavar="SUSPECT",
              help="A model the challenger knows to be independent of the owner (any suspect form audit takes); repeatable.")
@click.option("--budget", type=int, default=AuditConfig.budget, show_default=True, help="Queries of each audit.")
@click.option("--alpha", type=float, default=AuditConfig.alpha, show_default=True)
@click.option("--test", type=click.Choice(TEST_CHOICES), default=AuditConfig.test, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=AuditConfig.seed, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_guarded
def challenge(fingerprint_path: Path, independents: tuple[str, ...], budget: int, alpha: float, test: str, seed: int,
              as_json: bool) -> None:
    """Test a fingerprint against models you know to be independent: each is audited with the
    fingerprint's own test, and asked every point once to set its agreement beside p0.

    The way a judge or an accused party checks an owner's claim: points that every model answers
    the owner's way would accuse these models too. Exit 0 when none is accused, 1 when any is,
    2 on an error.
    """
    from deepcore_auditor.auditor.commands import run_challenge

    config = AuditConfig(budget=budget, alpha=alpha, test=test, seed=seed)
    result = run_challenge(fingerprint_path, list(independents), config, progress=None if as_json else _say)
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        click.echo(f"{'FAILED' if result.accused else 'passed'}: {len(result.accused)} of {len(result.models)} independent models "
                   f"accused; {len(d['above_p0'])} agree above p0 " + (
                       f"{result.p0:.3f} on all points" if not result.p0_per_set else
                       "on a set of points (" + ", ".join(f"{k} {v:.3f}" for k, v in result.p0_per_set.items()) + ")"))
    sys.exit(1 if result.accused else 0)


@cli.command("report")
@click.argument("report_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default="html", show_default=True, help="One self-contained HTML page, or Markdown.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the page here [default: stdout].")
@click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path), help="Also check that this ledger file is the one the report embeds.")
@click.option("--fingerprint", "fingerprint_path", type=click.Path(dir_okay=False, path_type=Path), help="Also recompute the plan from this fingerprint.")
@_key_options
@click.option("--force", is_flag=True, help="Replace an existing output file (never one of the inputs or a key).")
@_guarded
def report(report_path: Path, fmt: str, out: Path | None, ledger: Path | None, fingerprint_path: Path | None,
           key_file: Path | None, hmac_key_env: str | None, force: bool) -> None:
    """Render an audit report for people: the verdict in plain words, the evidence plotted, the
    identities and digests, and the result of verifying it (the checks of verify-report).

    Exit 0 when the report verifies; 2 when it cannot be read, or when it fails a check — the page
    is still written then, with the failure at its top, and the one-line error says which check.
    """
    from deepcore_auditor.auditor.commands import render_report_file

    text, verified = render_report_file(report_path, fmt, out, key_file, hmac_key_env, ledger, fingerprint_path, force)
    if out is None:
        click.echo(text, nl=False)
    if not verified.ok:
        _say(f"deepcore: error: the report does not verify ({'the page' if out is None else out} says so at its top): {verified.problem}")
        sys.exit(2)
    if out is not None:
        _say(f"wrote {out}")


@cli.command("serve-triton")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", "names", multiple=True, help="Model name on the server, one per MODEL in order [default: the file's name].")
@click.option("--repository", type=click.Path(file_okay=False, path_type=Path), help="Write the model repository (and server log) here, a new or empty directory, kept [default: a temporary one, removed].")
@click.option("--max-batch-size", type=int, default=64, show_default=True, help="Samples per request the models accept (0: one, no batch axis).")
@_guarded
def serve_triton(models: tuple[Path, ...], names: tuple[str, ...], repository: Path | None, max_batch_size: int) -> None:
    """Serve ONNX models on a local Triton server (127.0.0.1, free ports) for a trial audit.

    Prints each model's triton+http:// and triton+grpc:// URL on stdout, one per line, then
    serves until Ctrl-C or SIGTERM; the server is always stopped. Needs nvidia-pytriton.
    """
    from deepcore_auditor.auditor.trial_server import Served, ServeRequest, serve_until_stopped

    def ready(served: Served) -> None:
        for urls in served.urls.values():
            click.echo(urls["http"])
            click.echo(urls["grpc"])
        sys.stdout.flush()
        _say(f"tritonserver (pid {served.pid}) serves {len(served.urls)} model(s) from {served.repository}; stop it with Ctrl-C or SIGTERM")

    why = serve_until_stopped(ServeRequest(models=models, names=names, repository=repository, max_batch_size=max_batch_size), ready)
    _say(f"tritonserver stopped ({why})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--triton", is_flag=True, help="Serve the suspects from a local Triton server and audit them over HTTP and gRPC.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Where models are cached (default ~/.cache/deepcore).")
@click.option("--budget", type=int, default=200, show_default=True)
@click.option("--alpha", type=float, default=0.01, show_default=True)
@_guarded
def demo(as_json: bool, triton: bool, cache_dir: Path | None, budget: int, alpha: float) -> None:
    """Train a Fashion-MNIST owner and its suspects, fingerprint, audit each through ONNX Runtime (or Triton)."""
    from deepcore_auditor.auditor.demo import run_demo

    transports = ("http", "grpc") if triton else ("onnx",)
    report = run_demo(cache_dir=cache_dir, budget=budget, alpha=alpha, transports=transports, progress=_say)
    if as_json:
        click.echo(json.dumps(report))
        return
    rows = report["suspects"]
    click.echo(f"{'suspect':<28}{'via':<6}{'truth':<13}{'verdict':<13}{'queries':>8}{'agreement':>11}{'time s':>8}")
    for r in rows:
        mark = "" if r["truth"] == r["verdict"] else "  <-- wrong"
        click.echo(f"{r['name']:<28}{r['transport']:<6}{r['truth']:<13}{r['verdict']:<13}{r['queries_used']:>8}{r['agreement']:>11.3f}{r['time_s']:>8.2f}{mark}")
    click.echo(f"{sum(r['truth'] == r['verdict'] for r in rows)}/{len(rows)} verdicts right; fingerprint {report['fingerprint_sha256'][:16]}..")


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        _fail(f"{what} must be comma-separated integers, got {text!r}")
        raise  # unreachable: _fail exits


@cli.command()
@click.option("--data", required=True, help="fashion-mnist, or a CIFAR-10-like ImageFolder directory / .tar.gz (e.g. cifar10-jpeg.tar.gz).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for results.json, results.md and the plots.")
@click.option("--members", type=int, default=5, show_default=True, help="Suspects per evaluated family.")
@click.option("--epochs", type=int, default=3, show_default=True, help="Epochs of every model trained from scratch (owner included).")
@click.option("--train-samples", type=int, default=0, show_default=True, help="Cap on each training half (0: the whole half).")
@click.option("--adv-epsilon", type=float, default=0.1, show_default=True, help="L-inf radius of the adversarially fine-tuned suspects.")
@click.option("--points", "n_points", type=int, default=400, show_default=True, help="Points in every method's fingerprint.")
@click.option("--candidates", type=int, default=1200, show_default=True, help="DeepCore's candidate points.")
@click.option("--epsilon", type=float, default=None, help="DeepCore's L-inf radius, and CAE's (default: chosen from the owner's "
                                                         "robustness, as fingerprint's).")
@click.option("--zoo", "zoo_size", type=click.Choice(list(ZOO_SIZES)), default="default", show_default=True,
              help="DeepCore's zoo size (as fingerprint's).")
@click.option("--selection-references", type=int, help="DeepCore's selection references of the owner's architecture per recipe "
                                                        "(as fingerprint's) [default: the --zoo size's].")
@click.option("--without", default="", help="DeepCore zoo members left out of its build, comma-separated (what they buy: "
                                            "benchmarks.zoo_ablation).")
@click.option("--sgd-epochs", type=int, default=BuildConfig.sgd_epochs, show_default=True,
              help="DeepCore's SGD references' epochs (as fingerprint's).")
@click.option("--budgets", default="10,20,50,100,200,400", show_default=True, help="Query budgets, comma-separated.")
@click.option("--methods", default="", help="Methods to compare, comma-separated (default: all).")
@click.option("--alpha", type=float, default=0.01, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=BuildConfig.seed, show_default=True)
@click.option("--test", type=click.Choice(TEST_CHOICES), default=AuditConfig.test, show_default=True, help="The sequential audits' test (clustering always runs Wald's).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Where the zoo is cached (default ~/.cache/deepcore).")
@click.option("--ray", metavar="auto|ADDRESS", help=_RAY_TRAINS)
@_guarded
def bench(data: str, out: Path, members: int, epochs: int, train_samples: int, adv_epsilon: float, n_points: int, candidates: int,
          epsilon: float | None, zoo_size: str, selection_references: int | None, without: str, sgd_epochs: int, budgets: str,
          methods: str, alpha: float, seed: int, test: str, cache_dir: Path | None, ray: str | None) -> None:
    """Benchmark DeepCore against IPGuard, AKH, SAC, CAE and random points on a zoo of piracy and homologous suspects.

    SOURCE_DATE_EPOCH, when set, is the time DeepCore's fingerprint records (see fingerprint)."""
    from deepcore_auditor.benchmarks.piracy import SCORES, BenchConfig, run_bench
    from deepcore_auditor.benchmarks.zoo import ZooConfig

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) or tuple(SCORES)
    zoo = ZooConfig(members=members, epochs=epochs, train_samples=train_samples, adv_epsilon=adv_epsilon, seed=seed)
    config = BenchConfig(data=data, zoo=zoo, budgets=_int_list(budgets, "--budgets"), alpha=alpha, n_points=n_points,
                         candidates=candidates, epsilon=epsilon, methods=chosen, seed=seed, test=test,
                         zoo_size=zoo_size, selection_references=selection_references,
                         without=tuple(w.strip() for w in without.split(",") if w.strip()), sgd_epochs=sgd_epochs)
    results = run_bench(config, out, cache_dir=cache_dir, progress=_say, bars=terminal_bars(), ray=ray, created=_source_date())
    for mode, bar in results["bar"].items():
        for b in bar:
            click.echo(f"{mode}: {'met' if b['met'] else 'NOT MET':<8} {b['criterion']}: {b['measured']}")
    click.echo(f"results in {out} ({results['run_s']:.0f} s)")


def main() -> None:
    cli(prog_name="deepcore")
