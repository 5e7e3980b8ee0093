// Review hotkeys: 1/2 choice, a/s/d/f strength, j/k/l safety, r the reason, Ctrl+Enter records, ] next item.
(function () {
  "use strict";
  var form = document.getElementById("adjudicate"), next = document.getElementById("next-item");
  var keys = {};
  if (form) {
    form.dataset.keys.split(" ").forEach(function (entry) {
      var parts = entry.split(":");
      if (parts.length === 3) keys[parts[0]] = { name: parts[1], value: parts[2] };
    });
  }

  function pick(k) {
    var el = form.elements[k.name];
    if (!el) return;
    if (el.tagName === "SELECT") el.value = k.value;
    else form.querySelectorAll("input[name=" + k.name + "]").forEach(function (r) { r.checked = r.value === k.value; });
  }

  document.addEventListener("keydown", function (e) {
    var t = e.target, typing = t.tagName === "TEXTAREA" || t.tagName === "SELECT" || (t.tagName === "INPUT" && t.type !== "radio");
    if (form && e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); return; }
    if (e.ctrlKey || e.altKey || e.metaKey) return;
    if (typing) { if (e.key === "Escape") { t.blur(); e.preventDefault(); } return; }
    if (e.key === "]" && next) { e.preventDefault(); next.click(); return; }
    if (!form) return;
    if (keys[e.key]) { pick(keys[e.key]); e.preventDefault(); }
    else if (e.key === "r") { e.preventDefault(); form.elements.reason.focus(); }
  });
})();
