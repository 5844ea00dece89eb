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
// Monitor: how the served model is doing (GET /monitor), plotted with inline SVG

const SVG_NS = "http://www.w3.org/2000/svg";
// Every plot is drawn in these units and scaled to its card's width by the viewBox.
const PLOT = { width: 440, height: 190, left: 46, right: 12, top: 12, bottom: 26 };
const PLOT_BOTTOM = PLOT.height - PLOT.bottom;
const PLOT_RIGHT = PLOT.width - PLOT.right;
const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;

/** An SVG element with `attrs` (null ones left out) and `children` (nodes or strings). */
function svg(name, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  el.append(...children);
  return el;
}

/** `el` with a hover tooltip: the figure behind a bar or a point. */
function tip(el, text) {
  el.append(svg("title", {}, text));
  return el;
}

const linear = (d0, d1, r0, r1) => (v) => r0 + ((v - d0) / (d1 - d0 || 1)) * (r1 - r0);
const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
const share = (p) => (p === null || p === undefined ? "–" : percent(p));
const axisPercent = (p) => `${Number((100 * p).toFixed(1))}%`;

/** The least of 1, 1.5, 2, 3, 4, 5, 6, 8 times a power of ten that is at least `value`. */
function niceCeil(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 1.5, 2, 3, 4, 5, 6, 8, 10].map((m) => m * power).find((v) => v >= value * (1 - 1e-9));
}

function windowWords(hours) {
  if (hours === 1) return "hour";
  return hours > 24 && hours % 24 === 0 ? `${hours / 24} days` : `${hours} h`;
}

function bucketWords(minutes) {
  if (minutes < 60) return `${minutes} min`;
  if (minutes < 1440) return `${Number((minutes / 60).toFixed(2))} h`;
  return plural(Number((minutes / 1440).toFixed(2)), "day");
}

/** The x axis of a report: its window cut into its buckets, which start at multiples of the
 * bucket size since the epoch (as the server groups them). */
function timeline(report) {
  const step = report.bucket_minutes * 60_000;
  const now = Date.parse(report.generated_at);
  const first = Math.floor((now - report.hours * HOUR_MS) / step) * step;
  const end = (Math.floor(now / step) + 1) * step;
  const x = linear(first, end, PLOT.left, PLOT_RIGHT);
  const slot = x(first + step) - x(first);
  return { step, first, end, x, slot, hours: report.hours };
}

/** An empty plot named `label` for screen readers (what it shows, in words). */
function plotFrame(id, label) {
  return svg("svg", {
    id,
    class: "plot",
    viewBox: `0 0 ${PLOT.width} ${PLOT.height}`,
    role: "img",
    "aria-label": label,
  });
}

/** Horizontal grid lines at `ticks`, labelled on the left. */
function yAxis(root, y, ticks, format) {
  for (const value of ticks) {
    root.append(
      svg("line", { class: "grid", x1: PLOT.left, x2: PLOT_RIGHT, y1: y(value), y2: y(value) }),
      svg("text", { class: "tick", x: PLOT.left - 5, y: y(value) + 4, "text-anchor": "end" },
        format(value)),
    );
  }
}

function baseline(root) {
  root.append(svg("line", {
    class: "axis", x1: PLOT.left, x2: PLOT_RIGHT, y1: PLOT_BOTTOM, y2: PLOT_BOTTOM,
  }));
}

/** Local-time ticks under a time plot, at round times (quarter hours, hours, days). */
function timeAxis(root, t) {
  const hours = (t.end - t.first) / HOUR_MS;
  const step = hours <= 1.5 ? HOUR_MS / 4 : hours <= 6 ? HOUR_MS : hours <= 30 ? 6 * HOUR_MS
    : hours <= 10 * 24 ? DAY_MS : 7 * DAY_MS;
  const offset = new Date(t.first).getTimezoneOffset() * 60_000; // round in local time
  const format = step < DAY_MS
    ? (d) => d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : (d) => d.toLocaleDateString([], { weekday: "short", day: "numeric" });
  for (let when = Math.ceil((t.first - offset) / step) * step + offset; when <= t.end; when += step) {
    const x = t.x(when);
    root.append(
      svg("line", { class: "axis", x1: x, x2: x, y1: PLOT_BOTTOM, y2: PLOT_BOTTOM + 4 }),
      svg("text", { class: "tick", x, y: PLOT.height - 6, "text-anchor": "middle" },
        format(new Date(when))),
    );
  }
  baseline(root);
}

