// The console's only script: copy-id buttons, and live parts refreshed every 2 s by fetching
// the same page and swapping each [data-live-part] element's content. Without JavaScript
// every page still works; it just does not update by itself.
(function () {
  "use strict";
  var POLL_MS = 2000;

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (!button || !navigator.clipboard) return;
    navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });

  if (document.body.getAttribute("data-live") !== "1") return;
  var busy = false;

  function swap(fresh) {
    document.querySelectorAll("[data-live-part]").forEach(function (part) {
      var next = part.id ? fresh.getElementById(part.id) : null;
      if (next && next.innerHTML !== part.innerHTML) part.innerHTML = next.innerHTML;
    });
    document.body.setAttribute("data-updated", String(Date.now()));
  }

  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(location.href, { credentials: "same-origin", cache: "no-store", headers: { "X-Console-Live": "1" } })
      .then(function (response) {
        if (!response.ok || response.redirected) return null;
        return response.text();
      })
      .then(function (html) {
        if (html) swap(new DOMParser().parseFromString(html, "text/html"));
      })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { busy = false; });
  }

  setInterval(refresh, POLL_MS);
})();
