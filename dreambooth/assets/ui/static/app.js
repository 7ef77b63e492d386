// The live parts of `dreambooth serve`'s pages: no framework, nothing fetched from elsewhere.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf"]').content;
const $ = (selector, root = document) => root.querySelector(selector);

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Dreambooth-Csrf": csrf() },
    body: JSON.stringify(body || {}),
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
  return { ok: response.ok, status: response.status, data };
}

function showErrors(root, errors) {
  root.querySelectorAll("[data-error-for]").forEach((el) => { el.textContent = ""; });
  for (const [name, message] of Object.entries(errors || {})) {
    const el = root.querySelector(`[data-error-for="${name}"]`) || root.querySelector('[data-error-for="form"]');
    if (el) el.textContent = message;
  }
}

function seconds(value) {
  if (value === null || value === undefined || value === "" || Number.isNaN(Number(value))) return "";
  let s = Math.round(Number(value));
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function formValues(form) {
  const values = {};
  for (const el of form.elements) {
    if (el.name && !el.disabled && el.type !== "submit" && el.type !== "button") values[el.name] = String(el.value);
  }
  return values;
}

// ---------------------------------------------------------------- the runs list
function runsPage() {
  const body = $("#runs tbody");
  const render = (runs) => {
    body.replaceChildren();
    if (!runs.length) {
      body.innerHTML = '<tr class="empty"><td colspan="8">No runs under the output folder yet.</td></tr>';
      return;
    }
    for (const r of runs) {
      const row = document.createElement("tr");
      row.dataset.run = r.name;
      const cells = [null, null, r.family || "", r.adapter || "", r.total ? `${r.step} / ${r.total}` : `${r.step}`,
        r.loss === null ? "" : Number(r.loss).toFixed(4), seconds(r.elapsed), r.status === "running" ? seconds(r.eta) : ""];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        if (i === 0) {
          const a = document.createElement("a");
          a.href = `/run?run=${encodeURIComponent(r.name)}`; a.textContent = r.name; td.append(a);
        } else if (i === 1) {
          const span = document.createElement("span");
          span.className = `status ${r.status}`; span.textContent = r.status; td.append(span);
        } else td.textContent = text;
        row.append(td);
      });
      body.append(row);
    }
  };
  const refresh = async () => {
    const response = await fetch("/api/runs");
    if (response.ok) render((await response.json()).runs);
  };
  document.querySelectorAll("[data-seconds]").forEach((td) => { td.textContent = seconds(td.dataset.seconds); });
  setInterval(refresh, 3000);
  const form = $("#demo-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = await post("/api/demo/start", formValues(form));
    if (result.ok) location.href = `/run?run=${encodeURIComponent(result.data.run)}`;
    else showErrors(form, result.data.errors || { run_name: result.data.error });
  });
}

