"""TEMPORARY stand-in for `molmoe.serve.images` (written on the serve-img branch): `data:` URLs
only, so the server and its tests run before that branch is merged. Same names and signatures.
DELETE this file at the merge, with the ImportError fallback in `molmoe/serve/worker.py`."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from molmoe.errors import MolmoeError
from molmoe.processing import DEFAULT_MAX_PIXELS


class ImageInputError(MolmoeError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ImagePolicy:
    max_bytes: int = 20 << 20
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    local_dir: str | None = None
    allow_remote: bool = False
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    resolver: object = None
    allowed_networks: tuple = ()


def read_image_url(url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    if not url.startswith("data:"):
        raise ImageInputError("only data: image URLs are supported by this build", 400)
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ImageInputError("image_url: expected data:<type>;base64,<data>", 400)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise ImageInputError(f"image_url: more than {policy.max_bytes} bytes", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("image_url: the data: URL is not valid base64", 400) from None
    return data, "data: URL"


def open_image(data: bytes, policy: ImagePolicy, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise ImageInputError(f"{name}: not an image ({e})", 415) from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name}: too many pixels", 413) from None
    w, h = img.size
    if policy.max_pixels and w * h > policy.max_pixels:
        raise ImageInputError(f"{name}: {w}x{h} = {w * h} pixels, the limit is "
                              f"{policy.max_pixels}", 413)
    return img
