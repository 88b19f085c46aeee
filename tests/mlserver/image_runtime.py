"""An MLServer runtime for an endpoint that takes encoded images (PNG or JPEG file bytes, one per
sample) and classifies them with an ONNX file: the decode-then-preprocess step that image
endpoints put before their model (a Triton ensemble, a KServe transformer).

Each element is the file's raw bytes (gRPC), or its base64 text when the input carries the
parameter content_type "base64" (JSON over HTTP, which holds no raw bytes): an untagged text
element is refused, so the tests see that the auditor tags what it encodes. The image is decoded with Pillow, scaled to [0, 1] as pixels / 255 in float32, and
normalized with the model's mean and std (model-settings.json `parameters.extra`) in the same
float32 steps as the auditor's input convention, so a PNG of a point on the 8-bit grid reaches
the ONNX model as exactly the tensor a local audit gives it.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from PIL import Image

_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")


def _file_bytes(item: object, base64_text: bool) -> bytes:
    """One element as the image file it holds: base64 text only when the input says so (its
    content_type parameter), else the raw file."""
    data = item.encode("ascii") if isinstance(item, str) else bytes(item)  # type: ignore[arg-type]
    if base64_text:
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ValueError("an element tagged base64 is not base64 text") from e
    if not data.startswith(_MAGIC):
        raise ValueError("an element is not a PNG or JPEG file")
    return data


class ImageOnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        extra = self.settings.parameters.extra or {}
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._channels = int(extra["channels"])
        self._mean = np.asarray(extra["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(extra["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = payload.inputs[0]
        data = request_input.data  # the elements as sent: NumpyCodec cannot split variable-length BYTES
        items = getattr(data, "root", data)
        tagged = getattr(request_input.parameters, "content_type", None) == "base64"
        pixels = []
        for item in items:
            with Image.open(io.BytesIO(_file_bytes(item, tagged))) as image:
                a = np.asarray(image.convert("L" if self._channels == 1 else "RGB"), dtype=np.uint8)
            pixels.append(a[..., None] if a.ndim == 2 else a)
        x = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        x = (x - self._mean) / self._std
        y = self._session.run([self._output], {self._input: x.astype(np.float32)})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, y)])