// ---------------------------------------------------------------- one run, live
function runPage() {
  const name = $("#run").dataset.run;
  const query = `run=${encodeURIComponent(name)}`;
  const losses = { step: [], loss: [], class_loss: [], lr: [] };
  let total = null;

  const plot = () => {
    const svg = $("#plot");
    const W = 640, H = 240, L = 48, R = 48, T = 10, B = 24;
    const n = losses.step.length;
    svg.replaceChildren();
    if (!n) return;
    const xMax = Math.max(total || 0, losses.step[n - 1], 1);
    const finite = (a) => a.filter((v) => v !== null && Number.isFinite(v));
    const yMax = Math.max(...finite(losses.loss), ...finite(losses.class_loss), 1e-9);
    const lrMax = Math.max(...finite(losses.lr), 1e-12);
    const x = (s) => L + (W - L - R) * (s / xMax);
    const line = (values, top, cls) => {
      const points = [];
      values.forEach((v, i) => { if (v !== null && Number.isFinite(v)) points.push(`${x(losses.step[i]).toFixed(1)},${(H - B - (H - T - B) * v / top).toFixed(1)}`); });
      if (!points.length) return;
      const el = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      el.setAttribute("points", points.join(" ")); el.setAttribute("class", cls); svg.append(el);
    };
    const text = (tx, ty, content, anchor) => {
      const el = document.createElementNS("http://www.w3.org/2000/svg", "text");
      el.setAttribute("x", tx); el.setAttribute("y", ty); el.setAttribute("text-anchor", anchor || "start");
      el.textContent = content; svg.append(el);
    };
    line(losses.lr, lrMax, "lr");
    line(losses.class_loss, yMax, "class");
    line(losses.loss, yMax, "loss");
    text(4, T + 10, yMax.toPrecision(3)); text(4, H - B, "0");
    text(W - 2, T + 10, lrMax.toExponential(1), "end");
    text(L, H - 6, "step 0"); text(W - R, H - 6, `step ${xMax}`, "end");
  };

  const setSummary = (s) => {
    const status = $("#status");
    status.textContent = s.status; status.className = `status ${s.status}`;
    if (s.status === "stopped" && s.checkpoint) status.textContent = `stopped, checkpoint ${s.checkpoint}`;
    total = s.total || total;
    $("#progress").max = s.total || 1; $("#progress").value = s.step || 0;
    $("#step").textContent = `step ${s.step}${s.total ? ` of ${s.total}` : ""}`;
    $("#eta").textContent = s.status === "running" ? (s.eta !== null ? `about ${seconds(s.eta)} left` : "")
      : (s.elapsed ? `took ${seconds(s.elapsed)}` : "");
    $("#facts").textContent = [s.family, s.adapter, s.doing, s.message].filter(Boolean).join(" · ");
    $("#stop").disabled = s.status !== "running";
    $("#resume").disabled = s.status === "running" || s.status === "done";
  };

  const render = (detail) => {
    Object.assign(losses, detail.losses);
    setSummary(detail.summary);
    plot();
    const samples = $("#samples");
    samples.replaceChildren(...detail.samples.map((s) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `/files/output/${s.path}`; img.alt = s.name; img.loading = "lazy";
      const caption = document.createElement("figcaption");
      caption.textContent = `${s.step === null ? "" : `step ${s.step} · `}${s.name}`;
      figure.append(img, caption);
      return figure;
    }));
    const exports = $("#exports tbody");
    exports.replaceChildren(...detail.exports.map((e) => {
      const row = document.createElement("tr");
      const link = document.createElement("a");
      link.href = `/files/output/${e.path}?download=1`; link.textContent = e.name;
      const cells = [link, `${(e.size / 2 ** 20).toFixed(1)} MiB`, e.sha256];
      for (const c of cells) { const td = document.createElement("td"); td.append(c); row.append(td); }
      return row;
    }));
    const report = $("#report");
    report.hidden = !detail.report;
    if (detail.report) report.href = `/files/output/${detail.report}`;
    $("#memory").textContent = detail.memory ? `GPU memory peak ${detail.memory.peak_gib} GiB` : "";
    const log = $("#log");
    log.textContent = detail.log.join("\n");
    log.scrollTop = log.scrollHeight;
  };

  let refreshing = null;
  const refresh = () => {
    clearTimeout(refreshing);
    refreshing = setTimeout(async () => {
      const response = await fetch(`/api/run?${query}`);
      if (response.ok) render(await response.json());
    }, 200);
  };

  const listen = (offset) => {  // a byte offset in the run's events.jsonl
    const source = new EventSource(`/api/run/events?${query}&from=${offset}`);
    source.addEventListener("line", (message) => {
      const event = JSON.parse(message.data);
      if (event.event === "train_step") {
        losses.step.push(event.step); losses.loss.push(event.loss ?? null);
        losses.class_loss.push(event.class_loss ?? null); losses.lr.push(event.lr ?? null);
        $("#progress").value = event.step;
        $("#step").textContent = `step ${event.step}${total ? ` of ${total}` : ""}`;
        plot();
      } else if (event.event === "train_start") {
        total = event.max_train_steps || total;
      }
      if (["checkpoint_saved", "run_finished", "stage_end", "error", "train_start"].includes(event.event)) refresh();
    });
    source.addEventListener("summary", (message) => setSummary(JSON.parse(message.data)));
  };

  const act = async (what) => {
    const result = await post(`/api/run/${what}?${query}`);
    $("#action-error").textContent = result.ok ? "" : (result.data.error || "refused");
    refresh();
  };
  $("#stop").addEventListener("click", () => act("stop"));
  $("#resume").addEventListener("click", () => act("resume"));

  fetch(`/api/run?${query}`).then(async (response) => {
    const detail = await response.json();
    render(detail);
    listen(detail.offset);
  });
}

