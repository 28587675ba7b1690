"""The request bodies of the A1111 API subset, with A1111's field names and defaults.

Fields this server does not use (``restore_faces``, ``enable_hr``, ``script_args``, ...) are ignored, as A1111
ignores what it does not know; a field of the wrong type is a 422 naming it. ``null`` means the default, as it
does for A1111's all-optional models. Two defaults differ on purpose: ``width`` / ``height`` default to the
loaded model's own size (A1111: 512, which is SD 1.x's), and the sampler to ``Euler`` as A1111's API does.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class _A1111Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Txt2ImgRequest(_A1111Body):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    force_task_id: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0
    inpainting_fill: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PngInfoRequest(_A1111Body):
    image: str


INPAINTING_FILL = {0: "fill", 1: "original"}  # A1111's 2 (latent noise) and 3 (latent nothing) are not offered
