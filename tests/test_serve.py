"""The HTTP server (ldm.serve): the A1111 API subset with FastAPI's TestClient on tiny random models, the queue
(order, 503, interrupt, timeout, one request's failure), auth, size limits and path escapes; a real uvicorn
server started by serve.py with several clients at once and an A1111 client library (webuiapi); the demo model end
to end; and the page in headless Chromium (skipped without Debian's chromium + chromium-driver)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.common import parse_parameters
from tiny_models import tiny_checkpoint, tiny_ckpt  # noqa: F401  (fixture)

fastapi = pytest.importorskip("fastapi", reason="the server needs fastapi: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from ldm.serve import worker as worker_module  # noqa: E402
from ldm.serve.api import ServerConfig, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAST = {"steps": 2, "width": 64, "height": 64}


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_ckpt):  # noqa: F811
    """models/ (a second tiny model and a link that escapes the folder), loras/, embeddings/ and a file outside."""
    root = tmp_path_factory.mktemp("serve")
    models, loras, embeddings = root / "models", root / "loras", root / "embeddings"
    for folder in (models, loras, embeddings):
        folder.mkdir()
    tiny_checkpoint(models / "other.safetensors", seed=1)
    outside = root / "outside.safetensors"
    shutil.copy(tiny_ckpt, outside)
    (models / "escape.safetensors").symlink_to(outside)
    from test_lora import make_lora, save  # a real kohya LoRA for the tiny model

    from tiny_models import tiny_model
    save(make_lora(tiny_model())[0], loras / "style.safetensors")
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(2, 32)}, embeddings / "shiny.safetensors")
    return {"root": root, "models": models, "loras": loras, "embeddings": embeddings, "outside": outside,
            "ckpt": tiny_ckpt}


def _config(folders, **overrides) -> ServerConfig:
    options = dict(ckpt=folders["ckpt"], models_dir=folders["models"], lora_dir=folders["loras"],
                   embeddings_dir=folders["embeddings"], device="cpu", precision="fp32")
    return ServerConfig(**{**options, **overrides})


@pytest.fixture
def make_client(folders):
    clients = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(_config(folders, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def _params(text: str) -> dict:
    return parse_parameters(_image(text).info["parameters"])


def _field_error(response, field: str) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][-1] == field, detail
    return detail[0]["msg"]


# ---- the API with TestClient ------------------------------------------------------------------------------------

def test_txt2img_answers_as_a1111(client):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "batch_size": 2, "n_iter": 2,
            "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "karras", **FAST,
            "restore_faces": False, "enable_hr": False, "script_args": [], "hr_checkpoint_name": None,  # ignored
            "eta": None}                                                                              # = default
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and len(out["images"]) == 4
    info = json.loads(out["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["width"]) == ("DPM++ 2M Karras", 2, 5, 64)
    assert out["parameters"]["prompt"] == "a red circle" and out["parameters"]["batch_size"] == 2
    for i, image in enumerate(out["images"]):
        assert _image(image).info["parameters"] == info["infotexts"][i]
        p = _params(image)
        assert (p["prompt"], p["negative_prompt"], p["seed"], p["steps"], p["cfg_scale"], p["sampler"]) == (
            "a red circle", "blue", 7 + i, 2, 5.0, "DPM++ 2M Karras")
    # image i of a request is the image its seed makes alone (here the 4th, second batch of n_iter)
    alone = client.post("/sdapi/v1/txt2img", json={**body, "seed": 10, "batch_size": 1, "n_iter": 1}).json()
    difference = np.abs(np.asarray(_image(alone["images"][0]), dtype=int) - np.asarray(_image(out["images"][3])))
    assert difference.max() <= 2  # batched float arithmetic may round a pixel differently
    # seed -1: a random seed, reported
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1, **FAST}).json()["info"])
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]


def test_wrong_types_and_limits_name_the_field(make_client):
    client = make_client(max_steps=10, max_size=128, max_batch=4)
    post = lambda **kw: client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST, **kw})  # noqa: E731
    assert "integer" in _field_error(post(steps="many"), "steps")
    _field_error(post(prompt=5), "prompt")
    _field_error(post(cfg_scale="high"), "cfg_scale")
    assert "--max-steps" in _field_error(post(steps=11), "steps")
    assert "--max-size" in _field_error(post(width=256), "width")
    assert "--max-batch" in _field_error(post(batch_size=3, n_iter=2), "batch_size")
    assert "samplers" in _field_error(post(sampler_name="Nope 3000"), "sampler_name")
    _field_error(post(scheduler="beta"), "scheduler")
    # the model's own checks (size multiple) come back as the request's 422, and the server goes on
    r = post(width=40)
    assert r.status_code == 422 and "multiple of 16" in r.json()["detail"]
    assert post().status_code == 200


def test_img2img_and_inpainting(client):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"prompt": "a blue square", "init_images": ["data:image/png;base64," + _png(init)], "seed": 3,
            "denoising_strength": 0.5, **FAST}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert _params(out["images"][0])["strength"] == 0.5 and out["parameters"]["init_images"] is None
    for fill in (0, 1):
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": _png(mask), "inpainting_fill": fill,
                                                    "inpainting_mask_invert": 0, "mask_blur": 4})
        assert r.status_code == 200, r.text
    assert "inpainting_fill" in str(client.post("/sdapi/v1/img2img",
                                                json={**body, "mask": _png(mask), "inpainting_fill": 2}).json())
    _field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": ["not an image"]}), "0")
    _field_error(client.post("/sdapi/v1/img2img", json={**body, "init_images": []}), "init_images")
    _field_error(client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 1}), "resize_mode")


def test_png_info_reads_the_parameters_back(client):
    out = client.post("/sdapi/v1/txt2img", json={"prompt": "two circles", "seed": 11, **FAST}).json()
    info = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]}).json()
    assert info["info"] == json.loads(out["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "two circles" and info["parameters"]["Seed"] == 11
    assert (info["parameters"]["Size-1"], info["parameters"]["Size-2"]) == (64, 64)
    plain = client.post("/sdapi/v1/png-info", json={"image": _png(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def test_listings(client, folders):
    samplers = {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= samplers
    client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST})  # the model is loaded (and hashed) by now
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["tiny.safetensors", "other.safetensors"]  # not the escaping link
    assert models[0]["hash"] == models[0]["sha256"][:10]
    assert client.get("/sdapi/v1/loras").json()[0]["name"] == "style"
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"]["shiny"]["vectors"] == 2 and embeddings["loaded"]["shiny"]["shape"] == 32
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny.safetensors"


def test_model_list_shows_hashes_known_for_the_files_as_they_are(tmp_path, monkeypatch):
    """A listed model's hash comes from the hash cache only while the file is unchanged: a checkpoint replaced in
    place while the server runs shows no hash (not the old file's) until it is hashed again; listing hashes nothing."""
    import hashlib

    import ldm.io
    from ldm.io import file_sha256
    from ldm.serve.worker import ModelFiles

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    default, other = tmp_path / "default.safetensors", tmp_path / "models" / "other.safetensors"
    default.write_bytes(b"first weights")
    other.write_bytes(b"other weights")
    files = ModelFiles(default, tmp_path / "models")

    def listed(attr: str) -> list:
        with monkeypatch.context() as m:  # a listing that hashed a file would fail here
            m.setattr(ldm.io.hashlib, "sha256", lambda *a: pytest.fail("the model list hashed a file"))
            return [getattr(e, attr) for e in files.entries()]

    assert listed("sha256") == [None, None]
    assert file_sha256(default) == hashlib.sha256(b"first weights").hexdigest()  # as loading the model does
    assert listed("hash") == [hashlib.sha256(b"first weights").hexdigest()[:10], None]
    default.write_bytes(b"replaced weights")  # another size: the cached hash no longer stands
    assert listed("sha256") == [None, None]
    assert file_sha256(default) == hashlib.sha256(b"replaced weights").hexdigest()
    assert listed("sha256")[0] == hashlib.sha256(b"replaced weights").hexdigest()


def test_switching_models_and_names_that_escape_their_folder(client, folders):
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other.safetensors"
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST}).json()["info"])
    assert info["sd_model_name"] == "other"
    # a request may name another model for itself only (A1111's override_settings)
    body = {"prompt": "x", **FAST, "override_settings": {"sd_model_checkpoint": "tiny"}}
    assert json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])["sd_model_name"] == "tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other.safetensors"
    # names are looked up in the folder's listing, never joined onto a path
    for name in ("../outside.safetensors", str(folders["outside"]), "escape.safetensors", "escape"):
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert r.status_code == 404 and "not found" in r.text, name
        body = {"prompt": "x", **FAST, "override_settings": {"sd_model_checkpoint": name}}
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 404
    assert "not found" in _field_error(client.post("/sdapi/v1/txt2img", json={
        "prompt": "a <lora:../outside:1>", **FAST}), "prompt")


