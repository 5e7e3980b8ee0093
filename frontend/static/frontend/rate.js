// Rating with the keyboard alone: number keys choose a point of the scale, Enter submits. While the submit is in
// flight the form is locked (keys pressed then cannot change the rating already sent) and says so.
(function () {
  "use strict";
  var form = document.getElementById("rate-form");
  if (!form) return;
  var started = Date.now();
  var points = parseInt(form.dataset.points, 10);
  var sent = false;
  function lock() {
    sent = true;
    form.querySelectorAll("input, textarea, button").forEach(function (el) { if (el.type !== "hidden") el.setAttribute("aria-disabled", "true"); });
    form.classList.add("locked");
    document.getElementById("rate-status").textContent = "Submitting…";
  }
  form.addEventListener("submit", function (event) {
    if (sent) { event.preventDefault(); return; }
    form.elements.time_on_task_ms.value = String(Date.now() - started);
    lock();
  });
  document.addEventListener("keydown", function (event) {
    if (sent) { event.preventDefault(); return; }
    var inNote = event.target && event.target.id === "note";
    if (event.key === "Enter" && !event.shiftKey) {
      var chosen = form.querySelector("input[name=score]:checked");
      if (chosen) { event.preventDefault(); form.requestSubmit(); }
      return;
    }
    if (inNote || event.ctrlKey || event.metaKey || event.altKey) return;
    var n = parseInt(event.key, 10);
    if (n >= 1 && n <= points) {
      var radio = form.querySelector("input[name=score][value='" + n + "']");
      if (radio) { radio.checked = true; event.preventDefault(); }
    }
  });
})();
