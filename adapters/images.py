"""Points sent as encoded images, to endpoints whose input is the bytes of a PNG or JPEG file.

Many deployed classifiers take an encoded image (a Triton ensemble with a decoding step, a KServe
predictor that opens the upload): the server decodes it and applies its own preprocessing, so
the audit sends each point as the 8-bit image it stands for (channel values round(x * 255), one
channel as greyscale, three as RGB) and no input convention applies.

The invariant that keeps a verdict sound: the suspect must see the very points the fingerprint's
rates were measured on. PNG is lossless, so a point arrives unchanged exactly when it lies on the
8-bit grid — its float32 values are k / 255 — which `deepcore fingerprint --uint8-points`
guarantees; any other point would be rounded by up to 0.5/255 and is refused before a query.
JPEG changes every point (the more, the lower the quality): the audit refuses it unless the user
accepts lossy images, and the report then says that the suspect saw altered points, for which
the fingerprint's p0 and p1 were never measured.

Pillow does the encoding; it is imported only when images are sent.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from deepcore_auditor.adapters.errors import InputError

FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class ImageEncoding:
    """How points travel as images: PNG, or JPEG at a quality (1-100)."""

    format: str  # "png" or "jpeg"
    quality: int | None = None  # JPEG only

    @property
    def lossless(self) -> bool:
        return self.format == "png"

    def __str__(self) -> str:
        return self.format if self.quality is None else f"{self.format}:{self.quality}"

    @classmethod
    def parse(cls, text: str) -> ImageEncoding:
        """"png", "jpeg" (quality 95) or "jpeg:Q"; InputError otherwise."""
        name, _, quality = str(text).strip().lower().partition(":")
        if name == "jpg":
            name = "jpeg"
        if name not in FORMATS:
            raise InputError(f"image format {text!r} is not one of png, jpeg, jpeg:QUALITY")
        if name == "png":
            if quality:
                raise InputError(f"image format {text!r}: PNG takes no quality")
            return cls("png")
        if not quality:
            return cls("jpeg", 95)
        if not quality.isdecimal() or not quality.isascii() or not 1 <= int(quality) <= 100:
            raise InputError(f"image format {text!r}: the JPEG quality must be an integer from 1 to 100")
        return cls("jpeg", int(quality))


def on_uint8_grid(points: np.ndarray) -> bool:
    """Whether every value of these canonical [0, 1] points is exactly the float32 k / 255: the
    points an 8-bit image decoded as `pixels / 255` gives back bit for bit."""
    x = np.asarray(points, dtype=np.float32)
    return bool(np.array_equal(x, to_uint8_grid(x)))


def to_uint8_grid(points: np.ndarray) -> np.ndarray:
    """Canonical points rounded to the 8-bit grid, float32 (what `on_uint8_grid` accepts)."""
    x = np.asarray(points, dtype=np.float32)
    return (np.clip(np.rint(x * np.float32(255)), 0, 255) / np.float32(255)).astype(np.float32)


def to_pixels(points: np.ndarray) -> np.ndarray:
    """Canonical [N, C, H, W] points in [0, 1] -> uint8 [N, H, W, C] pixels, round(x * 255)."""
    x = np.asarray(points, dtype=np.float32)
    return np.clip(np.rint(x * np.float32(255)), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _pil() -> object:
    try:
        from PIL import Image
    except ImportError as e:
        raise InputError("sending points as images needs Pillow: pip install pillow") from e
    return Image


def encode_images(points: np.ndarray, encoding: ImageEncoding) -> list[bytes]:
    """Each canonical point as the bytes of one image file."""
    image_module = _pil()
    pixels = to_pixels(points)
    if pixels.shape[-1] not in (1, 3):
        raise InputError(f"points with {pixels.shape[-1]} channels cannot travel as images (1 or 3)")
    out = []
    for p in pixels:
        image = image_module.fromarray(np.ascontiguousarray(p[..., 0] if p.shape[-1] == 1 else p))  # type: ignore[attr-defined]
        buffer = io.BytesIO()
        if encoding.format == "png":
            image.save(buffer, format="PNG")
        else:  # no chroma subsampling: the least the format changes a point
            image.save(buffer, format="JPEG", quality=encoding.quality, subsampling=0)
        out.append(buffer.getvalue())
    return out


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """The canonical [C, H, W] float32 point an image file holds (pixels / 255), as an endpoint
    that decodes images sees it; for measuring what a lossy format does to the points."""
    image_module = _pil()
    with image_module.open(io.BytesIO(data)) as image:  # type: ignore[attr-defined]
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return (pixels.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)


def require_pillow() -> None:
    """InputError now, before any work, when images cannot be encoded here."""
    _pil()


def transport_problem(points: np.ndarray, encoding: ImageEncoding, *, allow_lossy: bool) -> str | None:
    """Why these points cannot travel in `encoding` unchanged (None: they can, or the user
    accepted lossy images)."""
    if encoding.lossless:
        if not on_uint8_grid(points):
            return ("the fingerprint's points are not 8-bit images, so PNG would round them by up to 0.5/255: "
                    "build the fingerprint with --uint8-points")
        return None
    if not allow_lossy:
        return (f"{encoding} changes every point the suspect is asked, and the fingerprint's rates were measured "
                "on the exact points: send png (build with --uint8-points), or accept it with --lossy-images")
    return None


__all__ = ["FORMATS", "ImageEncoding", "decode_image", "encode_images", "on_uint8_grid", "require_pillow", "to_pixels",
           "to_uint8_grid", "transport_problem"]
