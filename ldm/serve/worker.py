"""The model worker: one thread owns the loaded model and runs the queued jobs in order.

    worker = Worker(ModelFiles(default_ckpt, models_dir), load=load_pipeline, max_queue=16)
    future = worker.submit(Job("txt2img", GenerationRequest(...)))   # QueueFull when the queue is full
    result = future.result()                                          # GenerationResult, or the job's own error
    worker.progress(task_id)                                          # step, preview, queue position
    worker.interrupt()                                                # the running job stops after this step

The HTTP layer (``ldm.serve.api``) awaits the futures with ``asyncio.wrap_future``, so generation never runs on the
event loop. A job's failure (a bad image, out of memory, a model that does not load) is set on its own future; the
worker goes on with the next job. An interrupted job returns the batches it finished; a job that runs longer than
``timeout`` seconds fails with :class:`JobTimeout` and frees the worker.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` waiting jobs: try again later."""


class JobTimeout(RuntimeError):
    """A job ran longer than the worker's ``timeout``."""


class _Stop(Exception):
    """Raised inside the sampler's step callback to end the running job (interrupt or timeout)."""


# ------------------------------------------------------------------------------------------------------------
# files the server may open: checkpoints, LoRAs, embeddings
# ------------------------------------------------------------------------------------------------------------

def list_files(folder: str | Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{name: path}`` of the files under ``folder`` with one of ``suffixes`` (name: the path relative to the
    folder, without suffix, '/'-separated). Links that lead outside the folder are left out, so a name can
    never reach a file elsewhere: requests name files only through this listing."""
    if folder is None:
        return {}
    root = Path(folder).resolve()
    if not root.is_dir():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if not path.resolve().is_relative_to(root):
            log.warning("ignoring %s: it links outside %s", path, root)
            continue
        out[path.relative_to(root).with_suffix("").as_posix()] = path
    return out


@dataclass
class ModelEntry:
    """One checkpoint as A1111's ``/sdapi/v1/sd-models`` lists it."""

    title: str       # the file name relative to its folder ("sub/model.safetensors")
    model_name: str  # without the suffix
    filename: Path
    sha256: str | None = None

    @property
    def hash(self) -> str | None:
        return None if self.sha256 is None else self.sha256[:10]

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.filename), "config": None}


class ModelFiles:
    """The checkpoints the server can switch between: the ``default`` one (``--ckpt``, or the embedded demo
    model) and every ``.safetensors`` / ``.ckpt`` under ``models_dir`` (listed afresh on each call)."""

    def __init__(self, default: str | Path, models_dir: str | Path | None = None):
        self.default = Path(default)
        self.models_dir = None if models_dir is None else Path(models_dir)

    def entries(self) -> list[ModelEntry]:
        entries = [ModelEntry(self.default.name, self.default.stem, self.default.resolve())]
        for name, path in list_files(self.models_dir, CHECKPOINT_SUFFIXES).items():
            if path.resolve() != entries[0].filename:
                entries.append(ModelEntry(name + path.suffix, name, path.resolve()))
        from ldm.io import cached_sha256

        for entry in entries:  # the hashes already known for the files as they are now: listing reads no file
            try:
                entry.sha256 = cached_sha256(entry.filename)
            except OSError:  # gone between the listing and here
                entry.sha256 = None
        return entries

    def find(self, name: str) -> ModelEntry:
        """The entry whose title, title with an A1111 ``[hash]`` after it, model name or file name is ``name``;
        KeyError naming the choices otherwise."""
        wanted = name.strip()
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted[:wanted.rindex(" [")]
        entries = self.entries()
        for entry in entries:
            if wanted in (entry.title, entry.model_name, entry.filename.name):
                return entry
        raise KeyError(f"model {name!r} not found; choose one of: {', '.join(e.title for e in entries)}")


# ------------------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------------------

