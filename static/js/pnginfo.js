// "Settings from an image": a PNG / JPEG / WEBP chosen or dropped here is sent to
// /api/png-info, and the parameters it carries (A1111 infotext, as easel writes
// into its results) fill the compose form.

import { api } from "./api.js";
import { $, dropZone, toast } from "./dom.js";
import { fillFromSettings } from "./form.js";

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export async function settingsFrom(file) {
  let info;
  try {
    info = await api("/api/png-info", { method: "POST", body: { image: await dataUrl(file) } });
  } catch (err) {
    toast(`${file.name}: ${err.message}`, "error");
    return;
  }
  if (info.parameters == null) {
    toast(`${file.name} carries no generation settings.`, "error");
    return;
  }
  await fillFromSettings(info);
  toast(`Settings of ${file.name} filled in${info.seed != null ? ` (seed ${info.seed})` : ""}.`);
  $("#prompt").focus();
}

export function initPngInfo() {
  const input = $("#png-info-file");
  input.addEventListener("change", () => {
    const file = input.files[0];
    input.value = "";
    if (file) settingsFrom(file);
  });
  dropZone($("#png-info-drop"), (files) => {
    const file = [...files].find((f) => f.type.startsWith("image/"));
    if (file) settingsFrom(file);
  });
}
