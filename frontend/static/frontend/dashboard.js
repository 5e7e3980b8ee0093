// Live training runs: while a run is queued or running, refresh that panel every 5 s.
(function () {
  "use strict";
  function poll() {
    var panel = document.getElementById("runs");
    if (!panel || panel.dataset.live !== "1" || document.hidden) return;
    fetch(panel.dataset.url, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html) panel.outerHTML = html; });
  }
  setInterval(poll, 5000);
})();
