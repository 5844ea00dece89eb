// digitops web page: draw or upload a digit, see and explain the prediction, correct it.
// Plain ES module; every request goes to this page's own origin.

const $ = (id) => document.getElementById(id);

// One fixed seed: the same noise level always gives the same noisy picture.
const NOISE_SEED = 1234;
const DRAW_DEBOUNCE_MS = 250;
const NOISE_DEBOUNCE_MS = 150;
const REVIEW_SIZE = 12;
const CAM_CAPTION = $("cam-caption").textContent;

const state = {
  source: null, // {kind: "drawing" | "upload", name, file?}
  result: null, // the latest /predict reply
  target: null, // Grad-CAM class; null follows the prediction
  reveal: false, // whether the next answer (a new upload's) scrolls into view on a phone
  strokes: [], // [{width, points: [[x, y], ...]}]
  stroke: null, // the stroke being drawn
  pointerId: null,
};

// On a phone the result card sits below the canvas and the upload. A new upload's answer
// scrolls into view; a drawing's shows in a bar pinned at the bottom instead (scrolling would
// pull the canvas away before the digit's next stroke), which leads to the card.
const onePhoneColumn = window.matchMedia("(max-width: 719px)");
const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
let answerBelow = false; // the predicted digit is below what the screen shows
new IntersectionObserver(([entry]) => {
  answerBelow = !entry.isIntersecting && entry.boundingClientRect.top > 0;
  updateAnswerBar();
}).observe($("digit"));

function scrollToResult() {
  const behavior = reducedMotion.matches ? "auto" : "smooth";
  $("result").scrollIntoView({ block: "start", behavior });
}

