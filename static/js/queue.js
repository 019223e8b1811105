// The queue panel: one row per job with position, progress and a locally
// interpolated ETA.  Status changes are pushed by /api/events; at most
// MAX_STREAMS streams are open at once (browsers allow ~6 connections per
// host), given to running jobs first, then to the head of the queue.  When a
// job starts or ends, one /api/tasks request refreshes everyone's position.
// Finished jobs leave after a few seconds, except failures and training runs
// (their outcome is not in the gallery): those stay until dismissed.  A job that
// leaves goes to the Finished list below (the server's recent jobs too, at load).
// Other keys' queued jobs are listed too (/api/tasks?scope=shared): for a key that
// is not an admin's they come private (no prompt), are not streamed and cannot be
// cancelled; while any is listed the panel refreshes every few seconds.
// A queued job's arrows move it to the front or the back of its owner's queued jobs.

import { api, subscribe } from "./api.js";
import { $, fromTemplate, formatSeconds, toast } from "./dom.js";

const MAX_STREAMS = 4;
const FINISHED_MAX = 20;
const FINISHED_LINGER_MS = 3000;
const SHARED_REFRESH_MS = 3000;
const PHASE_TEXT = { caching: "encoding the dataset", training: "training" };
const STATUS_TEXT = { waiting: "queued", running: "running", done: "done", error: "failed", cancelled: "cancelled" };

const jobs = new Map(); // task_id -> {status, receivedAt, el, close, params}
let onFinished = () => {};
let refreshTimer = null;
let sharedTimer = null;

const finished = (s) => s === "done" || s === "error" || s === "cancelled";

function title(job) {
  if (job.status.private) {
    const st = job.status;
    const size = st.width && st.height ? ` · ${st.width}×${st.height}` : "";
    const n = st.task_length > 1 ? ` · ${st.task_length} images` : "";
    return `Another user's ${st.task === "generate" ? "job" : st.task} on ${st.model}${size}${n}`;
  }
  const p = job.params ?? job.status.metadata ?? {};
  const what = p.prompt || job.status.prompt || p.adapter_name || job.status.extra?.adapter_name || job.status.images?.[0]?.prompt || job.status.task_id;
  return `${job.status.task === "generate" ? "" : `${job.status.task}: `}${what}`;
}

function etaSeconds(job) {
  return Math.max(0, job.status.wait_remaining - (performance.now() - job.receivedAt) / 1000);
}

function render(job) {
  const { el, status: st } = job;
  el.dataset.status = st.status;
  el.classList.toggle("private", Boolean(st.private));
  el.classList.toggle("paused", Boolean(st.paused));
  const chip = $(".status", el);
  chip.textContent = STATUS_TEXT[st.status] ?? st.status;
  chip.className = `chip status ${st.status}`;
  $(".job-title", el).textContent = title(job);
  const pct = st.status === "done" ? 100 : Math.round((st.progress ?? 0) * 100);
  const bar = $(".bar", el);
  bar.setAttribute("aria-valuenow", String(pct));
  bar.setAttribute("aria-label", `Progress of ${title(job)}`);
  bar.setAttribute("aria-valuetext", st.total_steps ? `step ${st.step} of ${st.total_steps}` : `${pct}%`);
  $(".bar span", el).style.width = `${pct}%`;
  const training = st.task === "train";
  const parts = [];
  if (st.status === "waiting") {
    parts.push(st.pos === 0 ? "next" : `${st.pos} job${st.pos === 1 ? "" : "s"} ahead`);
    if (st.message) parts.push(st.message); // e.g. no worker serves the model right now
  }
  else if (st.status === "running") {
    if (!st.total_steps) parts.push(training ? PHASE_TEXT[st.extra?.phase] ?? "preparing" : "starting");
    else parts.push(`step ${st.step}/${st.total_steps}`);
  } else if (st.message) parts.push(st.message);
  else if (st.status === "error") parts.push("failed");
  else if (st.status === "done" && training) parts.push(`${st.total_steps} steps; adapter saved`);
  if (st.extra?.loss !== undefined) parts.push(`loss ${Number(st.extra.loss).toFixed(4)}`);
  $(".pos", el).textContent = parts.join(" · ");
  if (st.status !== "running") $(".job-preview", el).hidden = true; // the result is in the gallery
  for (const move of el.querySelectorAll(".move")) {
    move.hidden = st.status !== "waiting" || Boolean(st.private); // only an owner or an admin moves a job
    move.setAttribute("aria-label", `Move job ${title(job)} to the ${move.dataset.to}`);
  }
  const cancel = $(".cancel", el);
  cancel.hidden = Boolean(st.private); // another key's job: not ours to cancel
  const verb = finished(st.status) ? "Dismiss" : training ? "Stop" : "Cancel";
  cancel.setAttribute("aria-label", `${verb} ${training ? "training" : "job"} ${title(job)}`);
  cancel.title = finished(st.status) ? "Dismiss" : training ? "Stop (keeps a checkpoint)" : "Cancel";
  tickOne(job);
}

