// The training-runs panel refreshes itself: every 3 s while a run is queued or running, every 10 s otherwise, so a
// run queued elsewhere (the API, a command, another researcher) appears without a reload.
(function () {
  "use strict";
  var last = 0;
  function poll() {
    var panel = document.getElementById("runs");
    if (!panel || document.hidden) return;
    var every = panel.dataset.live === "1" ? 3000 : 10000;
    if (Date.now() - last < every) return;
    last = Date.now();
    fetch(panel.dataset.url, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html) panel.outerHTML = html; });
  }
  last = Date.now();
  setInterval(poll, 1000);
})();
