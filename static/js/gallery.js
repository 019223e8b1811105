// The gallery: finished images as they arrive, a lightbox with parameters,
// download, "use as reference" and "reuse seed".

import { fetchBlob, imageUrl } from "./api.js";
import { $, fromTemplate, toast } from "./dom.js";

const EXT = { PNG: "png", JPEG: "jpg", WEBP: "webp" };
const shown = new Set(); // "task_id/index"
let actions = { useAsReference: async () => {}, reuseSeed: () => {} };

function describe(status, img) {
  const p = status.metadata ?? {};
  const rows = [
    ["Prompt", img.prompt],
    ["Negative", p.negative_prompt],
    ["Seed", img.seed],
    ["Size", `${img.width}×${img.height}`],
    ["Model", status.model],
    ["LoRA", p.lora],
    ["Task", status.task],
    ["Steps", img.steps ?? p.steps ?? status.total_steps], // total_steps counts every prompt of a batch
    ["Guidance", p.guidance],
    ["Format", img.format],
    ["Time", status.started_at && status.finished_at ? `${(status.finished_at - status.started_at).toFixed(1)} s` : null],
  ];
  return rows.filter(([, v]) => v !== undefined && v !== null && v !== "");
}

function openLightbox(src, rows) {
  const dlg = $("#lightbox");
  const img = $("#lightbox-img");
  img.src = src;
  img.alt = rows.find(([k]) => k === "Prompt")?.[1] ?? "generated image";
  $("#lightbox-meta").replaceChildren(
    ...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = String(v);
      return [dt, dd];
    }),
  );
  dlg.showModal();
}

function card(status, img) {
  const el = fromTemplate("gallery-item");
  const src = imageUrl(status.task_id, img.index, img.url);
  const rows = describe(status, img);
  el.dataset.taskId = status.task_id;
  el.dataset.seed = String(img.seed);
  const pic = $("img", el);
  pic.src = src;
  pic.alt = img.prompt;
  pic.width = img.width;
  pic.height = img.height;
  $(".thumb", el).setAttribute("aria-label", `Enlarge: ${img.prompt} (seed ${img.seed})`);
  $(".thumb", el).addEventListener("click", () => openLightbox(src, rows));
  $(".card-prompt", el).textContent = img.prompt;
  $(".card-meta", el).textContent = rows
    .filter(([k]) => ["Seed", "Size", "Model", "LoRA", "Steps"].includes(k))
    .map(([k, v]) => (k === "LoRA" ? `LoRA ${v}` : `${k.toLowerCase()} ${v}`))
    .join(" · ");
  const dl = $(".download", el);
  dl.href = src;
  dl.download = `easel-${status.task_id}-${img.index}-seed${img.seed}.${EXT[img.format] ?? "img"}`;
  dl.setAttribute("aria-label", `Download image, seed ${img.seed}`);
  $(".use-ref", el).setAttribute("aria-label", `Use image with seed ${img.seed} as reference`);
  $(".use-ref", el).addEventListener("click", async () => {
    try {
      const blob = await fetchBlob(src);
      await actions.useAsReference(blob, `${status.task_id}-${img.index}`);
    } catch (err) {
      toast(err.message, "error");
    }
  });
  $(".reuse-seed", el).setAttribute("aria-label", `Reuse seed ${img.seed}`);
  $(".reuse-seed", el).addEventListener("click", () => actions.reuseSeed(img.seed));
  return el;
}

/** Add a finished job's images (newest first); already shown ones are skipped. */
export function addResults(status) {
  if (status.status !== "done") return;
  const fresh = status.images.filter((img) => img.bytes > 0 && !shown.has(`${status.task_id}/${img.index}`));
  if (!fresh.length) return;
  fresh.forEach((img) => shown.add(`${status.task_id}/${img.index}`));
  $("#gallery").prepend(...fresh.map((img) => card(status, img)));
  $("#gallery-empty").hidden = true;
}

export function initGallery(callbacks) {
  actions = callbacks;
  const dlg = $("#lightbox");
  dlg.addEventListener("click", (ev) => {
    if (ev.target === dlg) dlg.close(); // a click on the backdrop
  });
}
