"""The FastAPI app: a subset of the AUTOMATIC1111 web UI's HTTP API, and the page at ``/``.

    app = create_app(ServerConfig(ckpt="model.safetensors"))      # uvicorn.run(app, host="127.0.0.1", port=7860)

Routes (A1111's request and response JSON): ``POST /sdapi/v1/txt2img``, ``/img2img``, ``/png-info``,
``/interrupt``, ``/options``; ``GET /sdapi/v1/samplers``, ``/schedulers``, ``/sd-models``, ``/loras``,
``/embeddings``, ``/options``, ``/progress``, ``/scripts``. Images travel as base64 PNGs carrying the ``parameters``
text chunk; ``info`` is A1111's JSON string (``seed``, ``all_seeds``, ``infotexts``, ...).

Generation runs on one worker thread (:mod:`ldm.serve.worker`) that the handlers await, never on the event loop.
Every route, the page included, sits behind :class:`Guard`: HTTP basic auth with ``api_auth`` and a cap on the
request body. Checkpoints and LoRAs are named through listings of their folders, never joined onto a path.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.cli.common import format_parameters, parse_parameters_by_label, save_png
from ldm.serve import schema
from ldm.serve.worker import (GenerationRequest, GenerationResult, Job, JobTimeout, ModelFiles, QueueFull, Worker,
                              list_files)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_EXTRA_NETWORK = re.compile(r"<(lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
_SCHEDULERS = {"automatic": "", "karras": " Karras", "exponential": " Exponential"}
VERSION = "ldm-serve 1"


@dataclass
class ServerConfig:
    """What ``serve.py``'s flags set; the limits guard the server against requests too large to serve."""

    ckpt: str | Path
    models_dir: str | Path | None = None
    lora_dir: str | Path | None = None
    embeddings_dir: str | Path | None = None
    device: str = "auto"
    precision: str = "auto"
    api_auth: str | None = None  # "user:password[,user2:password2]"
    max_queue: int = 16
    max_steps: int = 150
    max_size: int = 2048          # pixels per side
    max_batch: int = 16           # images per request (batch_size x n_iter)
    max_body_mb: float = 32.0
    max_image_pixels: int = 4096 * 4096
    timeout: float | None = 600.0  # seconds one request may run
    preview_every: int = 5


