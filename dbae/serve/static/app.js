// DBAE studio: the page's side of the websocket protocol (see dbae/serve/protocol.py).
// Plain JavaScript, no dependencies, nothing loaded from anywhere but this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const enc = new TextEncoder();
  const dec = new TextDecoder();

  const state = {
    ws: null,
    hello: null,
    seq: 0,
    sent: new Map(),        // seq of an edit -> performance.now() when it was sent
    shownEdit: -1,          // newest edit seq on screen
    frameTimes: [],         // arrival times of edit frames (frames/s over the last second)
    hasA: false,
    hasB: false,
    pickTarget: "a",
    source: { a: null, b: null },  // what A and B came from (re-sent after a reconnect)
    urls: {},               // element id -> blob URL on screen
    retry: 0,
  };

  // ----- envelopes: 4-byte big-endian header length, JSON header, payload -----
  function envelope(header, payload) {
    const h = enc.encode(JSON.stringify(header));
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, h.length);
    return new Blob([len, h, payload]);
  }
  function unpack(buf) {
    const n = new DataView(buf).getUint32(0);
    const header = JSON.parse(dec.decode(new Uint8Array(buf, 4, n)));
    return [header, new Uint8Array(buf, 4 + n)];
  }

  // ----- messages -----
  function send(msg) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(JSON.stringify(msg));
    return true;
  }
  function nextSeq() { return ++state.seq; }
  function decodeSetting() { return { steps: Number($("steps").value), sampler: $("sampler").value }; }
  function scales() { return [...document.querySelectorAll(".attr-slider")].map((s) => Number(s.value)); }

  function sendEdit() {
    if (!state.hasA) return;
    const seq = nextSeq();
    const alpha = state.hasB ? Number($("alpha").value) : 0;
    if (send({ type: "edit", seq, scales: scales(), alpha, ...decodeSetting() })) {
      state.sent.set(seq, performance.now());
      $("img-edit").dataset.sent = String(seq);  // the newest edit asked for (data-seq: the one shown)
    }
  }
  function sendRecon() { if (state.hasA) send({ type: "recon", seq: nextSeq(), ...decodeSetting() }); }
  function sendStrip() { if (state.hasA && state.hasB) send({ type: "strip", seq: nextSeq(), count: 8, ...decodeSetting() }); }

  function upload(file, slot) {
    if (!file) return;
    const h = state.hello;
    if (h && file.size > h.max_upload_bytes) {
      toast(`${file.name}: ${(file.size / 1e6).toFixed(1)} MB is over the server's limit of ${(h.max_upload_bytes / 1e6).toFixed(1)} MB`);
      return;
    }
    state.source[slot] = { file };
    markThumb(slot, -1);
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    const header = { type: "upload", seq: nextSeq(), slot, align: h && h.face ? $("align").checked : false, ...decodeSetting() };
    state.ws.send(envelope(header, file));
  }
  function pick(index, slot) {
    state.source[slot] = { index };
    markThumb(slot, index);
    send({ type: "pick", seq: nextSeq(), slot, index, ...decodeSetting() });
  }
  function resend() {  // after a reconnect the server knows nothing of this page's images
    for (const slot of ["a", "b"]) {
      const s = state.source[slot];
      if (s && s.file) upload(s.file, slot);
      else if (s) pick(s.index, slot);
    }
  }

  // ----- frames -----
  function show(id, payload) {
    const img = $(id);
    const url = URL.createObjectURL(new Blob([payload], { type: "image/png" }));
    const old = state.urls[id];
    img.onload = () => { if (old) URL.revokeObjectURL(old); };
    img.src = url;
    state.urls[id] = url;
    return url;
  }
  function onFrame(header, payload) {
    const t = header.timings || {};
    if (header.kind === "input") {
      show(header.slot === "a" ? "img-input" : "img-b", payload);
      if (header.note) toast(header.note, "info");
      if (header.slot === "a") {
        state.hasA = true;
        setMetric("m-encode", t.encode_ms);
        sendEdit();
        sendStrip();
      } else {
        state.hasB = true;
        $("alpha").disabled = false;
        sendStrip();
        if (Number($("alpha").value) > 0) sendEdit();
      }
    } else if (header.kind === "recon") {
      show("img-recon", payload);
    } else if (header.kind === "strip") {
      show("img-strip", payload);
    } else if (header.kind === "edit") {
      if (header.seq < state.shownEdit) return;
      state.shownEdit = header.seq;
      const url = show("img-edit", payload);
      $("img-edit").dataset.seq = String(header.seq);
      const dl = $("download");
      dl.href = url;
      dl.classList.remove("disabled");
      dl.removeAttribute("aria-disabled");
      const now = performance.now();
      const sentAt = state.sent.get(header.seq);
      for (const k of state.sent.keys()) if (k <= header.seq) state.sent.delete(k);
      state.frameTimes.push(now);
      while (state.frameTimes.length && now - state.frameTimes[0] > 1000) state.frameTimes.shift();
      setMetric("m-encode", t.encode_ms);
      setMetric("m-decode", t.decode_ms);
      setMetric("m-image", t.image_ms);
      setMetric("m-server", t.server_ms);
      if (sentAt !== undefined) setMetric("m-e2e", now - sentAt);
      $("m-fps").textContent = String(state.frameTimes.length);
      $("m-batch").textContent = `${t.batch ?? "–"} · ${header.coalesced ?? 0}`;
    }
  }
  function setMetric(id, ms) {
    if (ms === null || ms === undefined) return;
    $(id).textContent = `${ms < 10 ? ms.toFixed(2) : ms.toFixed(1)} ms`;
  }

  // ----- building the page from the hello message -----
  function label(name) { return name.replace(/_/g, " ").replace("=", ": "); }

  function build(h) {
    state.hello = h;
    $("model-info").innerHTML = "";
    const parts = [["preset", h.preset], ["step", h.step], ["image", `${h.image_size}×${h.image_size}`], ["z", h.z_dim],
      ["runner", `${h.runner} · ${h.precision} · ${h.device}`], ["batching", h.batching > 1 ? `≤ ${h.batching}` : "off"]];
    parts.forEach(([k, v], i) => {
      if (i) $("model-info").append(" · ");
      const b = document.createElement("b");
      b.textContent = String(v);
      $("model-info").append(`${k} `, b);
    });
    if (!build.done) {
      $("steps").value = String(h.steps);
      $("sampler").value = h.sampler;
      updateSteps();
      buildSliders(h);
      buildThumbs(h);
      build.done = true;
    }
    $("classifier-note").textContent = h.classifier_note || "";
    $("align-row").classList.toggle("hidden", !h.face);
    if (h.face) {
      $("align").disabled = !h.align;
      $("align").checked = h.align;
      $("align-note").textContent = h.align ? "eye centres by OpenCV's Haar cascades" : h.align_note;
    }
    $("source-note").textContent = `Uploads up to ${(h.max_upload_bytes / 1e6).toFixed(0)} MB and ${h.max_megapixels} megapixels; ` +
      `other sizes are resized and centre-cropped to ${h.image_size}×${h.image_size}. Nothing is stored.`;
  }

  function buildSliders(h) {
    const box = $("sliders");
    box.innerHTML = "";
    $("reset-all").classList.toggle("hidden", h.attributes.length === 0);
    let group = null;
    h.attributes.forEach((attr, i) => {
      const g = attr.name.includes("=") ? attr.name.split("=")[0] : (attr.kind === "continuous" ? "continuous" : "");
      if (g !== group && h.attributes.some((a) => a.name.includes("="))) {
        const t = document.createElement("div");
        t.className = "group-title";
        t.textContent = g;
        box.append(t);
      }
      group = g;
      const row = document.createElement("div");
      row.className = "slider-row";
      const id = `attr-${i}`;
      const lab = document.createElement("label");
      lab.htmlFor = id;
      lab.title = attr.name;
      lab.textContent = attr.name.includes("=") ? attr.name.split("=")[1] : label(attr.name);
      const input = document.createElement("input");
      Object.assign(input, { type: "range", id, min: "-1.5", max: "1.5", step: "0.01", value: "0", className: "attr-slider" });
      input.dataset.index = String(i);
      input.setAttribute("aria-label", label(attr.name));
      const out = document.createElement("output");
      out.htmlFor = id;
      out.textContent = "0.00";
      const reset = document.createElement("button");
      Object.assign(reset, { type: "button", className: "reset", textContent: "↺", title: `reset ${label(attr.name)}` });
      reset.setAttribute("aria-label", `reset ${label(attr.name)}`);
      const changed = () => {
        const v = Number(input.value);
        out.textContent = (v > 0 ? "+" : "") + v.toFixed(2);
        row.classList.toggle("moved", v !== 0);
      };
      input.addEventListener("input", () => { changed(); sendEdit(); });
      input.addEventListener("dblclick", () => { input.value = "0"; changed(); sendEdit(); });
      reset.addEventListener("click", () => { input.value = "0"; changed(); sendEdit(); });
      input._changed = changed;
      row.append(lab, input, out, reset);
      box.append(row);
    });
  }

  function buildThumbs(h) {
    const box = $("thumbs");
    box.innerHTML = "";
    $("heldout-head").classList.toggle("hidden", h.heldout === 0);
    for (let i = 0; i < h.heldout; i++) {
      const b = document.createElement("button");
      b.type = "button";
      b.title = `held-out image ${i}`;
      b.dataset.index = String(i);
      const img = document.createElement("img");
      img.alt = `held-out image ${i}`;
      img.src = `/api/heldout/${i}.png`;
      b.append(img);
      b.addEventListener("click", () => pick(i, state.pickTarget));
      box.append(b);
    }
  }
  function markThumb(slot, index) {
    document.querySelectorAll(`.thumbs button.sel-${slot}`).forEach((b) => b.classList.remove(`sel-${slot}`));
    const b = document.querySelector(`.thumbs button[data-index="${index}"]`);
    if (b) b.classList.add(`sel-${slot}`);
  }

  function updateSteps() {
    const k = Number($("steps").value);
    $("steps-value").textContent = String(k);
    const nfe = $("sampler").value === "heun" ? 2 * k - 1 : k;
    $("nfe").textContent = `${nfe} network evaluation${nfe > 1 ? "s" : ""} per image`;
  }

  // ----- messages to the user -----
  let toastTimer = null;
  function toast(text, kind) {
    const t = $("toast");
    t.textContent = text;
    t.className = `toast${kind === "info" ? " info" : ""}`;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => t.classList.add("hidden"), kind === "info" ? 3500 : 7000);
  }
  function setStatus(kind, text) {
    $("status").className = `status ${kind}`;
    $("status-text").textContent = text;
  }

  // ----- the socket -----
  function connect() {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onopen = () => { state.retry = 0; setStatus("ok", "connected"); };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const msg = JSON.parse(ev.data);
        if (msg.type === "hello") { build(msg); resend(); }
        else if (msg.type === "error") toast(msg.message);
      } else {
        const [header, payload] = unpack(ev.data);
        onFrame(header, payload);
      }
    };
    ws.onclose = (ev) => {
      state.hasA = state.hasB = false;
      state.sent.clear();
      const why = ev.code === 1009 ? " (the message was too big)" : ev.reason ? ` (${ev.reason})` : "";
      setStatus("down", `disconnected${why}; reconnecting…`);
      state.retry = Math.min(state.retry + 1, 5);
      setTimeout(connect, 500 * state.retry);
    };
  }

  // ----- wiring -----
  function wireDrop(zoneId, inputId, slot) {
    const zone = $(zoneId);
    $(inputId).addEventListener("change", (ev) => { upload(ev.target.files[0], slot); ev.target.value = ""; });
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("over");
      const file = ev.dataTransfer && ev.dataTransfer.files[0];
      if (file) upload(file, slot);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireDrop("drop-a", "file-a", "a");
    wireDrop("drop-b", "file-b", "b");
    // a file dropped anywhere else on the page becomes A instead of replacing the page
    document.addEventListener("dragover", (ev) => ev.preventDefault());
    document.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const file = ev.dataTransfer && ev.dataTransfer.files[0];
      if (file) upload(file, "a");
    });
    $("alpha").addEventListener("input", () => { $("alpha-value").textContent = Number($("alpha").value).toFixed(2); sendEdit(); });
    const settingChanged = () => { updateSteps(); sendRecon(); sendEdit(); sendStrip(); };
    $("steps").addEventListener("input", settingChanged);
    $("sampler").addEventListener("change", settingChanged);
    $("reset-all").addEventListener("click", () => {
      document.querySelectorAll(".attr-slider").forEach((s) => { s.value = "0"; s._changed(); });
      sendEdit();
    });
    document.querySelectorAll(".seg").forEach((b) => b.addEventListener("click", () => {
      state.pickTarget = b.dataset.target;
      document.querySelectorAll(".seg").forEach((o) => {
        o.classList.toggle("active", o === b);
        o.setAttribute("aria-checked", String(o === b));
      });
    }));
    connect();
  });
})();
