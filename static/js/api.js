// HTTP helpers: JSON requests with the optional API key, errors as ApiError,
// and a per-job status stream (/api/events) with EventSource.

const KEY_STORE = "easel.apiKey";

export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(value) {
  if (value) localStorage.setItem(KEY_STORE, value);
  else localStorage.removeItem(KEY_STORE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** fetch + JSON; throws ApiError with the server's {error: {message, param}}. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "the server cannot be reached; is it running?");
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = data?.error ?? {};
    throw new ApiError(res.status, e.message || `${res.status} ${res.statusText}`, e.param ?? null, e.code ?? null);
  }
  return data;
}

/**
 * An image's URL on this page's origin.  The status's ``url`` carries the link's
 * signature (with API keys on, an <img> or a download link cannot send the key),
 * so its query is kept; its host may be another name for this server, so the
 * path is this page's own.
 */
export function imageUrl(taskId, index, signedUrl = null) {
  if (signedUrl) return `/api/image${new URL(signedUrl, location.href).search}`;
  return `/api/image?task_id=${encodeURIComponent(taskId)}&index=${index}`;
}

/** Fetch a resource with the API key and hand back a Blob. */
export async function fetchBlob(url) {
  const res = await fetch(url, { headers: headers() });
  if (!res.ok) throw new ApiError(res.status, `could not fetch ${url} (${res.status})`);
  return res.blob();
}

/**
 * Follow a job's status pushes.  EventSource cannot send an Authorization
 * header, so with an API key the same stream is read through fetch.
 * Returns a function that closes the stream.
 */
export function subscribe(taskId, onStatus, onEnd, onPreview = null) {
  // with onPreview: previews=true, and each preview event ({task_id, step, image}) goes to it
  const url = `/api/events?task_id=${encodeURIComponent(taskId)}${onPreview ? "&previews=true" : ""}`;
  let done = false;
  const finish = (reason) => {
    if (done) return;
    done = true;
    onEnd(reason);
  };
  if (!apiKey()) {
    const es = new EventSource(url);
    es.addEventListener("status", (ev) => onStatus(JSON.parse(ev.data)));
    if (onPreview) es.addEventListener("preview", (ev) => onPreview(JSON.parse(ev.data)));
    es.addEventListener("end", () => {
      es.close();
      finish("end");
    });
    es.onerror = () => {
      // the server closes the stream after "end"; anything else is a lost connection
      es.close();
      finish("error");
    };
    return () => {
      es.close();
      done = true;
    };
  }
  const ctrl = new AbortController();
  (async () => {
    try {
      const res = await fetch(url, { headers: headers(), signal: ctrl.signal });
      if (!res.ok || !res.body) return finish("error");
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const event = /^event: (.*)$/m.exec(block)?.[1];
          const data = /^data: (.*)$/m.exec(block)?.[1];
          if (event === "status" && data) onStatus(JSON.parse(data));
          if (event === "preview" && data && onPreview) onPreview(JSON.parse(data));
          if (event === "end") return finish("end");
        }
      }
      finish("error");
    } catch {
      finish("error");
    }
  })();
  return () => {
    done = true;
    ctrl.abort();
  };
}
