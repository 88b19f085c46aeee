"""Suspects served by a Triton Inference Server, over HTTP(S) or gRPC(S) with tritonclient.

URL: ``triton+http://HOST[:PORT]/MODEL[/VERSION]`` (also ``triton+https``, ``triton+grpc``,
``triton+grpcs``). The port defaults to Triton's 8000 (HTTP) / 8001 (gRPC), or 443 with TLS.
Credentials are not accepted in the URL: pass a bearer token through `auth_token_env`.

Everything the audit depends on is checked when the oracle is opened, before any query: the
server is live, the model (version) is ready, it has one input whose shape fits the points under
the convention's layout and whose type (FP32, FP16, UINT8) sets the convention's dtype, and its
output is a class vector of the expected length (PROBS and LABELS) or an integer label tensor
(LABELS only).

LABELS from a class-vector output: with ``labels_via="auto"`` (the default) or
``"classification"`` the oracle asks Triton's classification extension for the top-1 class
(``InferRequestedOutput(name, class_count=1)``), so only the label crosses the wire, as on a
label-only deployment; ``"argmax"`` takes the argmax of the raw output instead. The two agree
except on exact ties (Triton's order between equal values is unspecified; argmax takes the first).
"auto" falls back to argmax when the server does not list the classification extension or the
output is FP16 (which Triton 2.51 cannot classify).

The adapter never retries: failures safe to retry (timeouts, HTTP 429/502/503/504, gRPC
UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, connection refused, reset or closed
without an answer while querying) raise `TransientOracleError`, and the auditor's wrapper
decides (within the budget).

Concurrency: up to `concurrency` requests are in flight at once, each worker thread owning its
own client (tritonclient's HTTP client is not thread-safe); answers are reassembled in order.

Layout, by job: `options` (the URL and the options), `client` (the client pool and the
translation of client failures into the project's errors), `shapes` (the model's metadata
checked against the audit: how one request looks), `oracle` (`TritonOracle`), `probe`
(`open_triton`: the checks made before any query); `serve` and `backend` host ONNX files on a
local tritonserver (trials, tests, benchmarks).
"""

from deepcore_auditor.adapters.triton.probe import open_triton

__all__ = ["open_triton"]