def test_loras_and_embeddings_in_prompts_are_applied(client):
    """A <lora:...> tag merges the LoRA of --lora-dir for that request (A1111's Lora hashes in the infotext), an
    embedding of --embeddings-dir is called by its name; the same seed without them gives the plain image."""
    def txt2img(prompt):
        response = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": 3, **FAST})
        assert response.status_code == 200, response.text
        return response.json()["images"][0], json.loads(response.json()["info"])["infotexts"][0]

    plain, _ = txt2img("a cat")
    styled, info = txt2img("a cat <lora:style:0.8>")
    assert styled != plain and 'Lora hashes: "style: ' in info and "<lora:style:0.8>" in info
    assert txt2img("a cat")[0] == plain  # the LoRA is taken off again for the next request
    assert client.get("/sdapi/v1/embeddings").json()["loaded"]["shiny"]["vectors"] == 2
    shiny, info = txt2img("a shiny cat")
    assert "TI hashes" in info and "shiny" in info
    msg = _field_error(client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:nope:1> cat", **FAST}), "prompt")
    assert "LoRA 'nope'" in msg and "--lora-dir" in msg


def test_auth_guards_every_route(make_client):
    client = make_client(api_auth="alice:wonder,bob:builder")
    for path in ("/", "/static/app.js", "/sdapi/v1/samplers", "/sdapi/v1/progress", "/nope"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert client.get(path, auth=("alice", "wrong")).status_code == 401
        assert client.get(path, auth=("mallory", "wonder")).status_code == 401
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST}).status_code == 401
    assert client.get("/", auth=("alice", "wonder")).status_code == 200
    assert client.get("/sdapi/v1/samplers", auth=("bob", "builder")).status_code == 200


