// The web chat: streams /v1/chat/completions with fetch and parses the server-sent events itself,
// renders replies with Markdown.render, shows tool calls and token usage. No external resources.
"use strict";

(function () {
  const $ = function (id) { return document.getElementById(id); };
  const els = {
    model: $("model"), messages: $("messages"), empty: $("empty"), input: $("input"), form: $("composer"),
    send: $("send"), stop: $("stop"), status: $("status"), settings: $("settings"),
    settingsToggle: $("settings-toggle"), newChat: $("new-chat"), system: $("system"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"), tools: $("tools"),
  };
  let history = [];
  let controller = null;

  // ------------------------------------------------------------------ settings (kept in localStorage)
  const saved = ["system", "temperature", "maxTokens", "apiKey", "tools"];
  saved.forEach(function (k) {
    const v = localStorage.getItem("qwen3coder." + k);
    if (v !== null) els[k].value = v;
    els[k].addEventListener("change", function () { localStorage.setItem("qwen3coder." + k, els[k].value); });
  });
  els.settingsToggle.addEventListener("click", function () {
    els.settings.hidden = !els.settings.hidden;
    els.settingsToggle.setAttribute("aria-expanded", String(!els.settings.hidden));
  });

  function headers() {
    const h = {"Content-Type": "application/json"};
    if (els.apiKey.value) h["Authorization"] = "Bearer " + els.apiKey.value;
    return h;
  }

  function setStatus(text, isError) {
    els.status.textContent = text || "";
    els.status.className = "status" + (isError ? " error" : "");
  }

  async function loadModels() {
    try {
      const r = await fetch("/v1/models", {headers: headers()});
      const body = await r.json();
      if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
      els.model.innerHTML = "";
      body.data.forEach(function (m) {
        const o = document.createElement("option");
        o.value = o.textContent = m.id;
        els.model.appendChild(o);
      });
    } catch (e) {
      setStatus("Could not list models: " + e.message + " (set the API key in Settings?)", true);
    }
  }

  // ------------------------------------------------------------------ rendering
  function addMessage(role) {
    els.empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    const extra = document.createElement("div");
    extra.className = "extra";
    wrap.append(who, body, extra);
    els.messages.appendChild(wrap);
    return {wrap: wrap, body: body, extra: extra};
  }

  function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

  function renderToolCalls(box, calls) {
    box.querySelectorAll(".tool-call").forEach(function (n) { n.remove(); });
    calls.forEach(function (c) {
      const div = document.createElement("div");
      div.className = "tool-call";
      let args = c.function.arguments;
      try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* still streaming */ }
      div.innerHTML = '<div class="tool-head"><span class="badge">tool call</span> <code>' +
        Markdown.escapeHtml(c.function.name) + "</code></div><pre>" + Markdown.escapeHtml(args) + "</pre>";
      box.prepend(div);
    });
  }

  document.addEventListener("click", function (ev) {
    const btn = ev.target.closest ? ev.target.closest("button.copy") : null;
    if (!btn) return;
    const code = btn.closest(".code").querySelector("code").textContent;
    navigator.clipboard && navigator.clipboard.writeText(code);
    btn.textContent = "copied";
    setTimeout(function () { btn.textContent = "copy"; }, 1200);
  });

  // ------------------------------------------------------------------ streaming
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) !== -1) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter(function (l) { return l.startsWith("data:"); })
          .map(function (l) { return l.slice(5).trimStart(); }).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function send(text) {
    let tools = null;
    if (els.tools.value.trim()) {
      try { tools = JSON.parse(els.tools.value); } catch (e) { setStatus("Tools: not valid JSON: " + e.message, true); return; }
    }
    history.push({role: "user", content: text});
    addMessage("user").body.innerHTML = Markdown.render(text, false);
    const reply = addMessage("assistant");
    reply.wrap.classList.add("streaming");
    reply.body.innerHTML = '<span class="cursor"></span>';
    scrollDown();

    const messages = (els.system.value.trim() ? [{role: "system", content: els.system.value.trim()}] : []).concat(history);
    const body = {model: els.model.value || undefined, messages: messages, stream: true,
      stream_options: {include_usage: true}};
    const temp = parseFloat(els.temperature.value);
    if (!isNaN(temp)) body.temperature = temp;
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    if (tools) body.tools = tools;

    controller = new AbortController();
    els.send.hidden = true; els.stop.hidden = false;
    setStatus("");
    const started = performance.now();
    let content = "", finish = null, usage = null;
    const calls = [];
    try {
      const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
        signal: controller.signal});
      if (!r.ok) {
        const err = await r.json().catch(function () { return {}; });
        throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
      }
      for await (const ev of sseEvents(r)) {
        if (ev.error) throw new Error(ev.error.message);
        if (ev.usage && (!ev.choices || !ev.choices.length)) usage = ev.usage;
        (ev.choices || []).forEach(function (ch) {
          const d = ch.delta || {};
          if (d.content) content += d.content;
          (d.tool_calls || []).forEach(function (tc) {
            if (!calls[tc.index]) calls[tc.index] = {id: tc.id, type: "function", function: {name: "", arguments: ""}};
            const fn = tc.function || {};
            if (fn.name) calls[tc.index].function.name = fn.name;
            if (fn.arguments) calls[tc.index].function.arguments += fn.arguments;
          });
          if (ch.finish_reason) finish = ch.finish_reason;
        });
        reply.body.innerHTML = Markdown.render(content, true) + (finish ? "" : '<span class="cursor"></span>');
        renderToolCalls(reply.extra, calls.filter(Boolean));
        scrollDown();
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else { setStatus(e.message, true); reply.wrap.classList.add("failed"); }
    } finally {
      controller = null;
      els.send.hidden = false; els.stop.hidden = true;
      reply.wrap.classList.remove("streaming");
    }
    reply.body.innerHTML = content ? Markdown.render(content, false) : (calls.length ? "" : '<span class="muted">(no text)</span>');
    const msg = {role: "assistant", content: content};
    if (calls.length) msg.tool_calls = calls.filter(Boolean);
    history.push(msg);
    const meta = document.createElement("div");
    meta.className = "usage";
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    meta.textContent = (usage ? usage.prompt_tokens + " prompt · " + usage.completion_tokens + " completion tokens · " : "") +
      (finish ? "finish: " + finish + " · " : "") + secs + " s";
    reply.extra.appendChild(meta);
    scrollDown();
  }

  // ------------------------------------------------------------------ composer
  function autoGrow() { els.input.style.height = "auto"; els.input.style.height = Math.min(els.input.scrollHeight, 220) + "px"; }
  els.input.addEventListener("input", autoGrow);
  els.input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); els.form.requestSubmit(); }
  });
  els.form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const text = els.input.value.trim();
    if (!text || controller) return;
    els.input.value = ""; autoGrow();
    send(text);
  });
  els.stop.addEventListener("click", function () { if (controller) controller.abort(); });
  els.newChat.addEventListener("click", function () {
    if (controller) controller.abort();
    history = [];
    els.messages.querySelectorAll(".msg").forEach(function (n) { n.remove(); });
    els.empty.hidden = false;
    setStatus("");
  });
  loadModels();
})();
