// Keyboard ranking: on the page (outside text fields) a letter appends that reply to the ranking,
// "=" ties the next one with the last, Backspace removes the last, Enter submits once every reply is
// placed; or drag a reply onto another. The text field stays the truth.
"use strict";
(function () {
  const input = document.getElementById("ranking");
  const list = document.querySelector(".replies");
  if (!input || !list) return;
  const letters = list.dataset.letters.split("");
  const preview = document.getElementById("ranking-preview");
  let tieNext = false;

  function groups() {
    return input.value.split(",").map(g => g.split("=").map(s => s.trim().toUpperCase()).filter(Boolean))
      .filter(g => g.length);
  }
  function write(gs) {
    input.value = gs.map(g => g.join("=")).join(", ");
    input.dispatchEvent(new Event("input", {bubbles: true}));  // renders, and the autosave sees it
  }
  function render() {
    const gs = groups();
    const used = new Set(gs.flat());
    letters.forEach(l => document.getElementById("reply-" + l).classList.toggle("picked", used.has(l)));
    const left = letters.filter(l => !used.has(l));
    preview.textContent = gs.length ? "Best to worst: " + gs.map(g => g.join(" = ")).join("  >  ") +
      (left.length ? "   (still to place: " + left.join(", ") + ")" : "") : "";
  }
  document.addEventListener("keydown", e => {
    const t = e.target;
    if (t.matches("input, textarea, select, button, a, summary") || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toUpperCase();
    const gs = groups();
    if (letters.includes(k) && !gs.flat().includes(k)) {
      if (tieNext && gs.length) gs[gs.length - 1].push(k); else gs.push([k]);
      tieNext = false;
      write(gs);
      e.preventDefault();
    } else if (e.key === "=") {
      tieNext = true;
      e.preventDefault();
    } else if (e.key === "Backspace" && gs.length) {
      gs[gs.length - 1].pop();
      write(gs.filter(g => g.length));
      e.preventDefault();
    } else if (e.key === "Enter" && gs.flat().length === letters.length) {
      input.form.requestSubmit(input.form.querySelector('button[value="submit"]'));
      e.preventDefault();
    }
  });
  // Drag: drop reply X on reply Y to rank X just above Y (or last, while Y is not placed yet)
  let dragged = null;
  letters.forEach(l => {
    const card = document.getElementById("reply-" + l);
    card.draggable = true;
    card.addEventListener("dragstart", e => { dragged = l; e.dataTransfer.setData("text/plain", l); });
    card.addEventListener("dragover", e => e.preventDefault());
    card.addEventListener("drop", e => {
      e.preventDefault();
      const x = dragged || e.dataTransfer.getData("text/plain");
      dragged = null;
      if (!letters.includes(x) || x === l) return;
      const gs = groups().map(g => g.filter(y => y !== x)).filter(g => g.length);
      const at = gs.findIndex(g => g.includes(l));
      if (at >= 0) gs.splice(at, 0, [x]); else gs.push([x]);
      write(gs);
    });
  });
  input.addEventListener("input", render);
  render();
})();

// Autosave: a form with data-autosave="URL" posts its fields there (CSRF included) a second after the
// last keystroke, and before the page is left, so a closed tab loses nothing typed.
(function () {
  const form = document.querySelector("form[data-autosave]");
  if (!form) return;
  const status = document.getElementById("autosave-status");
  let timer = null, dirty = false;
  function save(keepalive) {
    if (!dirty) return;
    dirty = false;
    const body = new URLSearchParams(new FormData(form));
    body.delete("action");
    fetch(form.dataset.autosave, {method: "POST", body: body, keepalive: !!keepalive, credentials: "same-origin"})
      .then(r => {
        // a session that ended answers with a redirect to the login page: that is not a save
        const saved = r.ok && !r.redirected;
        if (!saved) dirty = true;
        if (status) status.textContent = saved ? "Saved." : r.redirected
          ? "Not saved: your session ended. Log in again in another tab, then reload; what you typed before is kept."
          : "Not saved (" + r.status + ")";
      })
      .catch(() => { dirty = true; if (status) status.textContent = "Offline: not saved yet."; });
  }
  form.addEventListener("input", () => {
    dirty = true;
    if (status) status.textContent = "Saving…";
    clearTimeout(timer);
    timer = setTimeout(() => save(false), 1000);
  });
  window.addEventListener("pagehide", () => save(true));
})();