def test_body_and_image_size_limits(make_client):
    client = make_client(max_body_mb=0.05, max_image_pixels=32 * 32)
    big = {"prompt": "x" * 100_000}
    r = client.post("/sdapi/v1/txt2img", json=big)
    assert r.status_code == 413 and "--max-body-mb" in r.text
    r = client.post("/sdapi/v1/txt2img", content=json.dumps(big).encode(),  # no content-length: counted as read
                    headers={"content-type": "application/json", "transfer-encoding": "chunked"})
    assert r.status_code == 413
    msg = _field_error(client.post("/sdapi/v1/png-info", json={"image": _png(Image.new("RGB", (64, 64)))}), "image")
    assert "--max-image-pixels" in msg


@pytest.fixture
def gate(monkeypatch):
    """Holds the worker at its first sampler step until ``gate.set()``: the queue can be watched and filled."""
    event, reached = threading.Event(), threading.Event()
    step = worker_module.Worker._step

    def held_step(self, pipe, info):
        reached.set()
        event.wait(30)
        return step(self, pipe, info)

    monkeypatch.setattr(worker_module.Worker, "_step", held_step)
    event.reached = reached
    yield event
    event.set()


def test_queue_order_503_interrupt_and_progress(make_client, gate):
    client = make_client(max_queue=1)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/sdapi/v1/txt2img",
                            json={"prompt": "first", "force_task_id": "A", "n_iter": 2, **FAST})
        assert gate.reached.wait(30)
        second = pool.submit(client.post, "/sdapi/v1/txt2img",
                             json={"prompt": "second", "force_task_id": "B", "seed": 5, **FAST})
        for _ in range(100):
            if client.get("/sdapi/v1/progress").json()["queue_size"] == 1:
                break
            time.sleep(0.05)
        full = client.post("/sdapi/v1/txt2img", json={"prompt": "third", **FAST})
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        progress = client.get("/sdapi/v1/progress", params={"id_task": "B"}).json()
        assert progress["queue_position"] == 1 and progress["state"]["job_count"] == 2
        assert client.get("/sdapi/v1/progress", params={"id_task": "A"}).json()["queue_position"] == 0
        assert client.post("/sdapi/v1/interrupt").json() == {}
        gate.set()
        a, b = first.result(30), second.result(30)
    assert a.status_code == 200 and a.json()["images"] == [] and json.loads(a.json()["info"])["interrupted"]
    assert b.status_code == 200 and [_params(i)["prompt"] for i in b.json()["images"]] == ["second"]
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0


