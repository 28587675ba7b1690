// The page of ldm's server: it talks to the same A1111-style API as any other client (/sdapi/v1/...).
"use strict";

const $ = (id) => document.getElementById(id);
const API = "sdapi/v1/";
const pending = [];          // task ids of this page's requests, oldest first
let lastSeed = null;
let polling = null;

// ---- talking to the server ------------------------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(API + path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorText(response, data));
  return data;
}

function errorText(response, data) {
  const detail = data && data.detail;
  if (Array.isArray(detail)) return detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("\n");
  if (detail) return String(detail);
  if (response.status === 503) return "The server's queue is full: try again in a moment.";
  return `${response.status} ${response.statusText}`;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function fill(select, items, keep) {
  for (const item of items) {
    const option = document.createElement("option");
    option.value = item.value;
    option.textContent = item.label;
    select.appendChild(option);
  }
  if (keep !== undefined) select.value = keep;
}

async function init() {
  try {
    const [samplers, models, options, loras, embeddings] = await Promise.all(
      ["samplers", "sd-models", "options", "loras", "embeddings"].map((p) => api(p)));
    fill($("sampler"), samplers.map((s) => ({ value: s.name, label: s.name })), "DPM++ 2M Karras");
    fill($("model"), models.map((m) => ({ value: m.title, label: m.model_name })), options.sd_model_checkpoint);
    fill($("lora"), loras.map((l) => ({ value: l.name, label: l.name })));
    const names = Object.keys(embeddings.loaded).concat(Object.keys(embeddings.skipped));
    fill($("embedding"), names.map((n) => ({ value: n, label: n })));
  } catch (e) {
    showError(`Could not reach the server: ${e.message}`);
  }
}

// ---- the form -------------------------------------------------------------------------------------------------

function numberOf(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function requestBody(taskId) {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: numberOf("steps"), cfg_scale: numberOf("cfg"), seed: numberOf("seed") ?? -1,
    width: numberOf("width"), height: numberOf("height"), n_iter: numberOf("n_iter") ?? 1,
    batch_size: numberOf("batch_size") ?? 1, force_task_id: taskId,
  };
  if (initImage) {
    body.init_images = [initImage.src];
    body.denoising_strength = Number($("strength").value);
    if (maskPainted) {
      body.mask = maskCanvas.toDataURL("image/png");
      body.inpainting_fill = 1;
    }
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const taskId = "page-" + Math.random().toString(36).slice(2) + Date.now().toString(36);
  const body = requestBody(taskId);
  pending.push(taskId);
  startPolling();
  const started = performance.now();
  let done = "";
  try {
    const result = await api(initImage ? "img2img" : "txt2img", body);
    addResults(result);
    // a fast run can end between two progress polls: say what happened instead of a bare "Ready."
    const n = result.images.length;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    done = `Done: ${n} image${n === 1 ? "" : "s"} in ${seconds} s.`;
  } catch (e) {
    showError(e.message);
  } finally {
    pending.splice(pending.indexOf(taskId), 1);
    if (!pending.length) stopPolling(done);
  }
}

function reuse(info, index) {
  $("prompt").value = info.all_prompts[index] ?? info.prompt;
  $("negative").value = info.all_negative_prompts[index] ?? info.negative_prompt;
  $("sampler").value = info.sampler_name;
  $("steps").value = info.steps;
  $("cfg").value = info.cfg_scale;
  $("seed").value = info.all_seeds[index];
  $("width").value = info.width;
  $("height").value = info.height;
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function addResults(result) {
  const info = JSON.parse(result.info);
  const gallery = $("gallery");
  result.images.forEach((image, i) => {
    const card = document.createElement("figure");
    card.className = "result";
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + image;
    img.alt = info.all_prompts[i];
    const text = document.createElement("pre");
    text.className = "params";
    text.textContent = info.infotexts[i];
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    const again = document.createElement("button");
    again.type = "button";
    again.className = "reuse";
    again.textContent = "♻ Reuse";
    again.addEventListener("click", () => reuse(info, i));
    const download = document.createElement("a");
    download.className = "download";
    download.href = img.src;
    download.download = `ldm-${info.all_seeds[i]}.png`;
    download.textContent = "⬇ Download";
    buttons.append(again, download);
    card.append(img, text, buttons);
    gallery.insertBefore(card, gallery.firstChild);
  });
  if (info.all_seeds.length) lastSeed = info.all_seeds[0];
  if (info.interrupted) showError("Interrupted: the finished images are shown.");
}

// ---- progress -------------------------------------------------------------------------------------------------

function startPolling() {
  if (!polling) polling = setInterval(poll, 400);
  poll();
}

function stopPolling(message) {
  clearInterval(polling);
  polling = null;
  $("progress-bar").style.width = "0";
  $("progress-text").textContent = message || "Ready.";
  $("preview").hidden = true;
}

async function poll() {
  if (!pending.length) return;
  let p;
  try {
    p = await api(`progress?id_task=${encodeURIComponent(pending[0])}`);
  } catch (e) {
    return;
  }
  if (!pending.length) return;
  const more = pending.length > 1 ? ` · ${pending.length - 1} more of yours queued` : "";
  if (p.queue_position === 0) {
    const s = p.state;
    $("progress-bar").style.width = `${Math.round(p.progress * 100)}%`;
    const batch = s.job_count > 1 ? `batch ${s.job_no + 1}/${s.job_count} · ` : "";
    const eta = p.eta_relative > 0 ? ` · about ${Math.ceil(p.eta_relative)} s left` : "";
    $("progress-text").textContent = s.sampling_steps ?
      `${batch}step ${s.sampling_step}/${s.sampling_steps}${eta}${more}` : `${p.textinfo || "Starting…"}${more}`;
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
    }
  } else if (p.queue_position) {
    $("progress-bar").style.width = "0";
    $("progress-text").textContent = `In the queue: position ${p.queue_position}${more}`;
  }
}

// ---- img2img: the start image and the mask brush --------------------------------------------------------------

let initImage = null;
let maskPainted = false;
const canvas = $("canvas");
const maskCanvas = document.createElement("canvas");   // white = repaint, at the image's own size

function drawCanvas() {
  const ctx = canvas.getContext("2d");
  ctx.drawImage(initImage, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 0.55;
  ctx.drawImage(tinted(), 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
}

function tinted() {   // the mask in the accent colour, for display
  const t = document.createElement("canvas");
  t.width = maskCanvas.width;
  t.height = maskCanvas.height;
  const ctx = t.getContext("2d");
  ctx.drawImage(maskCanvas, 0, 0);
  ctx.globalCompositeOperation = "multiply";
  ctx.fillStyle = "#ff7a45";
  ctx.fillRect(0, 0, t.width, t.height);
  ctx.globalCompositeOperation = "destination-in";
  ctx.drawImage(maskCanvas, 0, 0);
  return t;
}

function clearMask() {
  const ctx = maskCanvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, maskCanvas.width, maskCanvas.height);
  maskPainted = false;
  if (initImage) drawCanvas();
}

function loadInit(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      initImage = img;
      canvas.width = maskCanvas.width = img.naturalWidth;
      canvas.height = maskCanvas.height = img.naturalHeight;
      $("canvas-wrap").hidden = false;
      clearMask();
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function paintAt(event) {
  const rect = canvas.getBoundingClientRect();
  const scale = maskCanvas.width / rect.width;
  const x = (event.clientX - rect.left) * scale;
  const y = (event.clientY - rect.top) * scale;
  const ctx = maskCanvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(x, y, (Number($("brush").value) / 2) * scale, 0, Math.PI * 2);
  ctx.fill();
  maskPainted = true;
  drawCanvas();
}

let painting = false;
canvas.addEventListener("pointerdown", (e) => { painting = true; canvas.setPointerCapture(e.pointerId); paintAt(e); });
canvas.addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
canvas.addEventListener("pointerup", () => { painting = false; });
canvas.addEventListener("pointercancel", () => { painting = false; });

// ---- wiring ---------------------------------------------------------------------------------------------------

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("interrupt", {}).catch((e) => showError(e.message)));
$("dice").addEventListener("click", () => { $("seed").value = -1; });
$("recycle").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });
$("init").addEventListener("change", (e) => { if (e.target.files[0]) loadInit(e.target.files[0]); });
$("clear-mask").addEventListener("click", clearMask);
$("remove-init").addEventListener("click", () => {
  initImage = null;
  maskPainted = false;
  $("init").value = "";
  $("canvas-wrap").hidden = true;
});
$("strength").addEventListener("input", (e) => { $("strength-value").textContent = e.target.value; });
$("model").addEventListener("change", async (e) => {
  showError("");
  $("progress-text").textContent = `Loading ${e.target.value}…`;
  try {
    await api("options", { sd_model_checkpoint: e.target.value });
    $("progress-text").textContent = "Ready.";
  } catch (err) {
    showError(err.message);
  }
});
for (const [id, insert] of [["lora", (v) => ` <lora:${v}:1>`], ["embedding", (v) => ` ${v}`]]) {
  $(id).addEventListener("change", (e) => {
    if (!e.target.value) return;
    $("prompt").value = $("prompt").value.trimEnd() + insert(e.target.value);
    e.target.value = "";
  });
}
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});

init();
