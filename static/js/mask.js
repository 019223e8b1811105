// The mask brush of the edit tab: paint over the first reference image the area
// to repaint (everything unpainted comes back unchanged); erase, clear, brush size,
// feather.  Sent with the edit as an OpenAI-style mask: a PNG the size of the image,
// fully transparent where painted, opaque elsewhere.

import { $ } from "./dom.js";

let source = null; // data URL of the image the mask belongs to
let supported = false;
let painting = false;
let last = null; // the previous brush point, in image pixels

const canvas = () => $("#mask-canvas");
const tool = () => document.querySelector("input[name=mask-tool]:checked")?.value ?? "paint";

function show() {
  $("#mask-editor").hidden = !(supported && source);
}

/** The image the mask is drawn over (the first reference; null: none). A new one clears the mask. */
export function setMaskSource(dataUrl) {
  if (dataUrl === source) return;
  source = dataUrl;
  clearMask();
  show();
  if (!dataUrl) return;
  const img = $("#mask-base");
  img.onload = () => {
    const c = canvas();
    [c.width, c.height] = [img.naturalWidth, img.naturalHeight];
    clearMask();
  };
  img.src = dataUrl;
}

/** Whether the selected model takes masks (capabilities.supports_mask). */
export function setMaskSupported(value) {
  supported = Boolean(value);
  show();
}

export function clearMask() {
  const c = canvas();
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  $("#mask-editor").dataset.painted = "false";
}

function painted() {
  const c = canvas();
  if (!c.width || !c.height) return false;
  const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] === 255) return true;
  return false;
}

/** The mask as a PNG data URL (transparent = repaint), or undefined when nothing is painted. */
export function maskDataUrl() {
  if ($("#mask-editor").hidden || !painted()) return undefined;
  const c = canvas();
  const out = document.createElement("canvas");
  [out.width, out.height] = [c.width, c.height];
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-out"; // painted pixels -> fully transparent
  ctx.drawImage(c, 0, 0);
  return out.toDataURL("image/png");
}

export function maskBlur() {
  const v = $("#mask-blur").value.trim();
  return v === "" ? undefined : Number(v);
}

function point(ev) {
  const c = canvas();
  const r = c.getBoundingClientRect();
  return { x: ((ev.clientX - r.left) * c.width) / r.width, y: ((ev.clientY - r.top) * c.height) / r.height };
}

function stroke(to) {
  const c = canvas();
  const ctx = c.getContext("2d");
  const r = c.getBoundingClientRect();
  // the brush size is in screen pixels: the same feel whatever the image's size
  ctx.lineWidth = (Number($("#mask-brush").value) * c.width) / Math.max(1, r.width);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.strokeStyle = ctx.fillStyle = "#ff3b30";
  ctx.globalCompositeOperation = tool() === "erase" ? "destination-out" : "source-over";
  const from = last ?? to;
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + (from === to ? 0.01 : 0), to.y);
  ctx.stroke();
  last = to;
}

export function initMask() {
  const c = canvas();
  c.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    painting = true;
    last = null;
    c.setPointerCapture?.(ev.pointerId);
    stroke(point(ev));
  });
  c.addEventListener("pointermove", (ev) => {
    if (painting) stroke(point(ev));
  });
  const stop = () => {
    if (!painting) return;
    painting = false;
    last = null;
    $("#mask-editor").dataset.painted = String(painted());
  };
  c.addEventListener("pointerup", stop);
  c.addEventListener("pointercancel", stop);
  $("#mask-clear").addEventListener("click", clearMask);
  show();
}