def test_live_preview_while_a_client_watches(make_client, monkeypatch):
    client = make_client(preview_every=1)
    seen = []
    step = worker_module.Worker._step

    def watched_step(self, pipe, info):
        step(self, pipe, info)
        seen.append(self.progress(want_image=True))  # a client polling between steps

    monkeypatch.setattr(worker_module.Worker, "_step", watched_step)
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", **{**FAST, "steps": 3}}).status_code == 200
    assert [s["state"]["sampling_step"] for s in seen] == [1, 2, 3]
    assert seen[-1]["current_image"].size == (64, 64) and 0 < seen[0]["progress"] < seen[-1]["progress"] <= 1


def _slow_steps(monkeypatch, seconds: float = 0.15):
    """Each sampler step of the worker waits ``seconds`` first; returns the real step, to put back."""
    step = worker_module.Worker._step

    def slow_step(self, pipe, info):
        time.sleep(seconds)
        return step(self, pipe, info)

    monkeypatch.setattr(worker_module.Worker, "_step", slow_step)
    return step


def test_timeout_and_failures_are_the_requests_own(make_client, folders, monkeypatch):
    client = make_client(timeout=0.2)
    step = _slow_steps(monkeypatch)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **{**FAST, "steps": 10}})
    monkeypatch.setattr(worker_module.Worker, "_step", step)
    assert r.status_code == 504 and "--timeout" in r.text
    client.app.state.server.worker.timeout = None  # the rest must not depend on the machine's speed
    # a checkpoint that does not load is that request's error; the server goes on with its model
    (folders["models"] / "broken.safetensors").write_bytes(b"not a checkpoint")
    try:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST,
                                                   "override_settings": {"sd_model_checkpoint": "broken"}})
        assert r.status_code in (422, 500) and r.json()["detail"]
    finally:
        (folders["models"] / "broken.safetensors").unlink()
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST}).status_code == 200


# ---- a real server: serve.py on a free port ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen | None = None, seconds: float = 120, auth=None) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(url + "/sdapi/v1/options", auth=auth, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no server at {url}")


def _start_serve_py(*args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--device", "cpu",
                                *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live_tiny(folders):
    process, url = _start_serve_py("--ckpt", folders["ckpt"], "--models-dir", folders["models"],
                                   "--api-auth", "user:pass", "--max-queue", "32")
    try:
        _wait_until_up(url, process, auth=("user", "pass"))
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_real_server_many_clients_get_their_own_images(live_tiny):
    import httpx

    def one(i: int) -> tuple[int, list[dict], dict]:
        body = {"prompt": f"request {i}", "seed": 1000 + 10 * i, "steps": 1 + i % 3, "batch_size": 1 + i % 2,
                "cfg_scale": 1 + i, "sampler_name": ["Euler a", "DDIM", "DPM++ 2M Karras"][i % 3], "width": 64,
                "height": 64}
        r = httpx.post(live_tiny + "/sdapi/v1/txt2img", json=body, auth=("user", "pass"), timeout=120)
        assert r.status_code == 200, r.text
        return i, [_params(image) for image in r.json()["images"]], body

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(12)))
    for i, params, body in results:
        assert len(params) == body["batch_size"]
        for k, p in enumerate(params):
            assert (p["prompt"], p["seed"], p["steps"], p["cfg_scale"], p["sampler"]) == (
                body["prompt"], body["seed"] + k, body["steps"], body["cfg_scale"], body["sampler_name"])
    assert httpx.get(live_tiny + "/").status_code == 401