// ---------------------------------------------------------------- a new run
function newPage() {
  const form = $("#new-run");
  const fill = async (select, volume, keep) => {
    const response = await fetch(`/api/browse/${volume}`);
    if (!response.ok) return;
    select.replaceChildren(select.options[0]);
    for (const entry of (await response.json()).entries) {
      if (!keep(entry)) continue;
      const option = document.createElement("option");
      option.value = entry.path;
      option.textContent = entry.folder ? `${entry.name}/` : `${entry.name} (${(entry.size / 2 ** 30).toFixed(2)} GiB)`;
      select.append(option);
    }
  };
  fill($("#model"), "models", (e) => e.folder || /\.(safetensors|ckpt|pt|bin)$/i.test(e.name));
  fill($("#photos"), "data", (e) => e.folder);

  $("#model").addEventListener("change", async (event) => {
    const info = $("#model-info");
    info.textContent = "";
    if (!event.target.value) return;
    info.textContent = "reading…";
    const response = await fetch(`/api/model-info?path=${encodeURIComponent(event.target.value)}`);
    const data = await response.json();
    if (!response.ok) { info.textContent = data.error; return; }
    info.textContent = ["family", "prediction_type", "size", "parameters", "format"]
      .filter((k) => data[k] !== undefined && data[k] !== null).map((k) => `${k}: ${data[k]}`).join(" · ");
  });

  $("#photos").addEventListener("change", async (event) => {
    const thumbs = $("#thumbs");
    thumbs.replaceChildren();
    if (!event.target.value) return;
    const resolution = form.querySelector('[name="resolution"]').value || "512";
    const response = await fetch(`/api/browse/data?path=${encodeURIComponent(event.target.value)}&resolution=${encodeURIComponent(resolution)}`);
    if (!response.ok) return;
    for (const entry of (await response.json()).entries) {
      if (entry.folder || entry.caption === undefined) continue;
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `/files/data/${entry.path}`; img.alt = entry.name; img.loading = "lazy";
      const input = document.createElement("input");
      input.value = entry.caption || ""; input.placeholder = "caption (photo.txt)"; input.dataset.path = entry.path;
      input.setAttribute("aria-label", `caption of ${entry.name}`);
      input.addEventListener("change", async () => {
        const result = await post("/api/caption", { path: entry.path, caption: input.value });
        input.title = result.ok ? "saved" : result.data.error; input.classList.toggle("bad", !result.ok);
      });
      const caption = document.createElement("figcaption");
      caption.textContent = entry.bucket ? `${entry.name} · bucket ${entry.bucket}` : entry.name;
      figure.append(img, caption, input);
      thumbs.append(figure);
    }
  });

  // photos from this computer into a folder of /data, one request each; the folder is then shown as picked
  $("#upload").addEventListener("click", async () => {
    const folder = $("#upload-folder").value.trim().replace(/^\/+|\/+$/g, "") || $("#photos").value;
    const files = [...$("#upload-files").files];
    const status = $("#upload-status");
    if (!folder || !files.length) { status.textContent = "choose photos, and a folder to put them in"; return; }
    let uploaded = 0;
    const failed = [];
    for (const [i, file] of files.entries()) {
      status.textContent = `uploading ${i + 1} of ${files.length}…`;
      const response = await fetch(`/api/photos?folder=${encodeURIComponent(folder)}&name=${encodeURIComponent(file.name)}`, {
        method: "POST", headers: { "Content-Type": "application/octet-stream", "X-Dreambooth-Csrf": csrf() }, body: file,
      });
      if (response.ok) { uploaded += 1; continue; }
      let data = {};
      try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
      failed.push(data.error || `${file.name}: ${response.status}`);
    }
    status.textContent = [`${uploaded} of ${files.length} uploaded to ${folder}`, ...failed].join(" · ");
    status.classList.toggle("error", failed.length > 0);
    $("#upload-files").value = "";
    const photos = $("#photos");
    await fill(photos, "data", (e) => e.folder);
    if (![...photos.options].some((o) => o.value === folder)) photos.append(new Option(`${folder}/`, folder));
    photos.value = folder;
    photos.dispatchEvent(new Event("change"));
  });

  const settings = () => {
    const values = formValues(form);
    delete values[""];
    for (const input of form.querySelectorAll("#thumbs input")) delete values[input.name];
    return values;
  };
  $("#preview").addEventListener("click", async () => {
    const result = await post("/api/new/preview", settings());
    showErrors(form, result.data.errors);
    const toml = $("#toml"), download = $("#download");
    toml.hidden = !result.ok; download.hidden = !result.ok;
    if (result.ok) {
      toml.textContent = result.data.toml;
      download.href = URL.createObjectURL(new Blob([result.data.toml], { type: "application/toml" }));
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = await post("/api/new/start", settings());
    if (result.ok) location.href = `/run?run=${encodeURIComponent(result.data.run)}`;
    else showErrors(form, result.data.errors || { form: result.data.error });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "runs") runsPage();
  else if (page === "run") runPage();
  else if (page === "new") newPage();
});
