// easel web front-end: wires the panels together.  No build step; ES modules.

import { apiKey, setApiKey } from "./js/api.js";
import { $, toast } from "./js/dom.js";
import { initForm, loadLoras, loadModels, reuseSeed, setMode } from "./js/form.js";
import { addResults, initGallery } from "./js/gallery.js";
import { initMask } from "./js/mask.js";
import { initModels } from "./js/models.js";
import { initPngInfo } from "./js/pnginfo.js";
import { initQueue, refresh, track } from "./js/queue.js";
import { addImages, initRefs } from "./js/refs.js";
import { initTrain, updateTrainPanel } from "./js/train.js";

async function reloadModels() {
  try {
    const models = await loadModels();
    updateTrainPanel(models);
    $("#server-state").textContent = models.length
      ? `${models.length} model${models.length === 1 ? "" : "s"} loaded`
      : "No model loaded";
    $("#server-state").dataset.state = models.length ? "ok" : "warn";
  } catch (err) {
    $("#server-state").textContent = err.status === 401 ? "API key needed (Settings)" : `Offline: ${err.message}`;
    $("#server-state").dataset.state = "error";
  }
}

async function start() {
  const key = $("#api-key");
  key.value = apiKey();
  $("#settings-form").addEventListener("submit", (ev) => ev.preventDefault());
  key.addEventListener("change", () => {
    setApiKey(key.value.trim());
    reloadModels();
    refresh();
  });

  initMask();
  initRefs(() => setMode("edit"));
  initQueue((status) => {
    if (status.task !== "train") return addResults(status);
    // a finished run (or a stopped one that kept its checkpoint) is a new adapter
    loadLoras();
    const name = status.extra?.adapter_name ?? "the adapter";
    if (status.status === "done") toast(`LoRA "${name}" is ready for ${status.model}: pick it under LoRA adapter.`);
  });
  initGallery({
    useAsReference: async (blob, name) => {
      await addImages([blob], [name]);
      $("#prompt").focus();
      toast("Added as a reference image (Edit mode).");
    },
    reuseSeed,
  });
  initForm((status, params) => track(status, params));
  initPngInfo();
  initTrain((status, params) => track(status, params));
  initModels(reloadModels);

  await reloadModels();
  const tasks = await refresh();
  // results still held by the server, oldest first so the newest ends on top
  for (const st of [...(tasks?.recent ?? [])].sort((a, b) => a.created_at - b.created_at)) addResults(st);
  document.body.dataset.ready = "1";
}

start().catch((err) => toast(err.message, "error"));
