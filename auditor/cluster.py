"""Joining a Ray cluster, for every command that fans work out: `audit-many --ray` (a pair a
task), `fingerprint --ray` and `bench --ray` (a trained model a task).

Ray is the engine (no home-made scheduler); this module only joins a cluster, refuses one that
is not there in one line within seconds, maps a function over items as tasks, and leaves.
Nothing imports Ray unless a command is given `--ray`.

Invariants, and why:
- A task that trains a model runs torch with exactly the driver's thread count
  (`torch.get_num_threads()`, which `OMP_NUM_THREADS` sets) and asks the cluster for that many
  CPUs: on the CPU, the same seeds give the same weights only with the same number of threads
  (measured here: 1 and 2 threads train different weights from one seed). So a model trained
  on the cluster is bit for bit the one the local run trains, provided its worker has the
  driver's kind of CPU and the same torch; a cluster with no node that has that many CPUs is
  refused before any task starts rather than left waiting forever.
- The driver ships what the tasks share once (`ray.put`), not once a task.
- Leaving the cluster (`close`) never stops it: the cluster is its owner's.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from deepcore_auditor.adapters.errors import DeepCoreError, InputError, first_line

logger = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, in one line and within seconds, a HOST:PORT no server listens on: Ray's own client
    retries an absent cluster for minutes before it gives up."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray takes auto or HOST:PORT (a cluster's head), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"cannot join the Ray cluster at {address}: nothing answers there ({e.strerror or e})") from None


def _call(fn: Callable[[S, T], R], shared: S, item: T, threads: int) -> R:
    """One task: `fn(shared, item)` with torch on `threads` threads (see the module doc)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(shared, item)


class RayCluster:
    """The cluster at `address` ("auto": the one RAY_ADDRESS or a local `ray start` names), joined
    for one command. Every worker needs deepcore-auditor installed (with the `owner` extra for
    tasks that train)."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install 'deepcore-auditor[ray]'") from None
        self.ray = ray
        self.address = address
        reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"cannot join the Ray cluster at {address}: {first_line(e)}") from None
        self._call = ray.remote(max_retries=0)(_call)

    @property
    def name(self) -> str:
        return f"ray {self.address}"

    def largest_node(self, resource: str) -> float:
        """The most of `resource` (CPU, GPU) any one live node of the cluster has."""
        return max((float(n.get("Resources", {}).get(resource, 0)) for n in self.ray.nodes() if n.get("Alive")), default=0.0)

    def require(self, threads: int, gpus: int = 0) -> None:
        """Refuse, before any work, tasks that no node could run: `threads` CPUs (and `gpus` GPUs)."""
        cpus = self.largest_node("CPU")
        if threads > cpus:
            raise InputError(f"no node of the Ray cluster at {self.address} has {threads} CPUs, the torch threads this run "
                             f"trains with (identical weights need as many): join a larger cluster, or set OMP_NUM_THREADS "
                             f"to at most {int(cpus)} here, for the local run too")
        if gpus > self.largest_node("GPU"):
            raise InputError(f"no node of the Ray cluster at {self.address} has a GPU: give --device cpu, or join a cluster with one")

    def training(self, gpus: int = 0) -> Callable[[Callable[[S, T], R], S, Sequence[T]], Iterator[tuple[T, R]]]:
        """`map` for tasks that train: each with this process's torch threads (see the module
        doc), a cluster too small for them refused now, before any work."""
        import torch

        threads = torch.get_num_threads()
        self.require(threads, gpus)
        return lambda fn, shared, items: self.map(fn, shared, items, threads=threads, gpus=gpus)

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *, threads: int, gpus: int = 0) -> Iterator[tuple[T, R]]:
        """`fn(shared, item)` for every item, each a task asking for `threads` CPUs (and `gpus`
        GPUs), torch on `threads` threads; yields (item, result) as tasks finish. `fn` must be
        importable by the workers (a module-level function of this package). A task that fails
        raises here, naming its item; the others are cancelled."""
        self.require(threads, gpus)
        if not items:
            return
        ref = self.ray.put(shared)
        task = self._call.options(num_cpus=threads, num_gpus=gpus)
        pending = {task.remote(fn, ref, item, threads): item for item in items}
        try:
            while pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                for handle in ready:
                    item = pending.pop(handle)
                    try:
                        result = self.ray.get(handle)
                    except Exception as e:  # the task raised, or its worker died
                        cause = getattr(e, "cause", None) or e  # a task's own exception, else the worker's death
                        raise DeepCoreError(f"a Ray task failed on {getattr(item, 'name', item)}: {first_line(cause)}") from None
                    yield item, result
        finally:
            for handle in pending:
                self.ray.cancel(handle, force=True)

    def close(self) -> None:
        self.ray.shutdown()  # leaves the cluster: the cluster itself is its owner's

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["RayCluster", "reachable"]
