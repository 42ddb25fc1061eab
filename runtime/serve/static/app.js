// The txt2img page: fills the selects from /sdapi/v1, sends the form to txt2img, shows progress and results.
// Keys as in A1111: Ctrl+Enter (Cmd+Enter) generates, Escape interrupts the running job.
import { api } from "./api.js";
import { showImages } from "./gallery.js";
import { loadPng } from "./pnginfo.js";

const $ = (id) => document.getElementById(id);
const NUMBERS = ["steps", "cfg_scale", "seed", "width", "height", "batch_size"];
const POLL_MS = 500;
const state = { busy: false, lastSeed: null };

// Show a message under the progress bar: errors as an alert, anything else as a status.
function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

// Mark the input an error names (by its request field name) as invalid and move the focus to it.
function blame(field) {
  const input = field && document.querySelector(`#generate-form [name="${CSS.escape(field)}"]`);
  if (!input) return;
  input.setAttribute("aria-invalid", "true");
  input.focus();
}

// Replace a select's options: items as {value, text, aliases}, keeping `selected` when it is among them.
function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(({ value, text, aliases }) => {
    const option = new Option(text, value);
    option.dataset.aliases = (aliases || []).join("\n");
    return option;
  }));
  if (items.some((item) => item.value === selected)) select.value = selected;
  select.disabled = items.length === 0;
}

// Load models, samplers, schedule types and the current checkpoint; each failure is reported, the rest still load.
async function loadChoices() {
  const [models, samplers, schedulers, options] = await Promise.allSettled(
    ["sd-models", "samplers", "schedulers", "options"].map((path) => api(path)));
  const failed = [models, samplers, schedulers, options].filter((r) => r.status === "rejected");
  if (failed.length) say(failed.map((r) => r.reason.message).join(" "));
  if (samplers.status === "fulfilled") {
    fillSelect($("sampler_name"), samplers.value.map((s) => ({ value: s.name, text: s.name, aliases: s.aliases })),
               "DPM++ 2M");
  }
  if (schedulers.status === "fulfilled") {
    fillSelect($("scheduler"), schedulers.value.map((s) => ({ value: s.label, text: s.label,
                                                            aliases: [s.name, ...(s.aliases || [])] })),
               "Automatic");
  }
  if (models.status === "fulfilled") {
    const current = options.status === "fulfilled" ? options.value.sd_model_checkpoint : undefined;
    fillSelect($("model"), models.value.map((m) => ({ value: m.title, text: m.title, aliases: [m.model_name] })),
               current);
    $("model").dataset.current = $("model").value;
  }
}

// POST /options {sd_model_checkpoint}; on failure the select goes back to the model still loaded.
async function switchModel() {
  const select = $("model");
  const wanted = select.value;
  select.disabled = $("generate").disabled = true;
  say(`Loading ${wanted}…`, "info");
  try {
    await api("options", { body: { sd_model_checkpoint: wanted } });
    const options = await api("options");
    select.value = select.dataset.current = options.sd_model_checkpoint || wanted;
    say(`Loaded ${select.value}.`, "info");
  } catch (e) {
    select.value = select.dataset.current || "";
    say(e.message);
  } finally {
    select.disabled = false;
    $("generate").disabled = state.busy;
  }
}

// The txt2img body from the form (A1111's field names); an Error naming a number field left empty.
function readForm() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
                 sampler_name: $("sampler_name").value || undefined, scheduler: $("scheduler").value || undefined,
                 n_iter: 1, send_images: true, save_images: false };
  for (const id of NUMBERS) {
    const input = $(id);
    const value = input.value.trim() === "" ? NaN : Number(input.value);
    if (!Number.isFinite(value)) {
      const error = new Error(`${document.querySelector(`label[for="${id}"]`).textContent} must be a number.`);
      error.field = id;
      throw error;
    }
    body[id] = value;
  }
  return body;
}

// Show /progress on the bar: the fraction done, the step and the time left.
function showProgress(p) {
  const s = p.state || {};
  $("progress").value = Math.max(0, Math.min(1, p.progress || 0));
  if (!s.sampling_steps) {
    $("progress-text").textContent = "Waiting…";
    return;
  }
  const job = s.job_count > 1 ? `Batch ${s.job_no + 1}/${s.job_count}, ` : "";
  const eta = p.eta_relative > 0 ? `, about ${p.eta_relative.toFixed(1)} s left` : "";
  $("progress-text").textContent = `${job}Step ${s.sampling_step}/${s.sampling_steps}${eta}`;
}

// Poll /progress until the job is over (one request at a time).
async function pollProgress() {
  while (state.busy) {
    try {
      const progress = await api("progress?skip_current_image=true");
      if (state.busy) showProgress(progress);
    } catch {
      // a missed poll only delays the bar
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("generate").textContent = busy ? "Generating…" : "Generate";
}

// Send the form to txt2img and put the images in the gallery; errors appear as a message.
async function generate() {
  if (state.busy) return;
  let body;
  try {
    body = readForm();
  } catch (e) {
    clearMessage();
    say(e.message);
    blame(e.field);
    return;
  }
  clearMessage();
  setBusy(true);
  $("progress").value = 0;
  $("progress-text").textContent = "Waiting…";
  const started = performance.now();
  pollProgress();
  try {
    const reply = await api("txt2img", { body });
    const info = showImages($("gallery"), reply);
    $("progress").value = 1;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("progress-text").textContent = `Done in ${seconds} s` + (info.seed !== undefined ? `, seed ${info.seed}` : "");
    if (info.seed !== undefined) {
      state.lastSeed = info.seed;
      $("seed-reuse").disabled = false;
    }
  } catch (e) {
    $("progress-text").textContent = "";
    say(e.message);
    blame(e.field);
  } finally {
    setBusy(false);
  }
}

async function interrupt() {
  try {
    await api("interrupt", { method: "POST" });
    $("progress-text").textContent = "Interrupting…";
  } catch (e) {
    say(e.message);
  }
}

async function loadFile(file) {
  try {
    say(await loadPng(file), "info");
  } catch (e) {
    say(e.message);
  }
}

// Drops anywhere on the page load a PNG's parameters; the drop zone lights up while a file is over the page.
function wireDrops() {
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) loadFile(file);
  });
  $("png-file").addEventListener("change", (event) => {
    loadFile(event.target.files[0]);
    event.target.value = "";
  });
}

function wire() {
  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    } else if (event.key === "Escape" && state.busy) {
      interrupt();
    }
  });
  $("interrupt").addEventListener("click", interrupt);
  $("model").addEventListener("change", switchModel);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) $("seed").value = state.lastSeed;
  });
  wireDrops();
}

wire();
loadChoices().finally(() => { document.body.dataset.ready = "true"; });
