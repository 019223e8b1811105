// The models panel: every configured model with state and memory
// (/v1/admin/models, /v1/admin/gpu-memory), with load/unload and pause/resume
// buttons (a paused queue: running jobs finish, new ones queue, none starts).

import { api } from "./api.js";
import { $, toast } from "./dom.js";
import { refresh as refreshQueue } from "./queue.js";

let onChange = async () => {};

function cell(text, cls = "") {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (cls) td.className = cls;
  return td;
}

function row(m) {
  const tr = document.createElement("tr");
  const state = document.createElement("span");
  state.className = `chip model-state ${m.state}`;
  state.textContent = m.state;
  const stateCell = cell("");
  stateCell.append(state);
  if (m.load_error) {
    const err = document.createElement("p");
    err.className = "field-error";
    err.textContent = m.load_error;
    stateCell.append(err);
  }
  const action = document.createElement("button");
  action.type = "button";
  action.className = "secondary small";
  const loaded = m.state === "loaded";
  action.textContent = loaded ? "Unload" : "Load";
  action.disabled = m.state === "loading";
  action.setAttribute("aria-label", `${loaded ? "Unload" : "Load"} model ${m.name}`);
  action.addEventListener("click", async () => {
    action.disabled = true;
    action.textContent = loaded ? "Unloading…" : "Loading…";
    try {
      await api(`/v1/admin/models/${encodeURIComponent(m.name)}/${loaded ? "unload" : "load"}`, { method: "POST" });
    } catch (err) {
      toast(`${m.name}: ${err.message}`, "error");
    }
    await refreshModels();
    await onChange();
  });
  const pause = document.createElement("button");
  pause.type = "button";
  pause.className = "secondary small pause";
  pause.textContent = m.paused ? "Resume" : "Pause";
  pause.setAttribute("aria-label", `${m.paused ? "Resume" : "Pause"} the queue of ${m.name}`);
  pause.addEventListener("click", async () => {
    pause.disabled = true;
    try {
      await api(`/v1/admin/models/${encodeURIComponent(m.name)}/${m.paused ? "resume" : "pause"}`, { method: "POST" });
    } catch (err) {
      toast(`${m.name}: ${err.message}`, "error");
    }
    await refreshModels();
    await refreshQueue(); // its waiting jobs now say paused (or have a forecast again)
  });
  const actionCell = cell("");
  actionCell.append(action, " ", pause);
  const queue = `${m.running} running, ${m.queue_depth} queued${m.paused ? " (paused)" : ""}`;
  const vram = m.vram_estimate_mib ? `~${(m.vram_estimate_mib / 1024).toFixed(1)} GiB` : "—";
  tr.append(cell(m.name, "name"), cell(m.backend), stateCell, cell(m.tasks.join(", ")), cell(queue), cell(vram, "num"), actionCell);
  return tr;
}

function deviceLine(d) {
  const head = [d.device, d.name].filter(Boolean).join(" ");
  const parts = [];
  const mib = (v) => (v >= 1024 ? `${(v / 1024).toFixed(1)} GiB` : `${Math.round(v)} MiB`);
  if (d.total_mib) parts.push(`${mib(d.used_mib ?? d.total_mib - (d.free_mib ?? 0))} used of ${mib(d.total_mib)}`);
  if (d.allocated_mib !== undefined) parts.push(`torch allocated ${mib(d.allocated_mib)}`);
  if (d.process_rss_mib !== undefined) parts.push(`process RSS ${mib(d.process_rss_mib)}`);
  if (d.error) parts.push(d.error);
  return parts.length ? `${head}: ${parts.join(" · ")}` : head;
}

export async function refreshModels() {
  const body = $("#models-body");
  let data;
  let mem;
  try {
    [data, mem] = await Promise.all([api("/v1/admin/models"), api("/v1/admin/gpu-memory")]);
  } catch (err) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = err.status === 401 || err.status === 403 ? "The models panel needs an admin key (Settings → API key)." : err.message;
    body.replaceChildren(p);
    return;
  }
  const table = document.createElement("table");
  table.className = "models";
  const head = table.createTHead().insertRow();
  for (const h of ["Model", "Backend", "State", "Tasks", "Queue", "VRAM est.", ""]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = h;
    head.append(th);
  }
  table.createTBody().append(...data.models.map(row));
  const devices = document.createElement("ul");
  devices.className = "devices";
  devices.id = "devices";
  const devicesTitle = document.createElement("p");
  devicesTitle.className = "devices-title";
  devicesTitle.id = "devices-title";
  devicesTitle.textContent = "Memory in use";
  devices.setAttribute("aria-labelledby", "devices-title");
  devices.append(
    ...mem.devices.map((d) => {
      const li = document.createElement("li");
      li.textContent = deviceLine(d);
      return li;
    }),
  );
  const refresh = document.createElement("button");
  refresh.type = "button";
  refresh.className = "link";
  refresh.textContent = "Refresh";
  refresh.addEventListener("click", refreshModels);
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  wrap.append(table);
  body.replaceChildren(wrap, devicesTitle, devices, refresh);
}

export function initModels(changed) {
  onChange = changed;
  $("#models-panel").addEventListener("toggle", (ev) => {
    if (ev.target.open) refreshModels();
  });
}
