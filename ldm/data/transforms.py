"""Image preprocessing shared by every data module: decode, resize, crop, flip, scale to [-1, 1].

    transform = ImageTransform(size=256, random_crop=False, flip_p=0.0)
    image = transform(load_image(jpeg_bytes))      # FloatTensor[3, 256, 256] in [-1, 1]

Resizing keeps the aspect ratio (the shorter side becomes ``size``); the crop then takes a ``size`` x ``size``
square from the centre, or from a random place with ``random_crop=True``. Horizontal flips are off by default
because they turn "a dog left of a cat" into an image that contradicts its caption.

With ``micro_conditioning=True`` (SDXL), :meth:`ImageTransform.sample` also records each image's original size
``(height, width)``, the crop's top-left offset ``(top, left)`` in the resized image and the target size, under
sgm's batch keys (``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``)::

    ImageTransform(256, random_crop=True, micro_conditioning=True).sample(img)
    # {"image": [3, 256, 256], "original_size_as_tuple": tensor([h, w]), "crop_coords_top_left": tensor([t, l]),
    #  "target_size_as_tuple": tensor([256, 256])}
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageTransform", "load_image", "to_tensor", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

ImageSource = Union[bytes, bytearray, str, os.PathLike]


def load_image(source: ImageSource) -> Image.Image:
    """Decode encoded image bytes or a file path into an RGB PIL image.

    Transparent images are composited onto white (plain ``convert("RGB")`` would leave whatever colour
    the transparent pixels happen to hold, often black).
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(fp) as img:
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor[3, H, W] in [-1, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageTransform:
    """Resize the shorter side to ``size``, crop a ``size`` square, maybe flip, return a [-1, 1] tensor.

    Random choices (crop offset, flip) use torch's global generator; the training loaders seed it per sample
    (``ldm.data.datamodule.sample_rng``), so a sample is augmented the same way whatever worker reads it and
    wherever a resumed run starts.
    """

    def __init__(self, size: int, random_crop: bool = False, flip_p: float = 0.0, micro_conditioning: bool = False):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"image size must be a positive int, got {size!r}; set data.params.size (e.g. 256)")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p!r}; "
                             "set data.params.flip_p (0 keeps left/right captions true)")
        self.size = size
        self.random_crop = random_crop
        self.flip_p = float(flip_p)
        self.micro_conditioning = bool(micro_conditioning)

    def __repr__(self) -> str:
        micro = ", micro_conditioning=True" if self.micro_conditioning else ""
        return f"ImageTransform(size={self.size}, random_crop={self.random_crop}, flip_p={self.flip_p}{micro})"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.sample(img)["image"]

    def sample(self, img: Image.Image, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """``{"image": tensor}``, plus the micro-conditioning entries with ``micro_conditioning`` (the crop
        offsets are those of the resized image, before a flip, as in SDXL's training). ``size``: the target
        ``(height, width)`` (an aspect-ratio bucket, :mod:`ldm.data.buckets`) in place of the ``size`` square."""
        height, width = size if size is not None else (self.size, self.size)
        original = (img.height, img.width)
        resized = self.resize(img, (height, width))
        top, left = self.crop_offsets(resized, (height, width))
        img = resized.crop((left, top, left + width, top + height))
        if self.flip_p > 0 and torch.rand(()).item() < self.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = {"image": to_tensor(img)}
        if self.micro_conditioning:
            out.update({"original_size_as_tuple": torch.tensor(original),
                        "crop_coords_top_left": torch.tensor((top, left)),
                        "target_size_as_tuple": torch.tensor((height, width))})
        return out

    def resize(self, img: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
        """Scale to cover the target (the ``size`` square, or ``size=(height, width)``): the smallest scale at
        which both sides reach it, so that for a square the shorter side becomes exactly ``size`` (PIL's resize
        antialiases when shrinking)."""
        height, width = size if size is not None else (self.size, self.size)
        w, h = img.size
        scale = max(width / w, height / h)
        new_size = (max(width, round(w * scale)), max(height, round(h * scale)))
        if new_size == (w, h):
            return img
        return img.resize(new_size, resample=Image.Resampling.BICUBIC)

    def crop(self, img: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
        """Take a ``size`` x ``size`` square (or a ``size=(height, width)`` rectangle): centred, or at a random
        offset with ``random_crop``."""
        height, width = size if size is not None else (self.size, self.size)
        top, left = self.crop_offsets(img, size)
        return img.crop((left, top, left + width, top + height))

    def crop_offsets(self, img: Image.Image, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(top, left) of the rectangle :meth:`crop` takes (random draws: left first, then top)."""
        height, width = size if size is not None else (self.size, self.size)
        w, h = img.size
        if self.random_crop:
            left = int(torch.randint(0, w - width + 1, ()).item())
            top = int(torch.randint(0, h - height + 1, ()).item())
        else:
            left, top = (w - width) // 2, (h - height) // 2
        return top, left
