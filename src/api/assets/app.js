// dormant's page: follows a wake or a sleep until it is done, and sends
// the browser's time-zone offset with "prevent wake-up until". Everything
// else works without it.
"use strict";

(function () {
  for (const field of document.querySelectorAll("input.tz-offset")) {
    // Minutes to add to local time to get UTC.
    field.value = String(new Date().getTimezoneOffset());
  }

  const live = document.getElementById("live");
  if (!live) {
    return;
  }
  const url = live.dataset.poll;
  const watch = live.dataset.watch;
  const state = document.getElementById("state");
  const status = document.getElementById("status");
  const progress = document.getElementById("progress");
  const progressText = document.getElementById("progress-text");

  function statusText(t) {
    const p = t.progress || { workloads: 0, ready: 0, done: false };
    switch (t.state) {
      case "awake":
        return p.done ? "awake and ready" : "awake, " + p.ready + " of " + p.workloads + " workloads ready";
      case "waking":
        return "waking: " + p.ready + " of " + p.workloads + " workloads ready";
      case "sleeping":
        return "going to sleep";
      case "asleep":
        return "asleep";
      case "invalid":
        return "left as it is until its policy or annotations are fixed";
      default:
        return "";
    }
  }

  function finished(t) {
    const done = t.progress && t.progress.done;
    if (watch === "wake") {
      return t.state === "awake" && done;
    }
    if (watch === "sleep") {
      return t.state === "asleep";
    }
    return t.state !== "waking" && t.state !== "sleeping";
  }

  function show(t) {
    state.textContent = t.state;
    state.className = "state state-" + t.state;
    live.dataset.state = t.state;
    status.textContent = statusText(t);
    const p = t.progress || { workloads: 0, ready: 0 };
    progress.max = p.workloads;
    progress.value = p.ready;
    progress.textContent = p.ready + " of " + p.workloads;
    progressText.textContent = p.ready + " of " + p.workloads;
  }

  let polls = 0;
  async function poll() {
    polls += 1;
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!r.ok) {
        status.textContent = "cannot follow it (" + r.status + "); reload the page";
        return;
      }
      const x = await r.json();
      show(x.summary);
      if (finished(x.summary)) {
        live.dataset.done = "true";
        return;
      }
    } catch (e) {
      status.textContent = "cannot follow it; reload the page";
      return;
    }
    // At most ten minutes of following.
    if (polls < 600) {
      setTimeout(poll, 1000);
    }
  }

  const moving = live.dataset.state === "waking" || live.dataset.state === "sleeping";
  if (watch || moving) {
    setTimeout(poll, 500);
  }
})();
