// The waiting page's one script: every two seconds it asks for the same
// URL again and, while the answer is still the waiting page, copies the
// progress into this page (its status line is a polite live region, so a
// screen reader hears each step and keeps its place); any other answer
// (the app, or the page that says the wake failed) is shown by loading the
// URL. Without script, a <noscript> refresh does the same by reloading.
(function () {
  "use strict";
  function here(id) {
    return document.getElementById(id);
  }
  function later() {
    setTimeout(poll, 2000);
  }
  function poll() {
    fetch(location.href, { headers: { Accept: "text/html" }, cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        return r.text().then(function (text) {
          var next = new DOMParser().parseFromString(text, "text/html");
          var s = next.getElementById("dormant-status");
          var e = next.getElementById("dormant-elapsed");
          var b = next.getElementById("dormant-progress");
          if (r.status !== 503 || !s || !e || !b) {
            location.reload();
            return;
          }
          if (s.textContent !== here("dormant-status").textContent) {
            here("dormant-status").textContent = s.textContent;
          }
          here("dormant-elapsed").textContent = e.textContent;
          here("dormant-progress").value = b.value;
          here("dormant-progress").textContent = b.textContent;
          later();
        });
      })
      .catch(later);
  }
  later();
})();