def test_an_a1111_client_library_drives_the_server(live_tiny):
    webuiapi = pytest.importorskip("webuiapi", reason="pip install webuiapi (in the dev extra)")
    host, port = live_tiny.rsplit(":", 1)
    api = webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), username="user", password="pass",
                            sampler="Euler a", steps=2)
    assert "other.safetensors" in api.util_get_model_names()
    api.util_set_model("other.safetensors")
    assert api.util_get_current_model() == "other.safetensors"
    result = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, cfg_scale=3)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [5]
    assert result.image.info["parameters"].startswith("a red circle\n")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpainted = api.img2img(images=[result.image], mask_image=mask, prompt="a blue square", seed=6, width=64,
                            height=64, denoising_strength=0.6, inpainting_fill=1)
    assert inpainted.image.size == (64, 64) and inpainted.info["all_seeds"] == [6]
    assert api.png_info(inpainted.image).info.startswith("a blue square")
    assert api.get_progress()["state"]["job_count"] == 0


def test_command_line_errors_before_loading_anything(tmp_path, capsys):
    from ldm.serve import cli

    for argv, message in ((["--ckpt", str(tmp_path / "none.safetensors")], "checkpoint not found"),
                          (["--models-dir", str(tmp_path / "none")], "folder not found"),
                          (["--port", "70000"], "--port"), (["--api-auth", "nopassword"], "not user:password"),
                          (["--max-steps", "0"], "--max-steps"), (["--device", "tpu"], "unknown device")):
        assert cli.main(argv, prog="ldm-serve") == 2
        err = capsys.readouterr().err
        assert err.startswith("ldm-serve: error: ") and err.count("\n") == 1 and message in err, err
    assert cli.build_parser().parse_args([]).host == "127.0.0.1"  # loopback unless told otherwise


# ---- the demo model end to end, and the page in a browser ---------------------------------------------------------

