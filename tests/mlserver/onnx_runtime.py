"""An MLServer runtime that answers with an ONNX file through ONNX Runtime (CPU).

Loaded by Seldon MLServer in its own environment (`setup` makes it: MLServer needs numpy 2 and
the project's serve extra pins numpy below 2), never by the test process: the tests start
`mlserver start` on a folder holding this file and a model-settings.json per model
(tests/v2_server.py). It stands for any model behind an Open Inference Protocol server: the
inputs and outputs MLServer describes are the ONNX graph's, written into model-settings.json.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise ValueError(f"expected one input, got {len(payload.inputs)}")
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self._session.run([self._output], {self._input: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, y)])