function updateAnswerBar() {
  const reply = state.result;
  $("answer-bar").hidden = !(reply && onePhoneColumn.matches && answerBelow);
  if (!reply) return;
  $("answer-bar-digit").textContent = reply.is_digit ? String(reply.digit) : "?";
  $("answer-bar-confidence").textContent = verdict(reply);
}
$("answer-bar").addEventListener("click", scrollToResult);

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** The failure in plain words: the server's own message when it sent one. */
function describeFailure(status, route, body) {
  if (body && typeof body.error === "string" && body.error) return body.error;
  if (body && body.detail) {
    // FastAPI's own validation errors: [{loc, msg}, ...]
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).slice(-1)[0] ?? "request"}: ${d.msg}`).join("; ")
      : String(body.detail);
    if (status !== 404) return `The server refused the request: ${detail}.`;
  }
  if (status === 404) {
    return `This server does not offer ${route} (404 Not Found); it may be running an older version.`;
  }
  if (status === 413) return "The file is too large for the server; try a smaller image.";
  if (status === 429) return "Too many requests in a short time; wait a minute and try again.";
  if (status >= 500) {
    return `The server failed while handling ${route} (error ${status}). Try again; if it keeps ` +
      "failing, the server log says why.";
  }
  return `The server refused the request to ${route} (error ${status}).`;
}

/** fetch() a JSON endpoint of this origin; failures become ApiError with a readable message. */
async function api(path, { method = "GET", form, json, signal } = {}) {
  const route = path.split("?")[0];
  const init = { method, signal, headers: { Accept: "application/json" } };
  if (form) init.body = form;
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  let text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("Could not reach the server. Check that it is running, then try again.", 0);
  }
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) throw new ApiError(describeFailure(response.status, route, body), response.status);
  if (body === null) throw new ApiError(`The server sent an unreadable reply to ${route}.`, response.status);
  return body;
}

function showError(id, err, lead = "") {
  const box = $(id);
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const words = err instanceof ApiError ? err.message : `Something went wrong in this page: ${err.message}`;
  box.textContent = lead + words;
  box.hidden = false;
}

const controllers = {}; // in-flight requests by kind
const timers = {}; // debounced work by name

/** Mark the cards busy from the first pointer move until the last reply has been shown. */
function updateBusy() {
  const waiting = Object.keys(timers).length > 0;
  const busy = {
    result: waiting || "predict" in controllers,
    explain: waiting || "explain" in controllers || "maps" in controllers,
  };
  for (const [id, on] of Object.entries(busy)) {
    $(id).classList.toggle("busy", on);
    if (on) $(id).setAttribute("aria-busy", "true");
    else $(id).removeAttribute("aria-busy");
  }
}

function later(name, work, delay) {
  clearTimeout(timers[name]);
  timers[name] = setTimeout(() => {
    delete timers[name];
    work();
    updateBusy();
  }, delay);
  updateBusy();
}

function cancelPending() {
  for (const name of Object.keys(timers)) {
    clearTimeout(timers[name]);
    delete timers[name];
  }
  for (const controller of Object.values(controllers)) controller.abort();
  updateBusy();
}

/** Run one kind of request, cancelling the previous one of that kind: only the newest renders.
 * `render` gets the reply, `fail` the error; neither runs for a request that was superseded. */
async function latest(kind, task, render, fail) {
  controllers[kind]?.abort();
  const controller = new AbortController();
  controllers[kind] = controller;
  updateBusy();
  try {
    const reply = await task(controller.signal);
    if (!controller.signal.aborted) render(reply);
  } catch (err) {
    if (!controller.signal.aborted) fail(err);
  } finally {
    if (controllers[kind] === controller) delete controllers[kind];
    updateBusy();
  }
}

const png = (b64) => `data:image/png;base64,${b64}`;
const percent = (p) => `${(100 * p).toFixed(1)}%`;

// ---------------------------------------------------------------------------------------------
// The input: a drawing or an uploaded file

const canvas = $("canvas");
const ctx = canvas.getContext("2d");

function paint(stroke, from = 0) {
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = stroke.width;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  const pts = stroke.points;
  if (pts.length === 1) {
    ctx.beginPath();
    ctx.arc(pts[0][0], pts[0][1], stroke.width / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(...pts[Math.max(0, from - 1)]);
  for (let i = Math.max(1, from); i < pts.length; i++) ctx.lineTo(...pts[i]);
  ctx.stroke();
}

function redraw() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (const stroke of state.strokes) paint(stroke);
  $("undo").disabled = $("clear").disabled = state.strokes.length === 0;
}

function canvasPoint(event) {
  const box = canvas.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * canvas.width) / box.width,
    ((event.clientY - box.top) * canvas.height) / box.height,
  ];
}

const predictSoon = (delay) => later("analyse", analyseAll, delay);

canvas.addEventListener("pointerdown", (event) => {
  if (state.pointerId !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  state.pointerId = event.pointerId;
  if (state.strokes.length === 0 || state.source?.kind !== "drawing") state.target = null;
  useSource({ kind: "drawing", name: "drawing.png" });
  state.stroke = { width: Number($("stroke-width").value), points: [canvasPoint(event)] };
  state.strokes.push(state.stroke);
  paint(state.stroke);
  $("undo").disabled = $("clear").disabled = false;
});

canvas.addEventListener("pointermove", (event) => {
  if (event.pointerId !== state.pointerId || !state.stroke) return;
  const from = state.stroke.points.length;
  // A pen or touch screen reports more points than animation frames: keep them all.
  const events = event.getCoalescedEvents?.() ?? [];
  for (const e of events.length ? events : [event]) state.stroke.points.push(canvasPoint(e));
  paint(state.stroke, from);
  predictSoon(DRAW_DEBOUNCE_MS);
});

function endStroke(event) {
  if (event.pointerId !== state.pointerId) return;
  state.pointerId = null;
  state.stroke = null;
  predictSoon(0);
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
// Capture can be lost without a pointerup (an alert, a tab switch): never stay stuck mid-stroke.
canvas.addEventListener("lostpointercapture", endStroke);

function undo() {
  if (!state.strokes.length) return;
  state.strokes.pop();
  redraw();
  if (state.source?.kind !== "drawing") return;
  if (state.strokes.length) predictSoon(0);
  else resetResult();
}

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", () => {
  state.strokes = [];
  redraw();
  if (state.source?.kind === "drawing") resetResult();
});
document.addEventListener("keydown", (event) => {
  const typing = event.target.closest?.("input, select, textarea");
  if ((event.ctrlKey || event.metaKey) && event.key === "z" && !typing && !$("view-predict").hidden) {
    event.preventDefault();
    undo();
  }
});

$("stroke-width").addEventListener("input", () => {
  $("stroke-width-value").textContent = `${$("stroke-width").value} px`;
});

let previewUrl = null;
function useUpload(file) {
  if (!file) return;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("upload-preview").src = previewUrl;
  $("upload-name").textContent = `${file.name} (${Math.max(1, Math.round(file.size / 1024))} KB)`;
  $("upload-figure").hidden = false;
  state.target = null;
  state.reveal = true;
  useSource({ kind: "upload", name: file.name || "upload", file });
  analyseAll();
}
// Some files (HEIC photos, say) reach the server fine but cannot be shown by this browser.
$("upload-preview").addEventListener("error", () => {
  $("upload-preview").hidden = true;
  $("upload-name").textContent += " (this browser cannot show it)";
});
$("upload-preview").addEventListener("load", () => ($("upload-preview").hidden = false));

for (const id of ["file", "camera"]) {
  $(id).addEventListener("change", (event) => {
    useUpload(event.target.files[0]);
    event.target.value = ""; // choosing the same file again must fire "change" again
  });
}

const dropzone = $("dropzone");
for (const type of ["dragenter", "dragover"]) {
  dropzone.addEventListener(type, (event) => {
    event.preventDefault();
    dropzone.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropzone.addEventListener(type, () => dropzone.classList.remove("over"));
}
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  useUpload(event.dataTransfer.files[0]);
});
// A file dropped anywhere else must not make the browser navigate away to it.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

function useSource(source) {
  state.source = source;
  $("source").textContent = source.kind === "drawing" ? "Input: your drawing." : `Input: ${source.name}.`;
}

async function sourceBlob() {
  if (state.source.kind === "upload") return state.source.file;
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function imageForm(extra = {}) {
  const form = new FormData();
  form.append("image", await sourceBlob(), state.source.name);
  form.append("invert", document.querySelector("input[name=invert]:checked").value);
  form.append("noise", Number($("noise").value).toFixed(2));
  form.append("seed", String(NOISE_SEED));
  for (const [key, value] of Object.entries(extra)) {
    if (value !== null && value !== undefined) form.append(key, String(value));
  }
  return form;
}

const hasInput = () =>
  state.source !== null && (state.source.kind === "upload" || state.strokes.length > 0);

// ---------------------------------------------------------------------------------------------
// Result, explanation, feature maps

function analyseAll() {
  clearTimeout(timers.analyse);
  delete timers.analyse;
  if (!hasInput()) return updateBusy();
  predict();
  explain();
  featureMaps();
}

function predict() {
  latest(
    "predict",
    // Previews mid-stroke are not logged: half-drawn digits would flood the review queue.
    async (signal) =>
      api("/predict", {
        method: "POST",
        form: await imageForm({ log: state.pointerId === null ? null : "false" }),
        signal,
      }),
    renderPrediction,
    (err) => {
      clearPrediction(); // an old answer next to a new input would be read as its answer
      showError("result-error", err);
    },
  );
}

function explain() {
  latest(
    "explain",
    async (signal) =>
      api("/explain", { method: "POST", form: await imageForm({ target: state.target }), signal }),
    renderCam,
    (err) => {
      $("cam-image").hidden = true;
      $("cam-caption").textContent = CAM_CAPTION;
      showError("explain-error", err, "Nothing to explain. ");
    },
  );
}

function featureMaps() {
  const layer = $("layer").value;
  latest(
    "maps",
    async (signal) =>
      api("/feature_maps", { method: "POST", form: await imageForm({ layer }), signal }),
    renderMaps,
    (err) => {
      $("maps-image").hidden = true;
      $("maps-caption").textContent = "";
      showError("explain-error", err, "Nothing to explain. ");
    },
  );
}

function buildChart() {
  const chart = $("chart");
  for (let digit = 0; digit < 10; digit++) {
    const item = document.createElement("li");
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.digit = String(digit);
    bar.disabled = true;
    bar.setAttribute("aria-pressed", "false");
    bar.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span>' +
      '</span><span class="value"></span>';
    bar.querySelector(".label").textContent = String(digit);
    bar.querySelector(".fill").style.width = "0%";
    bar.addEventListener("click", () => chooseTarget(digit));
    item.append(bar);
    chart.append(item);
  }
}

/** "97.3% sure", or that the input looks like no digit (then the answer means little). */
function verdict(reply) {
  return reply.is_digit ? `${percent(reply.confidence)} sure` : "Not a digit?";
}

function renderPrediction(reply) {
  showError("result-error", null);
  $("result").classList.add("has-result");
  $("result").classList.toggle("not-a-digit", !reply.is_digit);
  state.result = reply;
  $("digit").textContent = reply.is_digit ? String(reply.digit) : "?";
  $("confidence").textContent = verdict(reply);
  $("not-a-digit").hidden = reply.is_digit;
  $("not-a-digit-guess").textContent = `${reply.digit} (${percent(reply.confidence)})`;
  const preview = $("input-preview");
  preview.src = png(reply.input_png);
  preview.hidden = false;
  $("inverted").textContent = reply.inverted
    ? "The image was inverted: it looked like dark ink on a light background."
    : "Not inverted: it already looked like light ink on a dark background.";
  $("chart").querySelectorAll(".bar").forEach((bar, digit) => {
    const p = reply.probabilities[digit];
    bar.disabled = false;
    bar.classList.toggle("top", digit === reply.digit);
    bar.querySelector(".fill").style.width = `${(100 * p).toFixed(2)}%`;
    bar.querySelector(".value").textContent = percent(p);
    bar.setAttribute("aria-label", `${digit}: ${percent(p)}. Show Grad-CAM for ${digit}`);
  });
  markTarget();
  askFeedback(reply);
  if (state.reveal) {
    state.reveal = false;
    if (onePhoneColumn.matches && answerBelow) scrollToResult();
  }
  updateAnswerBar();
}

function renderCam(reply) {
  showError("explain-error", null);
  const img = $("cam-image");
  img.src = png(reply.overlay_png);
  img.hidden = false;
  img.alt = `Grad-CAM heat map for class ${reply.target} over the input`;
  const who = state.target === null ? "the predicted class" : "class";
  const evidence = Math.max(...(reply.cam ?? [[1]]).flat());
  $("cam-caption").textContent =
    `Grad-CAM for ${who} ${reply.target} (layer ${reply.layer}): ` +
    (evidence > 0
      ? `red marks the pixels that pushed the model towards ${reply.target}.`
      : `nothing in the image pushed the model towards ${reply.target}.`);
}

function renderMaps(reply) {
  showError("explain-error", null);
  const img = $("maps-image");
  img.src = png(reply.grid_png);
  img.hidden = false;
  img.alt = `All ${reply.channels} feature maps of ${reply.layer}`;
  $("maps-caption").textContent =
    `${reply.channels} channels of ${reply.layer}, each ${reply.size.join("×")}; bright is strong.`;
}

function markTarget() {
  const shown = state.target ?? state.result?.digit;
  $("chart").querySelectorAll(".bar").forEach((bar, digit) => {
    bar.setAttribute("aria-pressed", String(digit === shown));
  });
}

function chooseTarget(digit) {
  state.target = digit;
  $("cam-target").value = digit === null ? "" : String(digit);
  markTarget();
  if (hasInput()) explain();
}

/** Back to the empty page: no input, nothing pending, nothing shown. */
function resetResult() {
  cancelPending();
  state.target = null;
  $("cam-target").value = "";
  $("source").textContent = "No input yet: draw a digit or upload an image.";
  for (const id of ["cam-image", "maps-image"]) $(id).hidden = true;
  $("cam-caption").textContent = CAM_CAPTION;
  $("maps-caption").textContent = "";
  for (const id of ["result-error", "explain-error"]) showError(id, null);
  clearPrediction();
}

function clearPrediction() {
  state.result = null;
  $("result").classList.remove("has-result", "not-a-digit");
  $("digit").textContent = "–";
  $("confidence").textContent = "";
  $("not-a-digit").hidden = true;
  $("inverted").textContent = "";
  $("input-preview").hidden = true;
  $("chart").querySelectorAll(".bar").forEach((bar) => {
    bar.disabled = true;
    bar.classList.remove("top");
    bar.setAttribute("aria-pressed", "false");
    bar.querySelector(".fill").style.width = "0%";
    bar.querySelector(".value").textContent = "";
  });
  markTarget();
  askFeedback(null);
  updateAnswerBar();
}

for (let digit = 0; digit < 10; digit++) {
  $("cam-target").append(new Option(String(digit), String(digit)));
}
$("cam-target").addEventListener("change", (event) => {
  chooseTarget(event.target.value === "" ? null : Number(event.target.value));
});
$("layer").addEventListener("change", () => hasInput() && featureMaps());
for (const radio of document.querySelectorAll("input[name=invert]")) {
  radio.addEventListener("change", analyseAll);
}

$("noise").addEventListener("input", () => {
  $("noise-value").textContent = Number($("noise").value).toFixed(2);
  if (hasInput()) predictSoon(NOISE_DEBOUNCE_MS);
});

// ---------------------------------------------------------------------------------------------
// Feedback on the current prediction

const NOT_A_DIGIT = "not-a-digit"; // the label /feedback takes for "that's no digit at all"
const labelText = (label) => (label === NOT_A_DIGIT ? "not a digit" : String(label));

/** Buttons 0-9 and "Not a digit", each calling onPick(label). */
function digitPad(container, onPick, label) {
  for (const value of [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, NOT_A_DIGIT]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = value === NOT_A_DIGIT ? "Not a digit" : String(value);
    button.dataset.digit = String(value);
    if (value === NOT_A_DIGIT) button.className = "not-a-digit-label";
    button.setAttribute("aria-label", value === NOT_A_DIGIT ? "It is not a digit" : label(value));
    button.addEventListener("click", () => onPick(value, button));
    container.append(button);
  }
}

function askFeedback(reply) {
  $("feedback-status").textContent = "";
  showError("feedback-error", null);
  $("feedback-digits").hidden = true;
  $("feedback-answer").hidden = reply === null;
  $("feedback-question").textContent = reply === null
    ? "Make a prediction first, then tell us whether it was right."
    : reply.is_digit
      ? `Correct? The model says ${reply.digit}.`
      : "Correct? The model says this is not a digit.";
}

async function sendFeedback(label) {
  const reply = state.result;
  if (!reply) return;
  const buttons = document.querySelectorAll("#feedback button");
  buttons.forEach((b) => (b.disabled = true));
  $("feedback-status").textContent = "";
  try {
    const saved = await api("/feedback", {
      method: "POST",
      json: { prediction_id: reply.prediction_id, label },
    });
    showError("feedback-error", null);
    let text = `Thank you: saved as ${labelText(saved.label)}. It stays ${saved.status} ` +
      "until the next ingestion checks it.";
    if (saved.replaced) {
      const before = saved.previous_label == null ? "an earlier one" : labelText(saved.previous_label);
      text += ` This replaced the earlier label ${before}.`;
    }
    $("feedback-status").textContent = text;
    $("feedback-digits").hidden = true;
    loadStats();
  } catch (err) {
    showError("feedback-error", err);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

digitPad($("feedback-digits"), (digit) => sendFeedback(digit), (d) => `It is a ${d}`);
$("feedback-yes").addEventListener("click", () => {
  const reply = state.result;
  if (reply) sendFeedback(reply.is_digit ? reply.digit : NOT_A_DIGIT);
});
$("feedback-no").addEventListener("click", () => {
  $("feedback-digits").hidden = false;
  $("feedback-status").textContent = "";
  $("feedback-digits").querySelector("button").focus();
});

// ---------------------------------------------------------------------------------------------
// Review: the active-learning queue

async function loadStats() {
  try {
    const stats = await api("/feedback/stats");
    for (const key of ["pending", "ingested", "rejected", "predictions"]) {
      $(`stat-${key}`).textContent = String(stats[key] ?? "–");
    }
  } catch (err) {
    if (!$("view-review").hidden) showError("review-error", err);
  }
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function reviewItem(item) {
  const li = document.createElement("li");
  li.className = "review-item";
  li.dataset.predictionId = item.prediction_id;
  const img = document.createElement("img");
  img.src = png(item.input_png);
  img.alt = `Input the model read as ${item.digit}`;
  const text = document.createElement("div");
  const guess = document.createElement("p");
  guess.className = "guess";
  guess.textContent = `Model: ${item.digit} (${percent(item.confidence)})`;
  const meta = document.createElement("p");
  meta.className = "meta";
  const when = typeof item.created_at === "number" ? ` · ${ago(item.created_at)}` : "";
  const score = typeof item.digit_score === "number"
    ? ` · digit score ${item.digit_score.toFixed(3)}` : "";
  meta.textContent = `entropy ${Number(item.entropy).toFixed(2)} · margin ` +
    `${Number(item.margin).toFixed(2)}${score}${when}`;
  text.append(guess, meta);
  const pad = document.createElement("fieldset");
  pad.className = "digit-pad";
  const legend = document.createElement("legend");
  legend.className = "visually-hidden";
  legend.textContent = `Label the digit the model read as ${item.digit}`;
  pad.append(legend);
  digitPad(pad, (digit) => labelItem(li, item, digit), (d) => `Label as ${d}`);
  li.append(img, text, pad);
  return li;
}

async function labelItem(li, item, label) {
  const buttons = li.querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  try {
    await api("/feedback", { method: "POST", json: { prediction_id: item.prediction_id, label } });
    showError("review-error", null);
    const next = li.nextElementSibling ?? li.previousElementSibling;
    li.remove();
    $("review-status").textContent = `Labelled as ${labelText(label)}.`;
    // Keep keyboard users in the list rather than dropping focus to the page.
    (next?.querySelector("button") ?? $("review-refresh")).focus();
    if (!$("review-list").children.length) showEmptyQueue();
    loadStats();
  } catch (err) {
    showError("review-error", err);
    buttons.forEach((b) => (b.disabled = false));
  }
}

function showEmptyQueue() {
  $("review-status").textContent += " Nothing left to review: every logged prediction has a label.";
}

let reviewController = null;
async function loadReview() {
  reviewController?.abort();
  const controller = (reviewController = new AbortController());
  const strategy = $("strategy").value;
  const queue = $("queue").value;
  $("strategy").disabled = queue !== "digits"; // the not-a-digit list has one order
  $("review-status").textContent = "Loading…";
  loadStats();
  try {
    const reply = await api(`/review_queue?k=${REVIEW_SIZE}&strategy=${strategy}&queue=${queue}`, {
      signal: controller.signal,
    });
    showError("review-error", null);
    $("review-list").replaceChildren(...reply.items.map(reviewItem));
    $("review-status").textContent = `${reply.items.length} to review, ` +
      (queue === "digits" ? "least sure first." : "the most digit-like first.");
    if (!reply.items.length) {
      $("review-status").textContent = "";
      showEmptyQueue();
    }
  } catch (err) {
    if (controller.signal.aborted) return;
    $("review-status").textContent = "";
    showError("review-error", err);
  }
}

$("strategy").addEventListener("change", loadReview);
$("queue").addEventListener("change", loadReview);
$("review-refresh").addEventListener("click", loadReview);

// ---------------------------------------------------------------------------------------------
// Model card

function when(value) {
  if (value === null || value === undefined || value === "") return null;
  const date = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

async function loadModel() {
  try {
    const card = await api("/model");
    const accuracy = typeof card.test_accuracy === "number" ? percent(card.test_accuracy) : null;
    $("model-badge").textContent = [
      `Model ${card.name ?? "digit-cnn"}`,
      card.version != null ? `version ${card.version}` : "unregistered",
      accuracy ? `${accuracy} test accuracy` : null,
    ].filter(Boolean).join(" · ");
    const rows = [
      ["Name", card.name],
      ["Version", card.version],
      ["Test accuracy", accuracy],
      ["Calibration", typeof card.temperature === "number"
        ? `temperature ${card.temperature.toFixed(3)}` : null],
      ["Not-a-digit threshold", typeof card.digit_threshold === "number"
        ? `digit score below ${card.digit_threshold}` : null],
      ["Trained", when(card.trained_at)],
      ["Data version", card.data_version],
      ["Source", card.source],
      ["Git commit", card.git_commit],
      ["MLflow run", card.mlflow_run_id],
      ["Architecture", card.model_args ? JSON.stringify(card.model_args) : null],
    ];
    const list = $("model-card");
    list.replaceChildren();
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value === null || value === undefined || value === "" ? "unknown" : String(value);
      list.append(dt, dd);
    }
    const link = $("mlflow-link");
    if (card.mlflow_ui_url && card.mlflow_run_id) {
      const a = document.createElement("a");
      a.href = `${card.mlflow_ui_url.replace(/\/+$/, "")}/#/experiments/0/runs/${card.mlflow_run_id}`;
      a.textContent = "Open this training run in MLflow";
      a.rel = "noopener";
      link.replaceChildren(a);
      link.hidden = false;
    }
    showError("model-error", null);
  } catch (err) {
    $("model-badge").textContent = "Model details unavailable.";
    showError("model-error", err);
  }
}

// ---------------------------------------------------------------------------------------------
// Views

const tabs = [...document.querySelectorAll("[role=tab]")];
const viewOf = (tab) => tab.id.replace("tab-", "");

function selectView(name, { focus = false } = {}) {
  const tab = tabs.find((t) => viewOf(t) === name) ?? tabs[0];
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  // The address names the view, so a view can be linked to and survives a reload.
  history.replaceState(null, "", viewOf(tab) === "predict" ? location.pathname : `#${viewOf(tab)}`);
  if (viewOf(tab) === "review") loadReview();
}

window.addEventListener("hashchange", () => {
  const name = location.hash.slice(1);
  if (tabs.some((t) => viewOf(t) === name)) selectView(name);
});

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectView(viewOf(tab)));
  tab.addEventListener("keydown", (event) => {
    const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    selectView(viewOf(tabs[(moves[event.key] + tabs.length) % tabs.length]), { focus: true });
  });
});

buildChart();
redraw();
loadModel();
selectView(location.hash.slice(1) || "predict");
