// Reference images for edits: file picker, drag-and-drop, paste; thumbnails
// with remove buttons; kept as data URLs ready for /api/edit.

import { $, dropZone, toast } from "./dom.js";
import { setMaskSource } from "./mask.js";

const refs = []; // {name, dataUrl}
let maxImages = 1;
let onAdd = () => {};

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

function render() {
  const list = $("#thumbs");
  list.replaceChildren(
    ...refs.map((ref, i) => {
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.src = ref.dataUrl;
      img.alt = `Reference ${i + 1}: ${ref.name}`;
      const rm = document.createElement("button");
      rm.type = "button";
      rm.className = "icon remove";
      rm.textContent = "✕";
      rm.setAttribute("aria-label", `Remove reference ${i + 1} (${ref.name})`);
      rm.addEventListener("click", () => {
        refs.splice(i, 1);
        render();
      });
      li.append(img, rm);
      return li;
    }),
  );
  $("#refs-count").textContent = `${refs.length} / ${maxImages}`;
  setMaskSource(refs[0]?.dataUrl ?? null); // the mask brush paints over the first one
}

/** Add image blobs (File, Blob) up to the model's max_images. */
export async function addImages(blobs, names = []) {
  const images = [...blobs].filter((b) => b.type.startsWith("image/"));
  if (!images.length) return;
  onAdd();
  const room = maxImages - refs.length;
  if (images.length > room) toast(`This model takes at most ${maxImages} reference image(s); extra ones were left out.`, "error");
  for (const [i, blob] of images.slice(0, Math.max(0, room)).entries()) {
    refs.push({ name: blob.name || names[i] || `image ${refs.length + 1}`, dataUrl: await readAsDataUrl(blob) });
  }
  render();
}

export function referenceDataUrls() {
  return refs.map((r) => r.dataUrl);
}

export function setMaxImages(n) {
  maxImages = Math.max(1, n || 1);
  if (refs.length > maxImages) refs.length = maxImages;
  render();
}

export function clearRefs() {
  refs.length = 0;
  render();
}

/** Wire the picker, the drop zone and paste; `beforeAdd` switches to edit mode. */
export function initRefs(beforeAdd) {
  onAdd = beforeAdd;
  const input = $("#ref-files");
  input.addEventListener("change", async () => {
    await addImages(input.files);
    input.value = "";
  });
  dropZone($("#dropzone"), (files) => addImages(files));
  document.addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData?.items ?? [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.some((f) => f?.type.startsWith("image/"))) {
      ev.preventDefault();
      addImages(files);
    }
  });
  render();
}
