// Chat: forms marked data-stream (send, regenerate) post with fetch and read the reply as server-sent
// events through a ReadableStream, showing the text as it arrives; at the end the page reloads with the
// stored reply and its buttons. Without JS (or if fetch fails) the form posts normally and the server
// redirects once the reply is complete. Ctrl+Enter in the message box sends.
"use strict";
(function () {
  const forms = document.querySelectorAll("form[data-stream]");
  if (!forms.length) return;
  const status = document.getElementById("stream-status");
  const conversation = document.getElementById("conversation");

  function liveTurn() {
    const turn = document.createElement("article");
    turn.className = "turn assistant";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = "assistant";
    const pre = document.createElement("pre");
    turn.append(role, pre);
    if (conversation) conversation.append(turn);
    return pre;
  }

  async function stream(form) {
    const body = new FormData(form);
    form.querySelectorAll("button").forEach(b => { b.disabled = true; });
    if (status) status.textContent = "The model is writing…";
    const resp = await fetch(form.action, { method: "POST", body, headers: { Accept: "text/event-stream" },
                                            credentials: "same-origin" });
    if (!resp.ok || !resp.body || !(resp.headers.get("content-type") || "").startsWith("text/event-stream")) {
      document.open(); document.write(await resp.text()); document.close();  // the server's error page
      return;
    }
    const out = liveTurn();  // textContent only: model text is never parsed as HTML
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).replace(/^data: /, "");
        buf = buf.slice(cut + 2);
        const ev = JSON.parse(line);
        if (ev.delta) out.textContent += ev.delta;
        if (ev.error && status) status.textContent = "Error: " + ev.error;
        if (ev.done) { window.location.assign(ev.url); return; }
      }
    }
  }

  forms.forEach(form => {
    form.addEventListener("submit", e => {
      if (!window.fetch || !window.TextDecoderStream) return;  // old browser: plain post
      e.preventDefault();
      stream(form).catch(() => form.submit());
    });
    const box = form.querySelector("textarea");
    if (box) box.addEventListener("keydown", e => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
    });
  });
})();
