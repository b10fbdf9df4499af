// persona console: plain JS (no library). Answers and file contents are shown as text (textContent), never as HTML.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const file = document.getElementById("rules-file");
  if (file) {
    file.addEventListener("change", () => {
      const f = file.files && file.files[0];
      if (!f) return;
      const reader = new FileReader();
      reader.onload = () => { document.getElementById("rules-text").value = String(reader.result); };
      reader.readAsText(f);
    });
  }
  const form = document.getElementById("try");
  if (form) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = document.getElementById("try-answers");
      out.replaceChildren();
      const waiting = document.createElement("p");
      waiting.textContent = "asking the serving API...";
      out.append(waiting);
      const body = new URLSearchParams(new FormData(form));
      let data;
      try {
        const r = await fetch(form.action, { method: "POST", body, credentials: "same-origin" });
        data = await r.json().catch(() => ({ error: "the console answered " + r.status }));
      } catch (e) {
        data = { error: String(e) };
      }
      out.replaceChildren();
      if (data.error) {
        const p = document.createElement("p");
        p.className = "flash error";
        p.textContent = data.error;
        out.append(p);
        return;
      }
      for (const a of data.answers) {
        const box = document.createElement("div");
        box.className = "answer";
        const h = document.createElement("h4");
        h.textContent = a.model + " (" + a.status + (a.revision ? ", x-persona-revision " + a.revision : "") + ")";
        const p = document.createElement("p");
        p.textContent = a.text == null ? "" : a.text;
        box.append(h, p);
        out.append(box);
      }
    });
  }
});
