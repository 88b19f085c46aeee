"""What sending the core points as images does to a verdict: PNG, and JPEG at several qualities.

An endpoint that takes encoded images decodes each file and classifies the pixels it gets back.
This script plays that endpoint locally and exactly: each point is encoded as the audit would
send it (`adapters.images.encode_images`), decoded as a server would (pixels / 255), and the
decoded point is given to the suspect's ONNX file; the audit is the product's own
(`auditor.audit.audit`, label-only, default alpha/beta). The fingerprint's points are first
moved to the 8-bit grid, as `deepcore fingerprint --uint8-points` makes them (by at most 0.5/255
each), so that PNG is exact and every JPEG figure is the format's own loss.

Printed per format: how far JPEG moved the points (mean L-inf in /255 units), the share of core
points on which the owner itself still gives its own label after the trip, and each suspect's
verdict, queries, and agreement with the owner's labels on all the points after the trip. Usage:

    python -m deepcore_auditor.benchmarks.image_transport --fingerprint FP --owner OWNER.onnx \\
        --suspect pirate=P.onnx --suspect independent=I.onnx [--qualities 95,90,75] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.base import Access, Oracle, OracleWrapper
from deepcore_auditor.adapters.images import ImageEncoding, decode_image, encode_images, to_uint8_grid
from deepcore_auditor.adapters.onnx import OnnxOracle
from deepcore_auditor.auditor.audit import AuditConfig, audit
from deepcore_auditor.fingerprints.format import Fingerprint, load_fingerprint


class ThroughImages(OracleWrapper):
    """A local model behind an image-decoding step: each point travels as an encoded file."""

    def __init__(self, inner: Oracle, encoding: ImageEncoding) -> None:
        super().__init__(inner)
        self.encoding = encoding

    def _answer(self, points: np.ndarray, access: Access) -> np.ndarray:
        return self.inner.query(round_trip(points, self.encoding), access)


def round_trip(points: np.ndarray, encoding: ImageEncoding) -> np.ndarray:
    """The points as an endpoint decodes them after `encoding`."""
    channels = points.shape[1]
    return np.stack([decode_image(f, channels) for f in encode_images(points, encoding)])


def measure(fp: Fingerprint, owner: Path, suspects: dict[str, Path], encodings: list[ImageEncoding],
            budget: int) -> list[dict[str, object]]:
    config = AuditConfig(access=Access.LABELS, budget=budget)
    rows: list[dict[str, object]] = []
    for enc in encodings:
        moved = round_trip(fp.points, enc)
        linf = np.abs(moved - fp.points).reshape(len(moved), -1).max(1) * 255
        with OnnxOracle(str(owner), convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes) as o:
            owner_keeps = float(np.mean(o.query(moved, Access.LABELS) == fp.owner_labels))
        row: dict[str, object] = {"format": str(enc), "mean_linf_255": round(float(linf.mean()), 2),
                                  "max_linf_255": round(float(linf.max()), 1), "owner_keeps_its_label": round(owner_keeps, 3),
                                  "verdicts": {}}
        for name, path in suspects.items():
            with OnnxOracle(str(path), convention=fp.convention, point_shape=fp.point_shape, num_classes=fp.num_classes) as inner:
                r = audit(fp, ThroughImages(inner, enc), config)
                every = float(np.mean(inner.query(moved, Access.LABELS) == fp.owner_labels))
            row["verdicts"][name] = {"verdict": r.verdict, "queries": r.queries_used, "agreement": round(r.agreement, 3),  # type: ignore[index]
                                     "agreement_all_points": round(every, 3)}
        rows.append(row)
        print(f"{row['format']:8s} L-inf mean {row['mean_linf_255']:5.2f}/255 max {row['max_linf_255']:5.1f}/255, "
              f"owner keeps its label on {owner_keeps:.3f}: "
              + ", ".join(f"{n} {v['verdict']} ({v['queries']} q; agrees {v['agreement_all_points']:.3f} on all)" for n, v in row["verdicts"].items()),  # type: ignore[union-attr]
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fingerprint", type=Path, required=True)
    p.add_argument("--owner", type=Path, required=True, help="the owner as ONNX (for the share of points it keeps)")
    p.add_argument("--suspect", action="append", default=[], help="NAME=FILE.onnx, repeatable")
    p.add_argument("--qualities", default="95,90,75")
    p.add_argument("--budget", type=int, default=400)
    p.add_argument("--out", type=Path, help="write results.json here (a folder)")
    args = p.parse_args(argv)
    fp = load_fingerprint(args.fingerprint)
    fp = dataclasses.replace(fp, points=to_uint8_grid(fp.points))  # what --uint8-points builds
    suspects = dict(s.split("=", 1) for s in args.suspect)
    encodings = [ImageEncoding("png")] + [ImageEncoding("jpeg", int(q)) for q in args.qualities.split(",")]
    rows = measure(fp, args.owner, {k: Path(v) for k, v in suspects.items()}, encodings, args.budget)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"fingerprint": str(args.fingerprint), "points": len(fp),
                                                           "budget": args.budget, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