def parse_auth(text: str | None) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` -> ``{user: pass}``; ValueError naming the bad entry."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth entry {item.strip()!r} is not user:password")
        out[user] = password
    return out


# ------------------------------------------------------------------------------------------------------------
# auth and body size: every route, the page and its files too
# ------------------------------------------------------------------------------------------------------------

class Guard:
    """ASGI middleware: HTTP basic auth (when ``credentials``) and at most ``max_body`` bytes of request body."""

    def __init__(self, app, credentials: dict[str, str], max_body: int):
        self.app, self.credentials, self.max_body = app, credentials, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.credentials and not self._authorized(headers.get(b"authorization", b"")):
            return await _plain(send, 401, {"detail": "Incorrect username or password"},
                                [(b"www-authenticate", b'Basic realm="ldm-serve"')])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _plain(send, 413, {"detail": self._too_large()})
        body, more = b"", True
        while more:  # read it all (within the cap), then hand it on in one piece
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _plain(send, 413, {"detail": self._too_large()})
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body / 2**20:g} MiB (the server's --max-body-mb)"

    def _authorized(self, header: bytes) -> bool:
        scheme, _, value = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        # compare even for an unknown user, so that the time taken does not tell which users exist
        ok = secrets.compare_digest(password.encode(), (expected or secrets.token_hex(16)).encode())
        return expected is not None and ok


async def _plain(send, status: int, content: dict, headers: list | None = None) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------------------
# images in and out
# ------------------------------------------------------------------------------------------------------------

def reject(field: str, message: str, status: int = 422) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the field."""
    return HTTPException(status, detail=[{"loc": ["body", *field.split(".")], "msg": message, "type": "value_error"}])


def decode_image(text: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL), its pixel count capped before decoding."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=False)
        image = Image.open(io.BytesIO(data))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise reject(field, "is not a base64-encoded image (PNG, JPEG or WebP)") from None
    w, h = image.size
    if w * h > max_pixels:
        raise reject(field, f"is {w}x{h}, more than the server's limit of {max_pixels} pixels "
                            "(--max-image-pixels): send a smaller image")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise reject(field, "could not be decoded (truncated or corrupt image)") from None
    return image


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    buffer = io.BytesIO()
    save_png(image, buffer, parameters)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill"): the masked area painted with the mean colour of the rest of the image,
    so that the original content there does not steer the result."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    inside = np.asarray(mask.convert("L")) >= 128
    keep = pixels[~inside] if (~inside).any() else pixels.reshape(-1, 3)
    pixels[inside] = keep.mean(axis=0)
    return Image.fromarray(pixels.round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------------------

class Server:
    """The routes' shared state: the config, the model files, the worker."""

    def __init__(self, config: ServerConfig, worker: Worker | None = None):
        self.config = config
        self.files = ModelFiles(config.ckpt, config.models_dir)
        self.worker = worker or Worker(self.files, self._load, max_queue=config.max_queue, timeout=config.timeout,
                                       preview_every=config.preview_every)

    def _load(self, path: Path):
        from ldm.pipeline import Text2Image

        pipe = Text2Image.from_checkpoint(path, device=self.config.device, precision=self.config.precision)
        pipe.lora_dir = self.config.lora_dir  # <lora:NAME:WEIGHT> tags are applied by the pipeline, per request
        if self.config.embeddings_dir is not None:
            pipe.load_embeddings_dir(self.config.embeddings_dir)  # those that fit this model; called by name
        return pipe

    # ---- listings ---------------------------------------------------------------------------------------------
    def loras(self) -> dict[str, Path]:
        return list_files(self.config.lora_dir, LORA_SUFFIXES)

    def embeddings(self) -> dict[str, Path]:
        return list_files(self.config.embeddings_dir, EMBEDDING_SUFFIXES)

    # ---- checking a request -----------------------------------------------------------------------------------
    def sampler_name(self, body: schema.Txt2ImgRequest) -> str:
        from ldm.diffusion.samplers import SAMPLERS, get_sampler

        name = body.sampler_name or body.sampler_index
        field = "sampler_name" if body.sampler_name else "sampler_index"
        try:
            spec = get_sampler(name)
        except ValueError:
            raise reject(field, f"unknown sampler {name!r}; GET /sdapi/v1/samplers lists them") from None
        scheduler = (body.scheduler or "automatic").lower()
        if scheduler not in _SCHEDULERS:
            raise reject("scheduler", f"unknown scheduler {body.scheduler!r}; use one of: "
                                      f"{', '.join(_SCHEDULERS)}")
        if _SCHEDULERS[scheduler] and spec.schedule == "default":
            combined = spec.name + _SCHEDULERS[scheduler]
            if combined not in SAMPLERS:
                raise reject("scheduler", f"sampler {spec.name} has no {scheduler} schedule")
            return combined
        return spec.name

    def check_limits(self, body: schema.Txt2ImgRequest) -> None:
        c = self.config
        if not 1 <= body.steps <= c.max_steps:
            raise reject("steps", f"is {body.steps}: use 1 to {c.max_steps} (the server's --max-steps)")
        for name in ("width", "height"):
            value = getattr(body, name)
            if value is not None and not 8 <= value <= c.max_size:
                raise reject(name, f"is {value}: use 8 to {c.max_size} pixels (the server's --max-size)")
        for name in ("batch_size", "n_iter"):
            if getattr(body, name) < 1:
                raise reject(name, f"is {getattr(body, name)}: use at least 1")
        if body.batch_size * body.n_iter > c.max_batch:
            raise reject("batch_size", f"batch_size x n_iter is {body.batch_size * body.n_iter} images: the server "
                                       f"makes at most {c.max_batch} per request (--max-batch)")
        if not math.isfinite(body.cfg_scale):
            raise reject("cfg_scale", "must be a finite number")

    def check_extra_networks(self, body: schema.Txt2ImgRequest) -> None:
        """A ``<lora:NAME:...>`` tag of the prompt must name a file of --lora-dir (the pipeline merges it for the
        request); a wrong name is the request's 422, before it waits in the queue."""
        loras = self.loras()
        for match in _EXTRA_NETWORK.finditer(body.prompt):
            name = match.group(2).strip()
            if name not in loras:
                where = ("the server has no --lora-dir" if self.config.lora_dir is None else
                         "not found in the server's --lora-dir; GET /sdapi/v1/loras lists them")
                raise reject("prompt", f"LoRA {name!r}: {where}")

    def generation_job(self, kind: str, body: schema.Txt2ImgRequest) -> Job:
        self.check_limits(body)
        sampler = self.sampler_name(body)
        self.check_extra_networks(body)
        seed = body.seed if body.seed >= 0 else random.randrange(2**32 - body.batch_size * body.n_iter)
        request = GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, seed=seed,
                                    sampler=sampler, steps=body.steps, cfg_scale=body.cfg_scale, width=body.width,
                                    height=body.height, batch_size=body.batch_size, n_iter=body.n_iter, eta=body.eta)
        if isinstance(body, schema.Img2ImgRequest):
            kind = self._image_inputs(body, request)
        model = body.override_settings.get("sd_model_checkpoint")
        if model is not None:
            self.find_model(str(model), "override_settings.sd_model_checkpoint")
        return Job(kind, request, model=model, **({"task_id": body.force_task_id} if body.force_task_id else {}))

    def _image_inputs(self, body: schema.Img2ImgRequest, request: GenerationRequest) -> str:
        if not body.init_images:
            raise reject("init_images", "is missing: send at least one base64 image to start from")
        if body.resize_mode != 0:
            raise reject("resize_mode", f"is {body.resize_mode}: only 0 (just resize) is supported")
        if not 0 < body.denoising_strength <= 1:
            raise reject("denoising_strength", f"is {body.denoising_strength}: use a value in (0, 1]")
        pixels = self.config.max_image_pixels
        images = [decode_image(text, f"init_images.{i}", pixels).convert("RGB")
                  for i, text in enumerate(body.init_images)]
        request.init_images, request.denoising_strength = images, float(body.denoising_strength)
        if body.mask is None:
            return "img2img"
        if body.inpainting_fill not in schema.INPAINTING_FILL:
            raise reject("inpainting_fill", f"is {body.inpainting_fill}: this server offers 0 (fill) and 1 (original)")
        mask = decode_image(body.mask, "mask", pixels).convert("L")
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        masks = [mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.NEAREST)
                 for image in images]
        if schema.INPAINTING_FILL[body.inpainting_fill] == "fill":
            request.init_images = [_fill_masked(image, m) for image, m in zip(images, masks)]
        if len({m.size for m in masks}) > 1:
            raise reject("init_images", "images of different sizes with one mask: send images of one size")
        request.mask = masks[0]
        return "inpaint"

    def find_model(self, name: str, field: str):
        try:
            return self.files.find(name)
        except KeyError as e:
            raise HTTPException(404, detail=f"{field}: {e.args[0]}") from None

    # ---- running it -------------------------------------------------------------------------------------------
    async def run(self, job: Job) -> Any:
        try:
            future = self.worker.submit(job)
        except QueueFull as e:
            retry = max(1, math.ceil(self.worker.seconds_per_job or 5))
            raise HTTPException(503, detail=str(e), headers={"Retry-After": str(retry)}) from None
        try:
            return await asyncio.wrap_future(future)
        except (ValueError, KeyError) as e:
            raise HTTPException(422, detail=str(e.args[0]) if e.args else type(e).__name__) from None
        except JobTimeout as e:
            raise HTTPException(504, detail=str(e)) from None
        except Exception as e:  # noqa: BLE001 - the request's own failure, reported to its client
            if type(e).__name__ == "OutOfMemoryError":
                raise HTTPException(500, detail="out of memory: ask for a smaller width/height or batch_size") from None
            raise HTTPException(500, detail=f"{type(e).__name__}: {e}") from None

    def response(self, body: schema.Txt2ImgRequest, result: GenerationResult) -> dict[str, Any]:
        infotexts = [format_parameters(p) for p in result.parameters]
        images = [encode_png(img, text) for img, text in zip(result.images, infotexts)] if body.send_images else []
        first = result.parameters[0] if result.parameters else {}
        parameters = body.model_dump()
        if isinstance(body, schema.Img2ImgRequest) and not body.include_init_images:
            parameters["init_images"], parameters["mask"] = None, None
        info = {
            "prompt": body.prompt, "all_prompts": [p["prompt"] for p in result.parameters],
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [p["negative_prompt"] for p in result.parameters],
            "seed": first.get("seed"), "all_seeds": [p["seed"] for p in result.parameters],
            "subseed": -1, "all_subseeds": [-1] * len(result.parameters), "subseed_strength": 0,
            "width": first.get("width"), "height": first.get("height"), "sampler_name": first.get("sampler"),
            "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": result.model.model_name,
            "sd_model_hash": result.model.hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": first.get("strength"), "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": result.job_timestamp,
            "clip_skip": 1,
            "version": VERSION, "interrupted": result.interrupted,
        }
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def create_app(config: ServerConfig, worker: Worker | None = None, *, preload: bool = True) -> FastAPI:
    """The app; ``preload`` queues the loading of the default model at start-up (the first request does not
    wait for it)."""
    server = Server(config, worker)

    async def lifespan(app):
        if preload:
            server.worker.submit(Job("load"))
        yield
        server.worker.close()

    app = FastAPI(title="ldm serve", version=VERSION, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, credentials=parse_auth(config.api_auth), max_body=int(config.max_body_mb * 2**20))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: schema.Txt2ImgRequest):
        job = server.generation_job("txt2img", body)
        return await asyncio.to_thread(server.response, body, await server.run(job))  # PNG encoding off the loop

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: schema.Img2ImgRequest):
        job = await asyncio.to_thread(server.generation_job, "img2img", body)  # image decoding off the loop
        return await asyncio.to_thread(server.response, body, await server.run(job))

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False, id_task: str | None = Query(None)):
        out = server.worker.progress(id_task, want_image=not skip_current_image)
        if out["current_image"] is not None:
            out["current_image"] = encode_png(out["current_image"])
        return out

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        server.worker.interrupt()
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from ldm.cli.sample import sampler_alias
        from ldm.diffusion.samplers import SAMPLERS

        return [{"name": name, "aliases": [sampler_alias(name)], "options": {}} for name in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": name, "label": name.capitalize(), "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name in _SCHEDULERS]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [entry.as_json() for entry in server.files.entries()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return None  # the folder is listed afresh on every request

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in server.loras().items()]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        loaded = server.worker.current_embeddings()
        items = {name: _embedding_item(path) for name, path in server.embeddings().items()}
        return {"loaded": {k: v for k, v in items.items() if k in loaded},
                "skipped": {k: v for k, v in items.items() if k not in loaded}}  # e.g. made for another model

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    async def get_options():
        current = server.worker.current
        return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256,
                "show_progress_every_n_steps": server.worker.preview_every,
                "live_previews_enable": server.worker.preview_every > 0, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]):
        if "show_progress_every_n_steps" in body:
            try:
                server.worker.preview_every = max(0, int(body["show_progress_every_n_steps"]))
            except (TypeError, ValueError):
                raise reject("show_progress_every_n_steps", "must be an integer") from None
        if body.get("live_previews_enable") is False:
            server.worker.preview_every = 0
        name = body.get("sd_model_checkpoint")
        if name is not None:
            entry = server.find_model(str(name), "sd_model_checkpoint")
            await server.run(Job("load", model=entry.title))
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: schema.PngInfoRequest):
        image = decode_image(body.image.strip(), "image", config.max_image_pixels)
        text = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": text or "", "items": items, "parameters": parse_parameters_by_label(text) if text else {}}

    return app


def _embedding_item(path: Path) -> dict[str, Any]:
    """A1111's EmbeddingItem: the vectors' count and width read from the file (0 when it cannot be read)."""
    shape = [0, 0]
    try:
        from ldm.io import read_state_dict

        tensors = [t for t in read_state_dict(path)[0].values() if hasattr(t, "ndim") and t.ndim == 2]
        if tensors:
            shape = list(tensors[0].shape)
    except Exception as e:  # noqa: BLE001 - an unreadable file is listed, not fatal
        log.warning("cannot read embedding %s: %s", path, e)
    return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape[1],
            "vectors": shape[0]}
