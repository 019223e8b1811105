// The compose form: mode, model picker (fed by /v1/models), LoRA picker (fed
// by /api/loras, for models with capabilities.supports_lora), size presets,
// seed helpers, submission to /api/generate or /api/edit.

import { api } from "./api.js";
import { $, clearErrors, showError, toast } from "./dom.js";
import { maskBlur, maskDataUrl, setMaskSupported } from "./mask.js";
import { referenceDataUrls, setMaxImages } from "./refs.js";

const RATIOS = [[1, 1], [4, 3], [3, 4], [3, 2], [2, 3], [16, 9], [9, 16]];
const MAX_SEED = 2 ** 32 - 1;
let models = []; // /v1/models data
let onSubmitted = () => {};
let loraRequest = 0; // the latest /api/loras request; older answers are dropped

const form = () => $("#job-form");
export const mode = () => form().elements.mode.value;
const currentModel = () => models.find((m) => m.id === $("#model").value);
const round16 = (x) => Math.max(16, Math.round(x / 16) * 16);

export function setMode(value) {
  for (const r of form().elements.mode) r.checked = r.value === value;
  applyMode();
}

function applyMode() {
  const editing = mode() === "edit";
  $("#refs-field").hidden = !editing;
  const select = $("#model");
  for (const opt of select.options) {
    const tasks = models.find((m) => m.id === opt.value)?.capabilities.tasks ?? [];
    opt.hidden = opt.disabled = !tasks.includes(editing ? "edit" : "generate");
  }
  if (select.selectedOptions[0]?.disabled) {
    const first = [...select.options].find((o) => !o.disabled);
    if (first) select.value = first.value;
    applyModel();
  }
  $("#submit").disabled = ![...select.options].some((o) => !o.disabled);
}

function capsText(c) {
  const parts = [c.tasks.join(" + ")];
  if (c.tasks.includes("edit")) parts.push(`up to ${c.max_images} reference${c.max_images === 1 ? "" : "s"}`);
  parts.push(`≤ ${(c.max_pixels / 1e6).toFixed(1)} MP`, `≤ ${c.max_output_images} images`);
  if (c.recommended_steps) parts.push(`${c.recommended_steps} steps`);
  if (c.recommended_guidance != null) parts.push(`guidance ${c.recommended_guidance}`);
  if (c.supports_lora) parts.push("LoRA");
  if (c.supports_mask) parts.push("masks");
  return parts.join(" · ");
}

function loraLabel(a) {
  const m = a.metadata;
  if (!m) return a.name;
  const steps = m.complete ? `${m.steps_done} steps` : `stopped at step ${m.steps_done} of ${m.steps}`;
  return `${a.name} (${[steps, m.rank && `rank ${m.rank}`].filter(Boolean).join(", ")})`;
}

/** Fill the LoRA picker with the selected model's adapters; hidden for models without LoRA support. */
export async function loadLoras() {
  const m = currentModel();
  const field = $("#lora-field");
  const seq = ++loraRequest;
  if (!m?.capabilities.supports_lora) {
    field.hidden = true;
    $("#lora").value = "";
    return;
  }
  let data;
  try {
    data = await api(`/api/loras?model=${encodeURIComponent(m.id)}`);
  } catch (err) {
    if (seq === loraRequest) toast(`LoRA adapters: ${err.message}`, "error");
    return;
  }
  if (seq !== loraRequest) return;
  const select = $("#lora");
  const previous = select.value;
  select.replaceChildren(new Option("None", ""), ...data.loras.map((a) => new Option(loraLabel(a), a.name)));
  select.value = data.loras.some((a) => a.name === previous) ? previous : "";
  $("#lora-hint").textContent = data.loras.length
    ? ""
    : "No adapters for this model yet; train one in the LoRA training panel.";
  field.hidden = false;
  applyLora();
}

function applyLora() {
  $("#lora-scale").disabled = !$("#lora").value;
}

function applyModel() {
  const m = currentModel();
  loadLoras();
  setMaskSupported(m?.capabilities.supports_mask);
  if (!m) {
    $("#model-caps").textContent = "No model is loaded: load one in the Models panel.";
    return;
  }
  const c = m.capabilities;
  $("#model-caps").textContent = capsText(c);
  $("#steps").value = c.recommended_steps ?? ($("#steps").value || 4);
  $("#guidance").value = c.recommended_guidance ?? "";
  $("#n").max = c.max_output_images;
  setMaxImages(c.max_images);
  const area = c.default_width * c.default_height;
  const presets = RATIOS.map(([a, b]) => {
    let w = round16(Math.sqrt((area * a) / b));
    let h = round16((w * b) / a);
    while (w * h > c.max_pixels) [w, h] = [w - 16, round16(((w - 16) * b) / a)];
    return { label: `${a}:${b} — ${w}×${h}`, w, h };
  });
  const sel = $("#size-preset");
  sel.replaceChildren(
    ...presets.map((p) => new Option(p.label, `${p.w}x${p.h}`)),
    new Option("Custom", "custom"),
  );
  sel.value = `${c.default_width}x${c.default_height}`;
  if (!sel.value) sel.value = "custom";
  $("#width").value = c.default_width;
  $("#height").value = c.default_height;
}

