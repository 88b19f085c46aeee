"""Throughput of the Triton adapter against raw tritonclient and in-process ONNX Runtime.

Serves one small CNN on a local TritonServer (loopback only) and prints points answered per
second for each transport and batch size, at the same concurrency:

* raw       - `concurrency` threads, each with its own tritonclient client, sending requests of
              `batch` points back to back (the best a client of this server can do);
* oracle    - `TritonOracle.query(..., PROBS)` with `batch_size=batch`, each query holding
              4 x `concurrency` requests (what the auditor gets, input convention, ordering and
              answer checks included);
* onnxruntime - the same ONNX file run in this process, one batch at a time.

Run: python -m deepcore_auditor.benchmarks.triton_throughput [--seconds 2] [--concurrency 4]
Each configuration runs for about --seconds; the whole script for well under a minute.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from deepcore_auditor.adapters.base import Access, InputConvention
from deepcore_auditor.adapters.triton import open_triton
from deepcore_auditor.adapters.triton.serve import ServedModel, TritonServer, write_model_repository

POINT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
ROUNDS = 4  # an oracle query holds ROUNDS x concurrency requests (answers wait for the slowest)


def export_model(path: Path) -> None:
    """A small seeded CNN (3x32x32 -> 10 logits), exported with a dynamic batch axis."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(32 * 16, NUM_CLASSES),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(1, *POINT_SHAPE),), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
        )


def raw_client(protocol: str, address: str, batch: int, concurrency: int, seconds: float) -> float:
    """Points per second with plain tritonclient, one client per thread."""
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    x = np.random.default_rng(1).random((batch, *POINT_SHAPE), dtype=np.float32)
    counts = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)  # everyone starts once every client is warm

    def work(i: int) -> None:
        client = module.InferenceServerClient(address)
        try:
            inp = module.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = [module.InferRequestedOutput("y")]
            client.infer("cnn", [inp], outputs=out)  # warm the connection
            barrier.wait()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                inp.set_data_from_numpy(x)  # new points every request, as in an audit
                client.infer("cnn", [inp], outputs=out).as_numpy("y")
                counts[i] += batch
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def oracle(url: str, batch: int, concurrency: int, seconds: float) -> float:
    """Points per second through TritonOracle.query (PROBS), 4 x `concurrency` requests per query."""
    pts = np.random.default_rng(2).random((batch * concurrency * ROUNDS, *POINT_SHAPE), dtype=np.float32)
    with open_triton(url, convention=InputConvention(), point_shape=POINT_SHAPE, num_classes=NUM_CLASSES,
                     concurrency=concurrency, batch_size=batch) as o:
        o.query(pts, Access.PROBS)  # warm up every worker's client
        done, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            o.query(pts, Access.PROBS)
            done += len(pts)
        return done / (time.monotonic() - start)


def local_onnxruntime(path: Path, batch: int, seconds: float) -> float:
    """Points per second with ONNX Runtime in this process (CPU), one batch at a time."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).random((batch, *POINT_SHAPE), dtype=np.float32)
    session.run(None, {"x": x})
    done, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        session.run(None, {"x": x})
        done += batch
    return done / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each configuration")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (raw and oracle)")
    parser.add_argument("--batch-sizes", default="1,16,64", help="points per request, comma-separated")
    parser.add_argument("--instances", type=int, default=2, help="model instances on the server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="deepcore-bench-") as tmp:
        onnx = Path(tmp) / "cnn.onnx"
        export_model(onnx)
        repo = write_model_repository({"cnn": ServedModel(onnx, instance_count=args.instances)}, Path(tmp) / "repo",
                                      max_batch_size=max(batches))
        print(f"model: CNN {POINT_SHAPE} -> {NUM_CLASSES}; {os.cpu_count()} CPUs; concurrency {args.concurrency}; "
              f"{args.instances} server instances; {args.seconds:.0f} s per configuration; points/second")
        print(f"{'transport':<10} {'batch':>5} {'raw':>10} {'oracle':>10} {'oracle/raw':>10}")
        with TritonServer(repo) as server:
            for protocol, address in (("http", server.http_address), ("grpc", server.grpc_address)):
                for batch in batches:
                    raw = raw_client(protocol, address, batch, args.concurrency, args.seconds)
                    orc = oracle(server.url("cnn", protocol), batch, args.concurrency, args.seconds)
                    print(f"{protocol:<10} {batch:>5} {raw:>10.0f} {orc:>10.0f} {orc / raw:>10.2f}")
        for batch in batches:
            local = local_onnxruntime(onnx, batch, args.seconds)
            print(f"{'onnxrt':<10} {batch:>5} {local:>10.0f} {'(in-process, one thread of calls)':>10}")


if __name__ == "__main__":
    main()
