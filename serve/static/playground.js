// The playground: streams POST /v1/completions (server-sent events) and colours each generated
// token by its probability under the model, with the likeliest alternatives in its tooltip.
// The colours are the notebook's (model/probview.py: probability_color): a log scale, red at
// 0.01% and below, yellow at 1%, green at 100%. Plain JavaScript, no libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let controller = null;

function probabilityColor(p) {
  const x = 1 + Math.log10(Math.max(p, 1e-12)) / 4; // 0 at 1e-4, 0.5 at 1e-2, 1 at 1
  return `hsl(${Math.round(120 * Math.max(0, Math.min(1, x)))}, 85%, 82%)`;
}

function pct(p) {
  return p >= 0.001 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(2)}%`;
}

function legend() {
  const marks = [[1e-4, "0.01%"], [1e-3, "0.1%"], [1e-2, "1%"], [0.1, "10%"], [1, "100%"]];
  $("legend").innerHTML = "probability: " + marks.map(
    ([p, label]) => `<span style="background:${probabilityColor(p)}">${label}</span>`).join(" ")
    + "; hover a token for the likeliest alternatives";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function connect() {
  try {
    const health = await (await fetch("/health")).json();
    modelId = health.model;
    $("model-info").textContent = health.status === "ok"
      ? `${health.model}: context ${health.context}, ${health.device}, weights ${health.weights}`
      : `${health.model}: ${health.status}…`;
    if (health.status !== "ok") setTimeout(connect, 1000);
  } catch (err) {
    $("model-info").textContent = "the server does not answer";
  }
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function request() {
  const body = {
    model: modelId, prompt: $("prompt").value, max_tokens: number("max_tokens"),
    temperature: number("temperature"), top_p: number("top_p"), stream: true,
    logprobs: number("logprobs") ?? 5,
  };
  const topK = number("top_k");
  if (topK) body.top_k = topK;
  const penalty = number("repetition_penalty");
  if (penalty !== null && penalty !== 1) body.repetition_penalty = penalty;
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  const stops = $("stop").value.split(",").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"))
    .filter((s) => s.length > 0);
  if (stops.length) body.stop = stops.slice(0, 4);
  return body;
}

// The output: the generated text, one span per token (its text is the slice of the whole text
// from its text_offset to the next token's).
class Output {
  constructor() {
    this.text = "";
    this.spans = []; // {start, el}
    $("echo").textContent = "";
    $("tokens").textContent = "";
  }

  add(choice) {
    this.text += choice.text;
    const lp = choice.logprobs;
    if (lp) {
      for (let i = 0; i < lp.tokens.length; i++) {
        const el = document.createElement("span");
        el.className = "lm-tok";
        const logprob = lp.token_logprobs[i];
        const top = lp.top_logprobs[i] || {};
        if (logprob === null) {
          el.title = `${JSON.stringify(lp.tokens[i])}: no score`;
        } else {
          const p = Math.exp(logprob);
          el.style.background = probabilityColor(p);
          el.dataset.prob = String(p);
          const alts = Object.entries(top).sort((a, b) => b[1] - a[1]);
          const rank = alts.findIndex(([t]) => t === lp.tokens[i]);
          el.title = `${JSON.stringify(lp.tokens[i])}: ${pct(p)}`
            + (rank >= 0 ? `, rank ${rank + 1}` : "")
            + alts.map(([t, l]) => `\n  ${JSON.stringify(t)} ${pct(Math.exp(l))}`).join("");
        }
        this.spans.push({ start: lp.text_offset[i], el });
        $("tokens").appendChild(el);
      }
    }
    this.render(lp ? lp.tokens.length + 1 : 1);
  }

  render(last) {
    if (!this.spans.length) {
      $("tokens").textContent = this.text;
      return;
    }
    for (let i = Math.max(0, this.spans.length - last); i < this.spans.length; i++) {
      const end = i + 1 < this.spans.length ? this.spans[i + 1].start : this.text.length;
      this.spans[i].el.textContent = this.text.slice(this.spans[i].start, end);
    }
  }
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function generate() {
  if (!modelId) await connect();
  const body = request();
  const out = new Output();
  $("echo").textContent = body.prompt;
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  setStatus("generating…");
  const start = performance.now();
  let first = null;
  let tokens = 0;
  let finish = null;
  const stats = () => {
    const now = performance.now();
    const rate = first !== null && now > first ? (tokens - 1) / ((now - first) / 1000) : 0;
    $("stats").textContent = `${tokens} tokens` + (first === null ? "" :
      `, ${rate.toFixed(1)} tokens/s, first token after ${Math.round(first - start)} ms`)
      + (finish ? `; finish_reason: ${finish}` : "");
  };
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${resp.status}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          const n = choice.logprobs ? choice.logprobs.tokens.length : 0;
          if (n && first === null) first = performance.now();
          tokens += n;
          out.add(choice);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        stats();
      }
    }
    setStatus(`done (${finish})`);
  } catch (err) {
    if (err.name === "AbortError") setStatus("stopped");
    else setStatus(`error: ${err.message}`, true);
  } finally {
    stats();
    controller = null;
    $("generate").disabled = false;
    $("stop-button").disabled = true;
  }
}

$("generate").addEventListener("click", generate);
$("stop-button").addEventListener("click", () => { if (controller) controller.abort(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && controller === null) generate();
});
$("api_key").value = localStorage.getItem("small-lm-api-key") || "";
$("api_key").addEventListener("change", () => localStorage.setItem("small-lm-api-key", $("api_key").value));
legend();
connect();
