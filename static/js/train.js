// The LoRA training panel: shown only when a loaded model lists "train" in
// its tasks and the server has POST /api/train.  A train job is followed in
// the queue like any other job (status.extra.loss is shown there).

import { api } from "./api.js";
import { $, clearErrors, showError } from "./dom.js";

let onSubmitted = () => {};

/** Show the panel for the models that can train; hide it when none can. */
export function updateTrainPanel(models) {
  const panel = $("#train-panel");
  const trainable = models.filter((m) => m.capabilities.tasks.includes("train"));
  if (panel.dataset.unavailable || !trainable.length) {
    panel.hidden = true;
    return;
  }
  const select = $("#train-model");
  const previous = select.value;
  select.replaceChildren(...trainable.map((m) => new Option(m.id, m.id)));
  if (trainable.some((m) => m.id === previous)) select.value = previous;
  panel.hidden = false;
}

async function submit(ev) {
  ev.preventDefault();
  const f = ev.target;
  clearErrors(f);
  const values = Object.fromEntries(new FormData(f));
  const body = { model: values.model, dataset_dir: values.dataset_dir.trim(), adapter_name: values.adapter_name.trim() };
  for (const k of ["steps", "rank", "batch_size", "resolution"]) body[k] = parseInt(values[k], 10);
  body.learning_rate = Number(values.learning_rate);
  const button = f.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const res = await api("/api/train", { method: "POST", body });
    onSubmitted(
      { task_id: res.task_id, status: res.status ?? "waiting", pos: res.pos ?? 0, model: body.model, task: "train",
        wait_remaining: res.expected_time_seconds ?? 0, progress: 0, step: 0, total_steps: body.steps, images: [] },
      { adapter_name: body.adapter_name },
    );
    // the run is followed in the queue, usually scrolled away above this panel
    $(`#queue li[data-task-id="${CSS.escape(res.task_id)}"]`)?.scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (err) {
    if (err.status === 404 || err.status === 405) {
      // this server has no training endpoint: hide the panel for good
      $("#train-panel").dataset.unavailable = "1";
      $("#train-panel").hidden = true;
    }
    showError(f, err);
  } finally {
    button.disabled = false;
  }
}

export function initTrain(submitted) {
  onSubmitted = submitted;
  $("#train-form").addEventListener("submit", submit);
}