function tickOne(job) {
  const eta = $(".eta", job.el);
  if (finished(job.status.status)) {
    eta.textContent = "";
    delete eta.dataset.seconds;
    return;
  }
  if (typeof job.status.wait_remaining !== "number") { // paused, or no live worker: no honest forecast
    eta.textContent = job.status.paused ? "paused" : "ETA unknown";
    delete eta.dataset.seconds;
    return;
  }
  const s = etaSeconds(job);
  eta.dataset.seconds = s.toFixed(2);
  eta.textContent = `ETA ${formatSeconds(s)}`;
}

function update(st) {
  const job = jobs.get(st.task_id);
  if (!job) return;
  const before = job.status.status;
  // done, error and cancelled are final: an answer saying otherwise was sent before
  // the one we have (a /api/tasks refresh or a stream event overtaken by the cancel)
  if (finished(before) && !finished(st.status)) return;
  job.status = st;
  job.receivedAt = performance.now();
  render(job);
  if (before !== st.status) {
    if (finished(st.status)) settle(job);
    scheduleRefresh();
  }
}

function settle(job) {
  job.close?.();
  job.close = null;
  onFinished(job.status, job.params);
  if (job.status.status === "error") toast(`Job failed: ${job.status.message ?? "unknown error"}`, "error");
  if (job.status.status !== "error" && job.status.task !== "train") setTimeout(() => remove(job.status.task_id), FINISHED_LINGER_MS);
  pump();
}

function remove(taskId) {
  const job = jobs.get(taskId);
  if (!job) return;
  job.close?.();
  job.el.remove();
  jobs.delete(taskId);
  if (finished(job.status.status) && !job.status.private) addFinished(job.status, job.params);
  updateEmpty();
}

/** A finished job's line in the Finished list (newest first, the last FINISHED_MAX). */
function addFinished(status, params = null) {
  const list = $("#finished");
  if (list.querySelector(`li[data-task-id="${CSS.escape(status.task_id)}"]`)) return;
  const li = document.createElement("li");
  li.dataset.taskId = status.task_id;
  li.dataset.status = status.status;
  const chip = document.createElement("span");
  chip.className = `chip status ${status.status}`;
  chip.textContent = STATUS_TEXT[status.status] ?? status.status;
  const text = document.createElement("span");
  const took = status.started_at && status.finished_at ? ` · ${formatSeconds(status.finished_at - status.started_at)}` : "";
  text.textContent = `${title({ status, params })}${took}`;
  li.append(chip, text);
  const older = [...list.children].find((el) => +el.dataset.finishedAt < (status.finished_at ?? 0));
  li.dataset.finishedAt = String(status.finished_at ?? 0);
  list.insertBefore(li, older ?? null);
  while (list.children.length > FINISHED_MAX) list.lastElementChild.remove();
  list.hidden = $("#finished-title").hidden = false;
  updateEmpty();
}

function updateEmpty() {
  const empty = $("#queue-empty");
  empty.hidden = jobs.size > 0;
  empty.textContent = $("#finished").children.length ? "Nothing queued or running." : "No jobs yet.";
}

