"""Triton python-backend model written by deepcore: runs model.onnx with ONNX Runtime on CPU.

Config parameters: delay_s (sleep before each request, to test client timeouts), labels_output
("true": answer the argmax of the first output as INT64 labels), ort_threads, record_parameters
(a file to append each request's parameters to, as JSON lines: with tritonserver's
--http/grpc-header-forward-pattern this shows which headers reached the model).
With max_batch_size 0 the config dims have no batch axis: one sample per request.

Not imported by the auditor: `serve.write_model_repository` copies this file into every model
version as `model.py`, and it runs in tritonserver's python-backend stub, the only place
`triton_python_backend_utils` exists.
"""

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.delay_s = float(params.get("delay_s", "0") or 0)
        self.record_parameters = params.get("record_parameters", "")
        self.labels_output = params.get("labels_output", "false") == "true"
        self.add_batch_dim = int(config.get("max_batch_size", 0)) == 0
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("ort_threads", "1") or 1)
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.output_types = [pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]]

    def _run(self, request):
        if self.record_parameters:
            with open(self.record_parameters, "a") as f:
                f.write(request.parameters() + "\n")
        feed = {}
        for name in self.inputs:
            x = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            feed[name] = x[None] if self.add_batch_dim else x
        results = [np.asarray(r) for r in self.session.run(None, feed)]
        if self.labels_output:  # dims [1] per sample: [N, 1] batched, [1] without batching
            results = [np.argmax(results[0], axis=1).astype(np.int64).reshape(-1, 1)]
        tensors = []
        for name, dtype, value in zip(self.outputs, self.output_types, results, strict=False):
            if self.add_batch_dim:
                value = value[0]
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value.astype(dtype, copy=False))))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        responses = []
        for request in requests:
            if self.delay_s > 0:
                time.sleep(self.delay_s)
            try:
                responses.append(self._run(request))
            except Exception as e:  # noqa: BLE001 - reported to the client as the request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def finalize(self):
        self.session = None