@dataclass
class GenerationRequest:
    """One txt2img / img2img / inpaint request, checked and decoded by the HTTP layer."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    sampler: str = "Euler"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    init_images: list[Image.Image] | None = None
    mask: Image.Image | None = None
    denoising_strength: float = 0.75


@dataclass
class GenerationResult:
    images: list[Image.Image]
    parameters: list[dict[str, Any]]  # one per image, as the pipeline gives them
    model: ModelEntry
    interrupted: bool = False
    job_timestamp: str = ""


@dataclass
class Job:
    """``kind``: "txt2img", "img2img", "inpaint" (``request`` set) or "load" (switch the model only)."""

    kind: str
    request: GenerationRequest | None = None
    model: str | None = None  # the checkpoint to use (a name ModelFiles.find knows); None: the current one
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)


@dataclass
class _State:
    """What /sdapi/v1/progress reports about the running job."""

    task_id: str | None = None
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    job_timestamp: str = ""
    interrupted: bool = False
    preview: Image.Image | None = None
    preview_step: int = -1
    textinfo: str | None = None


class Worker:
    """One thread, one loaded model, a FIFO queue of at most ``max_queue`` waiting jobs.

    Args:
        files: the checkpoints it may load.
        load: ``load(path) -> Text2Image`` (device, precision and the other options bound by the caller).
        max_queue: waiting jobs (the running one not counted) before :meth:`submit` raises QueueFull.
        timeout: seconds a job may run (None: no limit).
        preview_every: decode a live preview every this many sampler steps, when a client asked for one
            since the last (0: never).
    """

    def __init__(self, files: ModelFiles, load: Callable[[Path], Any], *, max_queue: int = 16,
                 timeout: float | None = None, preview_every: int = 5):
        self.files, self._load = files, load
        self.max_queue, self.timeout, self.preview_every = max_queue, timeout, preview_every
        self.current = files.find(files.default.name)  # the model requests get unless they name another
        self._pipes: dict[str, Any] | None = None
        self._loaded: ModelEntry | None = None
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._state = _State()
        self._stop_job = threading.Event()
        self._preview_wanted = False
        self._deadline: float | None = None
        self._closed = False
        self.seconds_per_job: float | None = None  # running average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)
        self._thread.start()

    # ---- the HTTP side ----------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests): retry later")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def current_embeddings(self) -> set[str]:
        """The names of the embeddings the loaded model can use (empty before a model is loaded)."""
        pipes = self._pipes
        return {e.name for e in pipes["txt2img"].embeddings} if pipes else set()

    def interrupt(self) -> None:
        """Stop the running job after its current step (it returns the batches it finished)."""
        with self._cond:
            if self._state.task_id is not None:
                self._state.interrupted = True
                self._stop_job.set()

    def queue_size(self) -> int:
        with self._cond:
            return len(self._queue)

    def progress(self, task_id: str | None = None, want_image: bool = True) -> dict[str, Any]:
        """A1111's progress fields plus ``queue_position`` of ``task_id`` (0: running, n: n-th waiting,
        None: not queued) and ``queue_size``."""
        with self._cond:
            s = self._state
            position = None
            if task_id is not None:
                if s.task_id == task_id:
                    position = 0
                else:
                    position = next((i + 1 for i, job in enumerate(self._queue) if job.task_id == task_id), None)
            progress, eta = 0.0, 0.0
            if s.task_id is not None and s.job_count:
                progress = 0.01 + s.job_no / s.job_count
                if s.sampling_steps:
                    progress += s.sampling_step / s.sampling_steps / s.job_count
                elapsed = time.time() - s.time_start
                eta = elapsed / progress - elapsed
                progress = min(progress, 1.0)
            preview = s.preview if (s.task_id is not None and want_image) else None
            if want_image and s.task_id is not None:
                self._preview_wanted = True
            state = {"skipped": False, "interrupted": s.interrupted, "stopping_generation": False, "job": s.job,
                     "job_count": s.job_count if s.task_id else 0, "job_timestamp": s.job_timestamp,
                     "job_no": s.job_no, "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps,
                     "queue_size": len(self._queue), "task_id": s.task_id}
            return {"progress": progress, "eta_relative": eta, "state": state, "current_image": preview,
                    "textinfo": s.textinfo, "queue_position": position, "queue_size": len(self._queue)}

    def close(self, timeout: float = 10.0) -> None:
        """Fail the waiting jobs, stop the running one and end the thread."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._stop_job.set()
            self._cond.notify_all()
        for job in waiting:
            job.future.set_exception(RuntimeError("the server is shutting down"))
        self._thread.join(timeout)

    # ---- the worker thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self._stop_job.clear()
                self._state = _State(task_id=job.task_id, job=job.kind, time_start=time.time(),
                                     job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            if not job.future.set_running_or_notify_cancel():  # its client gave up while it waited
                self._finish()
                continue
            start = time.perf_counter()
            try:
                job.future.set_result(self._run(job))
            except BaseException as e:  # the job's own error; the worker goes on
                if not isinstance(e, (ValueError, KeyError, QueueFull, JobTimeout)):
                    log.exception("job %s (%s) failed", job.task_id, job.kind)
                job.future.set_exception(e)
                _free_memory()
            finally:
                seconds = time.perf_counter() - start
                self.seconds_per_job = seconds if self.seconds_per_job is None else (
                    0.8 * self.seconds_per_job + 0.2 * seconds)
                self._finish()

    def _finish(self) -> None:
        with self._cond:
            self._state = _State()
            self._deadline = None

    def _pipelines(self, name: str | None) -> tuple[dict[str, Any], ModelEntry]:
        """The txt2img / img2img / inpaint pipelines of the model ``name`` (loaded if it is not the one in
        memory; a failed load keeps nothing half-loaded)."""
        entry = self.current if name is None else self.files.find(name)
        if self._loaded is None or self._loaded.filename != entry.filename or self._pipes is None:
            from ldm.io import file_sha256
            from ldm.pipeline import Image2Image, Inpaint

            with self._cond:
                self._state.textinfo = f"loading {entry.title}"
            self._pipes, self._loaded = None, None
            _free_memory()
            log.info("loading %s", entry.filename)
            base = self._load(entry.filename)
            base.model_name = entry.model_name
            pipes = {"txt2img": base, "img2img": Image2Image.from_pipeline(base), "inpaint": Inpaint.from_pipeline(base)}
            entry.sha256 = file_sha256(entry.filename)  # cached while the file's size and time stand
            for pipe in pipes.values():  # the file is hashed once, not once per task
                pipe.__dict__["model_hash"] = entry.hash
            self._pipes, self._loaded = pipes, entry
        return self._pipes, self._loaded

    def _run(self, job: Job) -> Any:
        pipes, entry = self._pipelines(job.model)
        if job.kind == "load":
            self.current = entry
            return entry
        pipe = pipes[job.kind]
        req = job.request
        self._deadline = None if self.timeout is None else time.time() + self.timeout
        with self._cond:
            self._state.job_count = req.n_iter
            self._state.textinfo = None
        kwargs = dict(negative_prompts=req.negative_prompt, height=req.height, width=req.width, steps=req.steps,
                      sampler=req.sampler, guidance_scale=req.cfg_scale, eta=req.eta, batch_size=req.batch_size,
                      callback=lambda info: self._step(pipe, info))
        images, parameters, interrupted = [], [], False
        for j in range(req.n_iter):
            with self._cond:
                self._state.job_no, self._state.sampling_step = j, 0
            first = j * req.batch_size
            call = dict(kwargs, seeds=req.seed + first)
            if job.kind != "txt2img":
                call["init_images"] = [req.init_images[(first + i) % len(req.init_images)]
                                       for i in range(req.batch_size)]
                call["strength"] = req.denoising_strength
            if job.kind == "inpaint":
                call["masks"] = req.mask
            try:
                out = pipe([req.prompt] * req.batch_size, **call)
            except _Stop:
                if self._deadline is not None and time.time() > self._deadline:
                    raise JobTimeout(f"the request ran longer than the server's timeout of {self.timeout:g} s "
                                     "(start the server with a larger --timeout, or ask for fewer steps)") from None
                interrupted = True
                break
            images += out.images
            parameters += out.parameters
        return GenerationResult(images, parameters, entry, interrupted, self._state.job_timestamp)

    def _step(self, pipe, info: dict) -> None:
        """The sampler's per-step callback: progress, live preview, interrupt and timeout."""
        if self._stop_job.is_set() or (self._deadline is not None and time.time() > self._deadline):
            raise _Stop()
        step = int(info["i"]) + 1
        preview = None
        with self._cond:
            self._state.sampling_step, self._state.sampling_steps = step, int(info.get("total_steps") or 0)
            want = self._preview_wanted and self.preview_every > 0 and (
                step % self.preview_every == 0 or step == self._state.sampling_steps)
        if want:
            preview = pipe.decode(info["denoised"][:1])[0]
            with self._cond:
                self._state.preview, self._state.preview_step = preview, step
                self._preview_wanted = False


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
