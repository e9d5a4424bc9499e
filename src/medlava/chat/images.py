"""Any image a user may hand over (path, data URL, bytes, PIL image, `Study`) -> the key image to show."""

from __future__ import annotations

import base64
import binascii
import os

from PIL import Image

from medlava.imaging import Study, load_study

ImageInput = str | os.PathLike | bytes | Image.Image | Study


def decode_data_url(url: str) -> tuple[bytes, str]:
    """`data:<mime>;base64,<payload>` -> (bytes, mime)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError("image data URLs must look like data:<mime>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True), head[5:-7]
    except (binascii.Error, ValueError):
        raise ValueError("the image data URL holds invalid base64") from None


def open_image(image: ImageInput, window: str | None = None,
               key_slices: int | None = 1) -> tuple[Image.Image, Study | None]:
    """The key image to show the model, and the study it came from (None for a bare PIL image).

    `window` is a CT preset applied when the image is read from a file or bytes; `key_slices`
    is how many slices of a volume the study keeps (None: all).
    """
    if isinstance(image, Image.Image):
        return image, None
    if isinstance(image, Study):
        return image.key_image(), image
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            raise ValueError(
                "remote image URLs are not fetched (medlava never uses the network): "
                "send the image as a data: URL or a local path"
            )
        if image.startswith("data:"):
            data, mime = decode_data_url(image)
            study = load_study(data, mime=mime, window=window, key_slices=key_slices)
            return study.key_image(), study
        image = image.removeprefix("file://")
    if isinstance(image, str | os.PathLike | bytes):
        study = load_study(image, window=window, key_slices=key_slices)
        return study.key_image(), study
    raise ValueError(f"unsupported image type {type(image).__name__}: use a path, PIL image, Study or bytes")