/** Open streams for the most urgent unwatched jobs. */
function pump() {
  const live = [...jobs.values()].filter((j) => !finished(j.status.status) && !j.status.private);
  let open = live.filter((j) => j.close).length;
  const rank = (j) => (j.status.status === "running" ? -1 : j.status.pos);
  for (const job of live.filter((j) => !j.close).sort((a, b) => rank(a) - rank(b))) {
    if (open >= MAX_STREAMS) break;
    open += 1;
    const id = job.status.task_id;
    job.close = subscribe(id, update, (reason) => {
      job.close = null;
      if (reason !== "end" && jobs.has(id)) scheduleRefresh();
      pump();
    }, showPreview);
  }
}

/** A live preview of a running job (a small JPEG data: URL) in its card. */
function showPreview(ev) {
  const job = jobs.get(ev.task_id);
  if (!job || job.status.status !== "running") return;
  const img = $(".job-preview", job.el);
  img.src = ev.image;
  img.alt = `Preview of ${title(job)} at step ${ev.step}`;
  img.dataset.step = String(ev.step);
  img.hidden = false;
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 50);
}

/** One /api/tasks request: positions and forecasts of every job, new jobs from other clients. */
export async function refresh() {
  let data;
  try {
    data = await api("/api/tasks?limit=200&scope=shared");
  } catch (err) {
    toast(`Queue: ${err.message}`, "error");
    return;
  }
  const seen = new Set();
  for (const st of data.queue) {
    seen.add(st.task_id);
    if (jobs.has(st.task_id)) update(st);
    else track(st);
  }
  for (const st of data.recent) {
    if (jobs.has(st.task_id) && !seen.has(st.task_id)) update(st);
    else if (!jobs.has(st.task_id) && st.task !== "train") addFinished(st);
  }
  // another key's job that left the queue has ended (we follow no stream of it)
  for (const job of [...jobs.values()]) if (job.status.private && !seen.has(job.status.task_id)) remove(job.status.task_id);
  clearTimeout(sharedTimer);
  if ([...jobs.values()].some((j) => j.status.private)) sharedTimer = setTimeout(refresh, SHARED_REFRESH_MS);
  pump();
  return data;
}

/** Follow a job (a fresh submission or one found on the server). */
export function track(status, params = null) {
  if (jobs.has(status.task_id)) return;
  const el = fromTemplate("queue-item");
  el.dataset.taskId = status.task_id;
  const job = { status, receivedAt: performance.now(), el, close: null, params };
  jobs.set(status.task_id, job);
  $(".cancel", el).addEventListener("click", () => cancel(job));
  for (const move of el.querySelectorAll(".move")) move.addEventListener("click", () => moveJob(job, move.dataset.to));
  $("#queue").append(el);
  updateEmpty();
  render(job);
  pump();
}

/** A waiting job to the front or the back of the caller's own queued jobs (an admin's front: first of its priority). */
async function moveJob(job, to) {
  try {
    update(await api(`/api/tasks/${encodeURIComponent(job.status.task_id)}/move`, { method: "POST", body: { to } }));
    scheduleRefresh(); // everyone's position moved
  } catch (err) {
    toast(`Move: ${err.message}`, "error");
  }
}

async function cancel(job) {
  const id = job.status.task_id;
  if (finished(job.status.status)) return remove(id);
  try {
    const res = await api(`/api/tasks/${encodeURIComponent(id)}?wait=0`, { method: "DELETE" });
    if (finished(res.status)) update({ ...job.status, status: res.status, wait_remaining: 0 });
  } catch (err) {
    toast(`Cancel: ${err.message}`, "error");
  }
}

export function initQueue(finishedCallback) {
  onFinished = finishedCallback;
  $("#clear-queue").addEventListener("click", async () => {
    try {
      const res = await api("/api/clear", { method: "POST" });
      toast(`Cancelled ${res.cancelled} queued job(s).`);
      await refresh();
    } catch (err) {
      toast(`Clear: ${err.message}`, "error");
    }
  });
  // local countdown between pushes (no server traffic)
  setInterval(() => jobs.forEach(tickOne), 250);
}
