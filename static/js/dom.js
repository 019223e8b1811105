// Small DOM helpers shared by the panels: templates, toasts, field errors.

export const $ = (sel, root = document) => root.querySelector(sel);

export function fromTemplate(id) {
  return document.getElementById(id).content.firstElementChild.cloneNode(true);
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const t = document.createElement("p");
  t.className = `toast ${kind}`;
  t.textContent = message;
  box.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}

export function formatSeconds(s) {
  if (!Number.isFinite(s) || s < 0) return "";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 90) return `${m} min ${Math.round(s - m * 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** The field a server error's `param` names ("images[0]" -> "images"). */
function fieldFor(form, param) {
  if (!param) return null;
  const base = String(param).split(/[.[]/)[0];
  for (const f of form.querySelectorAll("[data-param]")) {
    if (f.dataset.param.split(" ").includes(base)) return f;
  }
  return null;
}

export function clearErrors(form) {
  for (const f of form.querySelectorAll(".field.invalid")) {
    f.classList.remove("invalid");
    f.querySelector(".field-error")?.remove();
    for (const c of f.querySelectorAll("[aria-invalid]")) {
      c.removeAttribute("aria-invalid");
      c.removeAttribute("aria-describedby");
    }
  }
  const banner = form.querySelector(".form-error");
  banner.hidden = true;
  banner.textContent = "";
}

let errorSeq = 0;

/** Show an error next to the field it concerns, or above the submit button. */
export function showError(form, err) {
  const field = fieldFor(form, err.param);
  if (!field) {
    const banner = form.querySelector(".form-error");
    banner.textContent = err.message;
    banner.hidden = false;
    return;
  }
  const msg = document.createElement("p");
  msg.className = "field-error";
  msg.id = `field-error-${++errorSeq}`;
  msg.setAttribute("role", "alert");
  msg.textContent = err.message;
  field.classList.add("invalid");
  field.append(msg);
  const control = field.querySelector("input:not([type=file]), textarea, select");
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("aria-describedby", msg.id);
    control.focus();
  }
}

/** Make ``zone`` take dropped files: highlighted while dragged over, ``onFiles(FileList)`` on drop. */
export function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    onFiles(ev.dataTransfer?.files ?? []);
  });
}