function syncPreset() {
  const v = `${$("#width").value}x${$("#height").value}`;
  const sel = $("#size-preset");
  sel.value = [...sel.options].some((o) => o.value === v) ? v : "custom";
}

/** Fill the model picker from /v1/models (loaded models only). */
export async function loadModels() {
  const previous = $("#model").value;
  const data = await api("/v1/models");
  models = data.data;
  const select = $("#model");
  select.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.backend})`, m.id)));
  const fallback = models.find((m) => m.default)?.id;
  if (models.some((m) => m.id === previous)) select.value = previous;
  else if (fallback) select.value = fallback;
  applyModel();
  applyMode();
  return models;
}

const num = (id) => {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
};

function requestBody() {
  const body = {
    prompt: $("#prompt").value.trim(),
    model: $("#model").value || undefined,
    negative_prompt: $("#negative-prompt").value.trim() || undefined,
    width: num("#width"),
    height: num("#height"),
    steps: num("#steps"),
    guidance: num("#guidance"),
    seed: $("#seed").value.trim() || undefined,
    n: num("#n") ?? 1,
    format: $("#format").value,
    priority: $("#priority").checked,
  };
  body.metadata = { source: "web", prompt: body.prompt, negative_prompt: body.negative_prompt, steps: body.steps, guidance: body.guidance };
  const lora = $("#lora-field").hidden ? "" : $("#lora").value;
  if (lora) {
    const scale = num("#lora-scale") ?? 1;
    body.loras = [{ name: lora, scale }];
    body.metadata.lora = scale === 1 ? lora : `${lora} × ${scale}`;
  }
  if (mode() === "edit") {
    body.images = referenceDataUrls();
    const mask = maskDataUrl(); // only the painted area of the first image is repainted
    if (mask) [body.mask, body.mask_blur, body.metadata.mask] = [mask, maskBlur(), true];
  }
  return body;
}

async function submit(ev) {
  ev.preventDefault();
  const f = form();
  clearErrors(f);
  const body = requestBody();
  const button = $("#submit");
  button.disabled = true;
  try {
    const res = await api(mode() === "edit" ? "/api/edit" : "/api/generate", { method: "POST", body });
    onSubmitted(
      {
        task_id: res.task_id, status: res.status, pos: res.pos, model: body.model, task: mode(),
        wait_remaining: res.expected_time_seconds, progress: 0, step: 0, total_steps: 0, metadata: body.metadata, images: [],
      },
      body.metadata,
    );
  } catch (err) {
    showError(f, err);
  } finally {
    button.disabled = false;
  }
}

export function initForm(submitted) {
  onSubmitted = submitted;
  const f = form();
  f.addEventListener("submit", submit);
  for (const r of f.elements.mode) r.addEventListener("change", applyMode);
  $("#model").addEventListener("change", applyModel);
  $("#lora").addEventListener("change", applyLora);
  $("#size-preset").addEventListener("change", () => {
    const [w, h] = $("#size-preset").value.split("x");
    if (h) [$("#width").value, $("#height").value] = [w, h];
  });
  $("#width").addEventListener("input", syncPreset);
  $("#height").addEventListener("input", syncPreset);
  $("#seed-random").addEventListener("click", () => {
    $("#seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0] % MAX_SEED);
  });
  $("#seed-clear").addEventListener("click", () => ($("#seed").value = ""));
  // Ctrl/Cmd+Enter in the prompt submits
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) f.requestSubmit();
  });
}

/** Fill the form from /api/png-info fields (an image's saved settings); the model
 * first (choosing one resets steps, guidance and size to its defaults). */
export async function fillFromSettings(s) {
  const select = $("#model");
  if (s.model && select.value !== s.model && [...select.options].some((o) => o.value === s.model && !o.disabled)) {
    select.value = s.model;
    applyModel();
  }
  if (s.prompt != null) $("#prompt").value = s.prompt;
  $("#negative-prompt").value = s.negative_prompt ?? "";
  if (s.width && s.height) {
    [$("#width").value, $("#height").value] = [s.width, s.height];
    syncPreset();
  }
  if (s.steps) $("#steps").value = s.steps;
  if (s.guidance != null) $("#guidance").value = s.guidance;
  if (s.seed != null) $("#seed").value = String(s.seed);
  const lora = s.loras?.[0];
  if (lora) {
    await loadLoras();
    if ([...$("#lora").options].some((o) => o.value === lora.name)) {
      $("#lora").value = lora.name;
      $("#lora-scale").value = lora.scale;
      applyLora();
    }
  }
}

export function reuseSeed(seed) {
  $("#seed").value = String(seed);
  toast(`Seed ${seed} will be used for the next job.`);
}