/** Words across an empty plot, so that no data never reads as a plot of zeros. */
function noData(root, words) {
  root.append(svg("text", {
    class: "no-data",
    x: (PLOT.left + PLOT_RIGHT) / 2,
    y: (PLOT.top + PLOT_BOTTOM) / 2,
    "text-anchor": "middle",
  }, words));
}

function bucketTime(t, start) {
  const from = new Date(start);
  const options = t.hours > 24 ? { weekday: "short", hour: "2-digit", minute: "2-digit" }
    : { hour: "2-digit", minute: "2-digit" };
  return `${from.toLocaleString([], options)}–` +
    new Date(from.getTime() + t.step).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/** A line through the buckets' `value`s, broken where a bucket has none (no traffic), and a
 * dot on each point so that a lone bucket shows too. */
function seriesLine(root, t, y, buckets, value, className, describe) {
  const points = buckets
    .map((bucket) => ({ bucket, v: value(bucket), start: Date.parse(bucket.start) }))
    .filter(({ v }) => v !== null && v !== undefined);
  let path = "";
  points.forEach(({ v, start }, i) => {
    const joined = i > 0 && start - points[i - 1].start === t.step;
    path += `${joined ? "L" : "M"}${(t.x(start) + t.slot / 2).toFixed(1)},${y(v).toFixed(1)}`;
  });
  if (path) root.append(svg("path", { class: `plot-line ${className}`, d: path }));
  for (const { bucket, v, start } of points) {
    const x = t.x(start) + t.slot / 2;
    const dot = svg("circle", { class: `plot-point ${className}`, cx: x, cy: y(v), r: 2.2 });
    root.append(tip(dot, `${bucketTime(t, bucket.start)}: ${describe(v, bucket)}`));
  }
}

/** A dashed line across the plot at a training-time reference figure. */
function referenceLine(root, y, value, className) {
  root.append(svg("line", {
    class: `plot-ref ${className}`, x1: PLOT.left, x2: PLOT_RIGHT, y1: y(value), y2: y(value),
  }));
}

function legend(items) {
  const list = document.createElement("ul");
  list.className = "legend";
  for (const [className, words] of items) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch ${className}`;
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, words);
    list.append(item);
  }
  return list;
}

function plotCard(title, plot, items = []) {
  const figure = document.createElement("figure");
  figure.className = "card plot-card";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, plot);
  if (items.length) figure.append(legend(items));
  return figure;
}

/** Bars: the served model's predictions per bucket. */
function trafficPlot(report, served) {
  const t = timeline(report);
  const counts = served.buckets.map((b) => b.predictions);
  const most = Math.max(0, ...counts);
  const top = niceCeil(Math.max(1, most));
  const y = linear(0, top, PLOT_BOTTOM, PLOT.top);
  const root = plotFrame("monitor-traffic",
    `Predictions per ${bucketWords(report.bucket_minutes)} over the last ` +
    `${windowWords(report.hours)}: ${served.predictions.toLocaleString()} in all, ` +
    `at most ${most.toLocaleString()} in one bucket`);
  yAxis(root, y, Number.isInteger(top / 2) ? [0, top / 2, top] : [0, top], (v) => v.toLocaleString());
  timeAxis(root, t);
  const gap = t.slot > 4 ? t.slot * 0.15 : 0;
  for (const bucket of served.buckets) {
    if (!bucket.predictions) continue; // a bucket with labels only
    const height = PLOT_BOTTOM - y(bucket.predictions);
    root.append(tip(svg("rect", {
      class: "plot-bar",
      x: t.x(Date.parse(bucket.start)) + gap / 2,
      y: PLOT_BOTTOM - height,
      width: Math.max(0.8, t.slot - gap),
      height: Math.max(1, height),
    }), `${bucketTime(t, bucket.start)}: ${plural(bucket.predictions, "prediction")}`));
  }
  if (!served.predictions) noData(root, "No predictions in this window");
  return plotCard("Predictions per bucket", root);
}

function measuredWords(m) {
  if (!m.labels) return "no labels";
  return `${percent(m.accuracy)} (${percent(m.low)}–${percent(m.high)}, ${plural(m.labels, "label")})`;
}

/** Estimated accuracy per bucket (a line), measured accuracy where labels exist (points with
 * their 95% Wilson interval), and the training-time estimate (dashed). */
function accuracyPlot(report, served) {
  const t = timeline(report);
  const reference = report.reference?.estimated_accuracy;
  const labelled = served.buckets.filter((b) => b.measured.labels);
  const values = served.buckets.map((b) => b.estimated_accuracy).filter((v) => v !== null);
  values.push(...labelled.map((b) => b.measured.low));
  if (typeof reference === "number") values.push(reference);
  // Zoom in on where the figures are: from 0% they would all sit in a line at the top.
  const bottom = Math.max(0, Math.floor((Math.min(1, ...values) - 0.02) * 10) / 10);
  const y = linear(bottom, 1, PLOT_BOTTOM, PLOT.top);
  const estimated = served.estimated_accuracy;
  const root = plotFrame("monitor-accuracy",
    `Accuracy per bucket over the last ${windowWords(report.hours)}: estimated ` +
    `${share(estimated)} in the window, measured ${measuredWords(served.measured)}` +
    (typeof reference === "number" ? `, ${percent(reference)} expected from training` : ""));
  yAxis(root, y, [bottom, (bottom + 1) / 2, 1], axisPercent);
  timeAxis(root, t);
  if (typeof reference === "number") referenceLine(root, y, reference, "estimate");
  seriesLine(root, t, y, served.buckets, (b) => b.estimated_accuracy, "estimate",
    (v, b) => `estimated ${percent(v)} correct of ${plural(b.predictions, "prediction")}`);
  for (const bucket of labelled) {
    const m = bucket.measured;
    const x = t.x(Date.parse(bucket.start)) + t.slot / 2;
    const cap = Math.min(4, Math.max(1.5, t.slot / 3));
    const whisker = svg("g", { class: "measured" },
      svg("line", { x1: x, x2: x, y1: y(m.low), y2: y(m.high) }),
      svg("line", { x1: x - cap, x2: x + cap, y1: y(m.low), y2: y(m.low) }),
      svg("line", { x1: x - cap, x2: x + cap, y1: y(m.high), y2: y(m.high) }),
      svg("circle", { class: "plot-point", cx: x, cy: y(m.accuracy), r: 3.2 }));
    root.append(tip(whisker, `${bucketTime(t, bucket.start)}: measured ${measuredWords(m)}`));
  }
  if (!values.length || (!served.predictions && !labelled.length)) {
    noData(root, "No answered digits in this window");
  }
  const items = [
    ["estimate", "estimated (mean confidence)"],
    ["measured", "measured (labels, 95% interval)"],
  ];
  if (typeof reference === "number") items.push(["estimate dashed", "expected from training"]);
  return plotCard("Accuracy per bucket", root, items);
}

/** The not-a-digit share and the low-confidence share per bucket, against training. */
function sharesPlot(report, served) {
  const t = timeline(report);
  const ref = report.reference;
  const values = served.buckets.flatMap((b) => [b.not_digit_share, b.low_confidence_share]);
  if (ref) values.push(ref.not_digit_share, ref.low_confidence_share);
  const top = Math.min(1, niceCeil(Math.max(0.05, ...values.filter((v) => v !== null))));
  const y = linear(0, top, PLOT_BOTTOM, PLOT.top);
  const low = report.thresholds?.low_confidence;
  const root = plotFrame("monitor-shares",
    `Shares per bucket over the last ${windowWords(report.hours)}: not a digit ` +
    `${share(served.not_digit_share)}, low confidence ${share(served.low_confidence_share)} ` +
    "in the window" + (ref ? `; at training ${percent(ref.not_digit_share)} and ` +
      `${percent(ref.low_confidence_share)}` : ""));
  yAxis(root, y, [0, top / 2, top], axisPercent);
  timeAxis(root, t);
  if (ref) {
    referenceLine(root, y, ref.not_digit_share, "not-digit");
    referenceLine(root, y, ref.low_confidence_share, "low-confidence");
  }
  seriesLine(root, t, y, served.buckets, (b) => b.not_digit_share, "not-digit",
    (v, b) => `${percent(v)} of ${plural(b.predictions, "input")} not a digit`);
  seriesLine(root, t, y, served.buckets, (b) => b.low_confidence_share, "low-confidence",
    (v) => `${percent(v)} of the answered digits below ${share(low)} confidence`);
  if (!served.predictions) noData(root, "No predictions in this window");
  const items = [
    ["not-digit", "not a digit"],
    ["low-confidence", `low confidence${typeof low === "number" ? ` (below ${percent(low)})` : ""}`],
  ];
  if (ref) items.push(["reference dashed", "at training (dashed, same colours)"]);
  return plotCard("Not a digit and low confidence", root, items);
}

/** Ten shares of the window (filled bars) beside the reference's (outlined). */
function distributionPlot({ id, title, label, shares, reference, names, edges }) {
  const observed = shares.some((v) => v > 0);
  const top = niceCeil(Math.max(0.05, ...shares, ...(reference ?? [])));
  const y = linear(0, top, PLOT_BOTTOM, PLOT.top);
  const root = plotFrame(id, label);
  yAxis(root, y, [0, top / 2, top], axisPercent);
  const group = (PLOT_RIGHT - PLOT.left) / shares.length;
  const width = group * (reference ? 0.38 : 0.6);
  const bars = [...(observed ? [["plot-bar", shares, "this window"]] : []),
    ...(reference ? [["plot-bar reference", reference, "training"]] : [])];
  shares.forEach((_, i) => {
    const left = PLOT.left + i * group + (group - width * bars.length) / 2;
    const words = bars.map(([, values, who]) => `${who} ${percent(values[i])}`).join(", ");
    bars.forEach(([className, values], j) => {
      const height = PLOT_BOTTOM - y(values[i]);
      root.append(tip(svg("rect", {
        class: className, x: left + j * width, y: PLOT_BOTTOM - height, width, height,
      }), `${names[i]}: ${words}`));
    });
    if (!edges) {
      root.append(svg("text", {
        class: "tick", x: PLOT.left + (i + 0.5) * group, y: PLOT.height - 6, "text-anchor": "middle",
      }, names[i]));
    }
  });
  for (const [at, words] of edges ?? []) {
    const x = PLOT.left + at * (PLOT_RIGHT - PLOT.left);
    root.append(svg("text", { class: "tick", x, y: PLOT.height - 6, "text-anchor": "middle" }, words));
  }
  baseline(root);
  if (!observed) noData(root, "No answered digits in this window");
  const items = [["plot-bar", "this window"]];
  if (reference) items.push(["plot-bar reference", "training (validation digits)"]);
  return plotCard(title, root, items);
}

function confidencePlot(report, served) {
  const names = served.confidence.map((_, i) => `confidence ${i * 10}–${(i + 1) * 10}%`);
  const high = served.confidence.at(-1);
  return distributionPlot({
    id: "monitor-confidence",
    title: "Confidence of the answered digits",
    label: `Confidence distribution of the answered digits in the window, in ten bins of 10%: ` +
      `${percent(high)} at 90% or more` +
      (report.reference ? `, against ${percent(report.reference.confidence.at(-1))} at training` : ""),
    shares: served.confidence,
    reference: report.reference?.confidence,
    names,
    edges: [0, 0.2, 0.4, 0.6, 0.8, 1].map((p) => [p, `${p * 100}%`]),
  });
}

function digitsPlot(report, served) {
  const most = served.digits.indexOf(Math.max(...served.digits));
  return distributionPlot({
    id: "monitor-digits",
    title: "Predicted digits",
    label: "Share of each predicted digit in the window" +
      (report.reference ? " against training" : "") +
      (served.predictions ? `: most often ${most} (${percent(served.digits[most])})` : ""),
    shares: served.digits,
    reference: report.reference?.digits,
    names: served.digits.map((_, d) => String(d)),
  });
}

function pValue(p) {
  return p < 0.001 ? p.toExponential(1) : p.toFixed(3);
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

/** The drift tests, or in words why there are none. */
function renderDrift(report, served) {
  const drift = report.drift;
  const limits = report.thresholds ?? {};
  const verdict = $("drift-verdict");
  const figures = $("drift-figures");
  const table = $("drift-stats");
  figures.replaceChildren();
  table.hidden = drift === null;
  if (drift === null) {
    verdict.className = "drift-none";
    verdict.textContent = report.reference === null
      ? "Not tested: this model has no training-time reference to compare with."
      : `Not tested: too few recent inputs (${served.predictions.toLocaleString()} in this ` +
        "window) for the test to say anything either way.";
    return;
  }
  const e = drift.embedding;
  const drifted = e.p_value < limits.drift_p_value && e.score >= limits.drift_score;
  verdict.className = drifted ? "drift-yes" : "drift-no";
  verdict.textContent = drifted
    ? "The inputs have drifted: the model sees something unlike its training data."
    : "No drift: the inputs look like the training data to the model.";
  const boxes = [
    ["MMD² score", e.score.toFixed(4), `drift at ${limits.drift_score} or more`,
      e.score >= limits.drift_score],
    ["p-value", pValue(e.p_value), `drift below ${limits.drift_p_value}`,
      e.p_value < limits.drift_p_value],
    ["Inputs tested", drift.inputs.toLocaleString(), "the newest of the window", false],
  ];
  for (const [name, value, note, over] of boxes) {
    const box = document.createElement("div");
    box.classList.toggle("over", over);
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    const small = document.createElement("small");
    small.textContent = note;
    box.append(dt, dd, small);
    figures.append(box);
  }
  $("drift-stats-caption").textContent = "Image statistics: shifted when the KS distance is " +
    `${limits.stat_distance} or more and p below ${limits.drift_p_value}.`;
  const rows = Object.entries(drift.stats).map(([name, s]) => {
    const row = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name;
    row.append(th);
    cell(row, s.mean.toPrecision(3));
    cell(row, s.reference_mean.toPrecision(3));
    cell(row, s.distance.toFixed(3));
    cell(row, pValue(s.p_value));
    cell(row, s.shifted ? "shifted" : "no", s.shifted ? "flag-bad" : "flag-ok");
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
}

function renderVersions(report) {
  const rows = report.versions.map((v) => {
    const row = document.createElement("tr");
    row.dataset.version = v.version;
    row.classList.toggle("serving", v.serving);
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = v.version;
    if (v.serving) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = "serving";
      th.append(" ", tag);
    }
    row.append(th);
    cell(row, v.predictions.toLocaleString());
    cell(row, share(v.estimated_accuracy));
    cell(row, measuredWords(v.measured), "measured");
    cell(row, share(v.not_digit_share));
    cell(row, share(v.low_confidence_share));
    return row;
  });
  $("versions-table").tBodies[0].replaceChildren(...rows);
}

function renderMonitor(report) {
  const served = report.versions.find((v) => v.serving) ?? report.versions[0];
  const headline = $("monitor-headline");
  headline.dataset.status = report.status;
  headline.textContent = report.headline;
  const warnings = $("monitor-warnings");
  warnings.hidden = !report.warnings.length;
  const list = document.createElement("ul");
  for (const words of report.warnings) {
    const item = document.createElement("li");
    item.textContent = words;
    list.append(item);
  }
  const lead = document.createElement("strong");
  lead.textContent = report.warnings.length === 1 ? "Warning" : "Warnings";
  warnings.replaceChildren(...(report.warnings.length ? [lead, list] : []));
  $("monitor-empty").hidden = served.predictions > 0;
  $("monitor-empty").textContent = `No predictions from the served model in the last ` +
    `${windowWords(report.hours)} yet: the plots fill in as it answers.`;
  const asked = Number($("monitor-bucket").value);
  $("monitor-updated").textContent = `Figures of ${when(report.generated_at)}, in buckets of ` +
    `${bucketWords(report.bucket_minutes)}` +
    (report.bucket_minutes !== asked ? " (widened by the server to keep the plots readable)." : ".");
  $("monitor-plots").replaceChildren(
    trafficPlot(report, served),
    accuracyPlot(report, served),
    sharesPlot(report, served),
    confidencePlot(report, served),
    digitsPlot(report, served),
  );
  renderDrift(report, served);
  renderVersions(report);
  $("monitor-details").hidden = false;
}

/** A bucket wider than the window would make a one-bar plot: not offered. */
function fitBuckets() {
  const minutes = Number($("monitor-hours").value) * 60;
  const select = $("monitor-bucket");
  for (const option of select.options) option.disabled = Number(option.value) > minutes;
  if (select.selectedOptions[0]?.disabled) {
    select.value = [...select.options].filter((o) => !o.disabled).at(-1).value;
  }
}

let monitorController = null;
async function loadMonitor() {
  monitorController?.abort();
  const controller = (monitorController = new AbortController());
  fitBuckets();
  const hours = $("monitor-hours").value;
  const minutes = $("monitor-bucket").value;
  const card = $("monitor-summary");
  card.setAttribute("aria-busy", "true");
  try {
    const report = await api(`/monitor?hours=${hours}&bucket_minutes=${minutes}`, {
      signal: controller.signal,
    });
    showError("monitor-error", null);
    renderMonitor(report);
  } catch (err) {
    if (controller.signal.aborted) return;
    // Old figures next to an error would be read as current: show the error alone.
    $("monitor-details").hidden = true;
    $("monitor-warnings").hidden = true;
    $("monitor-empty").hidden = true;
    $("monitor-headline").textContent = "";
    delete $("monitor-headline").dataset.status;
    $("monitor-updated").textContent = "";
    showError("monitor-error", err, "No figures to show. ");
  } finally {
    if (monitorController === controller) card.removeAttribute("aria-busy");
  }
}

// A new window comes with the bucket size that suits it; the bucket can then be changed.
const WINDOW_BUCKETS = { 1: "5", 24: "60", 168: "60" };
$("monitor-hours").addEventListener("change", () => {
  $("monitor-bucket").value = WINDOW_BUCKETS[$("monitor-hours").value] ?? $("monitor-bucket").value;
  loadMonitor();
});
$("monitor-bucket").addEventListener("change", loadMonitor);
$("monitor-refresh").addEventListener("click", loadMonitor);

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
  if (viewOf(tab) === "monitor") loadMonitor();
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
