"""The reliability promises at the counts they claim, outside the test suite.

    python -m deepcore_auditor.benchmarks.soak sequences --count 10000 --out benchmarks/results/soak
    python -m deepcore_auditor.benchmarks.soak fuzz --runs 1000000 --world WORLD --out benchmarks/results/soak

`sequences`: random sequences of batches — new points, points seen before, repeat checks —
against a real ONNX Runtime suspect behind the audit's own channel (`QueryChannel`: ledger,
retries, hard budget), with transient failures (retried), permanent ones (not), and kills: the
run is abandoned mid-sequence, its ledger sometimes torn mid-line, and resumed from the file
with what is left of the budget. After every sequence, read back from disk: the budget was
never passed across the runs, every answer the suspect gave is in the ledger exactly once, and
no answer was asked again after a resume. The suite runs the same property 60 times
(tests/test_channel.py).

`fuzz`: coverage-guided fuzzing (atheris, libFuzzer) of every parser that reads a file a user
hands over — fingerprint, commitment, audit report (with its embedded ledger, replayed),
ledger, Ed25519 key, `.npz` data — from real seeds (the small world's fingerprint cut to 8
points, a real report and ledger of an audit of it, a key, an npz). Each target runs in its
own process for `runs / targets` executions; a *finding* is any exception other than the
project's own errors (`DeepCoreError`), counted, each distinct error kept once with the first
input that raised it, never stopping the run.

Both print a table and write `results.json` and `results.md` under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = ("fingerprint", "commitment", "report", "ledger", "key", "npz")


# ----------------------------------------------------------------------------- sequences


def run_sequences(count: int, seed: int, workdir: Path) -> dict[str, Any]:
    """`count` random fault/retry/kill sequences; returns counts and every violation found."""
    import torch

    from deepcore_auditor.adapters.base import Access, InputConvention, Oracle, OracleInfo
    from deepcore_auditor.adapters.errors import OracleError, TransientOracleError
    from deepcore_auditor.adapters.onnx import OnnxOracle
    from deepcore_auditor.auditor.channel import QueryChannel
    from deepcore_auditor.auditor.errors import BudgetExceeded
    from deepcore_auditor.auditor.ledger import QueryLedger
    from deepcore_auditor.fingerprints.models import build_architecture, export_onnx

    shape = (1, 8, 8)
    torch.manual_seed(seed)
    model = workdir / "m.onnx"
    export_onnx(build_architecture("mlp", shape, 10), model, shape)
    suspect = OnnxOracle(model, convention=InputConvention(), point_shape=shape, num_classes=10)

    class Killed(BaseException):
        """The process dies inside a send: after the charge is on disk, before the answer is."""

    class Faulty(Oracle):
        """The real suspect, failing transiently, permanently, or by a kill on the calls listed;
        counts every point it really answered."""

        def __init__(self, fails: set[int], broken: set[int], kills: set[int]) -> None:
            self.fails, self.broken, self.kills, self.calls = fails, broken, kills, 0
            self.answered = 0

        @property
        def info(self) -> OracleInfo:
            return suspect.info

        def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
            self.calls += 1
            if self.calls in self.kills:
                raise Killed()
            if self.calls in self.fails:
                raise TransientOracleError("simulated timeout")
            if self.calls in self.broken:
                raise OracleError("simulated malformed answer")
            out = suspect.query(points, access)
            self.answered += len(points)
            return out

    violations: list[dict[str, Any]] = []
    kills = tears = batches_total = answers_total = 0
    t0 = time.perf_counter()

    def calls(rng: np.random.Generator, most: int) -> set[int]:
        return set(rng.choice(np.arange(1, 40), size=int(rng.integers(0, most + 1)), replace=False).tolist())

    for i in range(count):
        rng = np.random.default_rng([seed, i])
        budget = int(rng.integers(0, 61))
        faulty = Faulty(calls(rng, 8), calls(rng, 2), calls(rng, 2))
        pool = rng.random((40, *shape), dtype=np.float32)  # the points a sequence draws from (so some repeat)
        path = workdir / f"ledger-{i % 64}.jsonl"
        path.unlink(missing_ok=True)
        header = {"soak": i}
        ledger = QueryLedger.open(path, header, resume=False, lock=False)
        channel = QueryChannel(faulty, 10, ledger, budget, retries=3, sleep=lambda s: None)
        for _ in range(int(rng.integers(1, 16))):
            batches_total += 1
            killed = rng.random() < 0.1  # killed between batches (besides the kills inside a send)
            if not killed:
                idx = rng.choice(len(pool), size=int(rng.integers(1, 13)))
                try:
                    again = rng.random() < 0.2
                    out = channel.ask_again(pool[idx], Access.LABELS) if again else channel.ask(pool[idx], Access.LABELS)
                    if len(out) != len(idx):
                        violations.append({"sequence": i, "what": "answer count differs from the batch"})
                except (BudgetExceeded, TransientOracleError, OracleError):
                    pass
                except Killed:
                    killed = True
            if ledger.spent > budget:
                violations.append({"sequence": i, "what": f"budget passed: {ledger.spent} > {budget}"})
            if killed:  # resume from the file alone, with what the earlier runs left of the budget
                kills += 1
                ledger.close()
                if rng.random() < 0.5:
                    tears += 1
                    with open(path, "ab") as f:
                        f.write(b'{"digest": "0f3a')  # a write cut short
                ledger = QueryLedger.open(path, header, resume=True, lock=False)
                channel = QueryChannel(faulty, 10, ledger, max(0, budget - ledger.spent), retries=3, sleep=lambda s: None)
        ledger.close()
        back = QueryLedger.read(path, quiet=True)
        answers_total += faulty.answered
        recorded = len(back.entries) + len(back.repeats)
        if back.spent > budget:
            violations.append({"sequence": i, "what": f"budget passed on disk: {back.spent} > {budget}"})
        if recorded != faulty.answered:  # an answer lost, or a point asked again after a resume
            violations.append({"sequence": i, "what": f"{faulty.answered} answers given, {recorded} in the ledger"})
        if sum("digest" in r for r in back.records) != recorded:  # answer lines (charge lines aside)
            violations.append({"sequence": i, "what": "an answer recorded twice"})
    return {"sequences": count, "batches": batches_total, "kills": kills, "torn_tails": tears,
            "answers": answers_total, "violations": violations, "wall_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- fuzz seeds


def make_seeds(world_dir: Path, out: Path) -> dict[str, Path]:
    """Real, small seeds for every target, built from the small world."""
    from deepcore_auditor.adapters.base import Access
    from deepcore_auditor.auditor.audit import AuditConfig
    from deepcore_auditor.auditor.commands import AuditRequest, commit_fingerprint, run_audit_request
    from deepcore_auditor.benchmarks.small_world import build_world
    from deepcore_auditor.fingerprints.data import load_data
    from deepcore_auditor.fingerprints.format import load_fingerprint, save_fingerprint
    from deepcore_auditor.fingerprints.signing import generate_ed25519

    out.mkdir(parents=True, exist_ok=True)
    world = build_world(world_dir, load_data("fashion-mnist"))
    fp = load_fingerprint(world.fingerprint)
    keep = np.arange(8)
    small = dataclasses.replace(
        fp, points=fp.points[keep], owner_labels=fp.owner_labels[keep], owner_probs=fp.owner_probs[keep],
        known_models=tuple(dataclasses.replace(m, labels=m.labels[keep], owner_prob=m.owner_prob[keep]) for m in fp.known_models),
        extra={})
    seeds = {"fingerprint": out / "fingerprint.json", "commitment": out / "commitment.json", "report": out / "report.json",
             "ledger": out / "ledger.jsonl", "key": out / "key.pem", "npz": out / "data.npz"}
    for p in seeds.values():
        p.unlink(missing_ok=True)
    (out / "key.pub.pem").unlink(missing_ok=True)
    save_fingerprint(small, seeds["fingerprint"])
    commit_fingerprint(seeds["fingerprint"], seeds["commitment"])
    run_audit_request(AuditRequest(fingerprint_path=seeds["fingerprint"], suspect=str(world.pirate_onnx),
                                   config=AuditConfig(access=Access.LABELS, budget=8, batch_size=4, repeat_checks=2),
                                   ledger=seeds["ledger"], report=seeds["report"]))
    generate_ed25519(seeds["key"], out / "key.pub.pem")
    rng = np.random.default_rng(0)
    np.savez(seeds["npz"], x=rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8), y=np.arange(6) % 3)
    return seeds


# ----------------------------------------------------------------------------- one fuzz target (child process)


def fuzz_target(target: str, seed_file: Path, runs: int, findings: Path) -> None:
    """Run atheris on one parser; writes a JSON summary to `findings`. Called in a child process."""
    import atheris

    with atheris.instrument_imports():
        from deepcore_auditor.adapters.errors import DeepCoreError
        from deepcore_auditor.auditor.ledger import QueryLedger
        from deepcore_auditor.auditor.report import verify_report
        from deepcore_auditor.fingerprints.data import load_data
        from deepcore_auditor.fingerprints.format import load_commitment, load_fingerprint
        from deepcore_auditor.fingerprints.signing import load_ed25519_key

    suffix = {"ledger": ".jsonl", "key": ".pem", "npz": ".npz"}.get(target, ".json")
    scratch = Path(tempfile.mkdtemp(prefix=f"soak-{target}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    path = scratch / f"input{suffix}"
    parse = {
        "fingerprint": lambda: load_fingerprint(path),
        "commitment": lambda: load_commitment(path),
        "report": lambda: verify_report(path),
        "ledger": lambda: QueryLedger.read(path, quiet=True),
        "key": lambda: load_ed25519_key(path),
        "npz": lambda: load_data(str(path), cache_dir=scratch / "cache"),
    }[target]
    state: dict[str, Any] = {"executions": 0, "accepted": 0, "refused": 0, "crashes": 0, "findings": []}
    # The digest-protected files: one accepted with other content than the seed's is a finding
    # (a field the digest does not cover); whitespace, key order and escapes may differ.
    original = json.loads(seed_file.read_bytes()) if target in ("fingerprint", "commitment", "report") else None

    def one(data: bytes) -> None:
        state["executions"] += 1
        path.write_bytes(data)
        try:
            parse()
            state["accepted"] += 1
            if original is not None and json.loads(data) != original:
                raise AssertionError("accepted with content other than the seed's")
        except DeepCoreError:
            state["refused"] += 1
        except Exception as e:  # a finding: anything but the project's own one-line errors
            state["crashes"] += 1
            error = f"{type(e).__name__}: {str(e)[:200]}"
            seen = next((f for f in state["findings"] if f["error"] == error), None)
            if seen is not None:
                seen["count"] += 1
            elif len(state["findings"]) < 50:  # each distinct error once, with the first input that raised it
                saved = findings.with_name(f"{findings.stem}-finding-{len(state['findings']) + 1}{suffix}")
                saved.write_bytes(data)
                state["findings"].append({"error": error, "count": 1, "input": saved.name, "input_bytes": len(data)})
        if state["executions"] % 2000 == 0 or state["executions"] >= runs:  # libFuzzer exits without Python's atexit
            _write_summary(findings, target, state)

    corpus = scratch / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(seed_file.read_bytes())
    state["t0"] = time.perf_counter()
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={1 + TARGETS.index(target)}", "-max_len=65536", "-rss_limit_mb=4096", str(corpus)], one)
    atheris.Fuzz()


def _write_summary(findings: Path, target: str, state: dict[str, Any]) -> None:
    summary = {"target": target, **{k: v for k, v in state.items() if k != "t0"},
               "wall_s": round(time.perf_counter() - state["t0"], 1)}
    findings.write_text(json.dumps(summary))


def run_fuzz(runs: int, world_dir: Path, out: Path, targets: tuple[str, ...]) -> list[dict[str, Any]]:
    seeds = make_seeds(world_dir, out / "seeds")
    each = max(1, runs // len(targets))
    rows = []
    for target in targets:
        summary = out / f"fuzz-{target}.json"
        for stale in (summary, *out.glob(f"fuzz-{target}-finding-*")):
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "deepcore_auditor.benchmarks.soak", "_fuzz_one", target, str(seeds[target]),
                               str(each), str(summary)], capture_output=True, text=True)
        row = json.loads(summary.read_text()) if summary.exists() else {
            "target": target, "executions": 0, "findings": [{"error": f"fuzzer exited {proc.returncode}: {proc.stderr[-500:]}"}]}
        row["process_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"  {target:12s} {row['executions']:>9} executions  {len(row['findings'])} findings  {row['process_s']} s", flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def _machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sequences")
    s.add_argument("--count", type=int, default=10000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("fuzz")
    f.add_argument("--runs", type=int, default=1_000_000, help="executions in all, split evenly over the targets")
    f.add_argument("--world", type=Path, required=True, help="the small world's directory (built there if absent)")
    f.add_argument("--target", action="append", choices=TARGETS, help="a target (repeatable; default: all)")
    f.add_argument("--out", type=Path, required=True)
    one = sub.add_parser("_fuzz_one")
    one.add_argument("target")
    one.add_argument("seed_file", type=Path)
    one.add_argument("runs", type=int)
    one.add_argument("summary", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "_fuzz_one":
        fuzz_target(args.target, args.seed_file, args.runs, args.summary)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    if args.cmd == "sequences":
        with tempfile.TemporaryDirectory() as tmp:
            r = run_sequences(args.count, args.seed, Path(tmp))
        results["sequences"] = {**r, "date": stamp, "machine": _machine()}
        print(f"{r['sequences']} sequences, {r['batches']} batches, {r['kills']} kills ({r['torn_tails']} torn tails), "
              f"{r['answers']} answers: {len(r['violations'])} violations in {r['wall_s']} s")
    else:
        rows = run_fuzz(args.runs, args.world, args.out, tuple(args.target or TARGETS))
        results["fuzz"] = {"rows": rows, "date": stamp, "machine": _machine(),
                           "executions": sum(r["executions"] for r in rows), "findings": sum(len(r["findings"]) for r in rows)}
    results_path.write_text(json.dumps(results, indent=1))
    _write_markdown(args.out / "results.md", results)
    bad = len(results.get("sequences", {}).get("violations", [])) + results.get("fuzz", {}).get("findings", 0)
    return 1 if bad else 0


def _write_markdown(path: Path, results: dict[str, Any]) -> None:
    lines = ["# Soak and fuzz results", ""]
    if "sequences" in results:
        r = results["sequences"]
        lines += [f"## Fault/retry/kill sequences ({r['date']}, {r['machine']})", "",
                  "| sequences | batches | kills | torn tails | answers | violations | wall s |", "|---|---|---|---|---|---|---|",
                  f"| {r['sequences']} | {r['batches']} | {r['kills']} | {r['torn_tails']} | {r['answers']} | {len(r['violations'])} | {r['wall_s']} |", ""]
        lines += [f"- sequence {v['sequence']}: {v['what']}" for v in r["violations"][:50]]
    if "fuzz" in results:
        r = results["fuzz"]
        lines += [f"## Fuzzing the parsers of user files ({r['date']}, {r['machine']}, atheris)", "",
                  "| target | executions | accepted | refused (project error) | other exceptions | distinct | wall s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['target']} | {x['executions']} | {x.get('accepted', 0)} | {x.get('refused', 0)} | {x.get('crashes', 0)} | {len(x['findings'])} | {x.get('wall_s', x.get('process_s'))} |"
                  for x in r["rows"]]
        lines += ["", f"In all: {r['executions']} executions, {r['findings']} distinct findings."]
        for x in r["rows"]:
            lines += [f"- {x['target']}: {f['error']} ({f.get('count', 1)} inputs)" for f in x["findings"][:10]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