@pytest.fixture(scope="module")
def live_demo():
    """The embedded demo model on uvicorn in this process (a thread)."""
    import uvicorn

    from ldm.cli.sample import DEFAULT_CKPT

    port = _free_port()
    app = create_app(ServerConfig(ckpt=DEFAULT_CKPT, device="cpu", precision="fp32", preview_every=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def test_demo_model_through_the_api(live_demo):
    import httpx

    body = {"prompt": "two red circles above a blue square", "seed": 42, "steps": 4, "sampler_name": "DPM++ 2M Karras"}
    r = httpx.post(live_demo + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    image = _image(r.json()["images"][0])
    assert image.size == (64, 64)  # the model's own size when the request names none
    params = _params(r.json()["images"][0])
    assert (params["prompt"], params["seed"], params["model"]) == (body["prompt"], 42, "shapes")
    pixels = np.asarray(image.convert("RGB")).astype(float)
    assert pixels.std() > 10  # a picture, not a flat colour


def _browser(width: int, height: int):
    """Headless Debian chromium through selenium and chromedriver (no downloads); skips with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (in the dev extra)")
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no chromium + chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _wait(predicate, seconds: float = 120, every: float = 0.1):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("the page did not get there in time")


def test_the_page_in_a_browser(live_demo, tmp_path, monkeypatch):
    """Type a prompt, generate with the demo model, watch the progress, see the images with their parameters, reuse
    one's settings; the layout fits a phone. LDM_SERVE_SCREENSHOT=docs/serve.png saves the screenshot there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    # The page polls /progress every 400 ms, and on a fast CPU the demo model's 8 steps can finish between two polls
    # (CI failed so once): each step waits 0.15 s here, so the progress bar has several polls to show.
    _slow_steps(monkeypatch)

    browser = _browser(1280, 960)
    try:
        browser.get(live_demo + "/")
        find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
        _wait(lambda: len(find("#sampler").find_elements(By.TAG_NAME, "option")) > 10)
        assert Select(find("#model")).first_selected_option.text == "shapes"
        Select(find("#sampler")).select_by_visible_text("DPM++ 2M Karras")
        find("#prompt").send_keys("two red circles above a blue square")
        for field, value in (("#steps", "8"), ("#seed", "42"), ("#batch_size", "4")):
            find(field).clear()
            find(field).send_keys(value)
        find("#generate").click()
        _wait(lambda: "step" in find("#progress-text").text)  # the progress bar runs
        cards = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery .result"))
        assert len(cards) == 4
        done = _wait(lambda: re.fullmatch(r"Done: 4 images in [0-9.]+ s\.", find("#progress-text").text))
        assert float(done.group(0).split(" in ")[1][:-3]) > 8 * 0.15  # the run's own time (8 slowed steps)
        seeds = sorted(int(c.find_element(By.CSS_SELECTOR, ".params").text.split("Seed: ")[1].split(",")[0])
                       for c in cards)
        assert seeds == [42, 43, 44, 45]
        text = cards[0].find_element(By.CSS_SELECTOR, ".params").text
        assert text.startswith("two red circles above a blue square\n") and "Steps: 8" in text
        width = browser.execute_script("return document.querySelector('#gallery img').naturalWidth")
        assert width == 64
        assert cards[0].find_element(By.CSS_SELECTOR, "a.download").get_attribute("download").endswith(".png")
        find("#seed").clear()
        cards[-1].find_element(By.CSS_SELECTOR, ".reuse").click()  # the oldest card: seed 42
        assert find("#seed").get_attribute("value") == "42" and find("#steps").get_attribute("value") == "8"
        assert not find("#error").is_displayed()
        browser.execute_script("window.scrollTo(0, 0)")
        screenshot = Path(os.environ.get("LDM_SERVE_SCREENSHOT") or tmp_path / "serve.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        # inpainting: upload a start image, paint a mask with the brush, generate
        from selenium.webdriver.common.action_chains import ActionChains

        start = tmp_path / "start.png"
        data = browser.execute_script("return document.querySelector('#gallery img').src").split(",", 1)[1]
        start.write_bytes(base64.b64decode(data))
        center = "arguments[0].scrollIntoView({block: 'center'})"  # out from under the sticky Generate bar
        browser.execute_script(center, find("#img2img summary"))
        find("#img2img summary").click()
        find("#init").send_keys(str(start))
        canvas = _wait(lambda: find("#canvas") if find("#canvas").is_displayed() else None, 30)
        browser.execute_script(center, canvas)
        ActionChains(browser).move_to_element_with_offset(canvas, -60, 0).click_and_hold() \
            .move_by_offset(120, 0).release().perform()
        find("#batch_size").clear()
        find("#batch_size").send_keys("1")
        find("#generate").click()
        _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#gallery .result")) == 5 or
              find("#error").is_displayed())
        text = browser.find_element(By.CSS_SELECTOR, "#gallery .result .params").text
        assert "Denoising strength: 0.75" in text and not find("#error").is_displayed()
        # the brush painted the mask that went with the request: white where the stroke went, black elsewhere
        painted = browser.execute_script(
            "const d = maskCanvas.getContext('2d').getImageData(0, 0, maskCanvas.width, maskCanvas.height).data;"
            "let white = 0; for (let i = 0; i < d.length; i += 4) white += d[i] > 127; return [maskPainted, white];")
        assert painted[0] is True and 0 < painted[1] < 64 * 64 / 2
        # a phone: one column, nothing wider than the screen
        browser.set_window_size(390, 844)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
    finally:
        browser.quit()
