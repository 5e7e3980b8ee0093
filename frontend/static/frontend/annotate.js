// The comparison workbench: keyboard-first, one round trip from submit to the next comparison.
// User text is only ever inserted with textContent.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var root = $("workbench"), form = $("judgement");
  var csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  var task = null, shownAt = 0, expiresAt = 0, clockSkew = 0, busy = false, timer = null;
  // Open comparisons left in the batch: counted by the server when the page loads, then counted down here.
  var remaining = null, remainingBatch = null;

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify(body || {}),
    }).then(function (r) {
      return r.json().catch(function () { return { error: { message: "The server answered " + r.status + "." } }; })
        .then(function (data) { data.httpStatus = r.status; return data; });
    });
  }

  function showError(message) { var e = $("error"); e.textContent = message; e.hidden = !message; }

  // While a request is in flight the form is locked: its controls are disabled (keys and clicks cannot change
  // the answer already sent) and the page says so.
  function lock(on) {
    busy = on;
    form.setAttribute("aria-busy", on ? "true" : "false");
    form.querySelectorAll("input, textarea, button").forEach(function (el) { el.disabled = on; });
  }

  function renderProgress(p) {
    if (p.batch_remaining !== null) { remaining = p.batch_remaining; remainingBatch = task ? task.batch_id : null; }
    else if (remaining !== null && (!task || task.batch_id !== remainingBatch)) remaining = null;
    var parts = [p.today + " today"];
    if (task) parts.push(p.in_batch + " in " + task.batch + (remaining !== null ? " · about " + remaining + " left" : ""));
    $("progress").textContent = "You: " + parts.join(" · ");
  }

  function tick() {
    if (!task) { $("lease").textContent = "--:--"; return; }
    var left = Math.max(0, Math.round((expiresAt - Date.now()) / 1000));
    var el = $("lease");
    el.textContent = left > 0 ? Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0") + " left" : "lease expired";
    el.className = left < 60 ? "warn" : "";
  }

  function render(data) {
    clockSkew = Date.parse(data.server_now) - Date.now();
    task = data.task;
    form.reset();
    // Keys go back to the shortcuts: a text box that kept focus after Enter would swallow them.
    if (document.activeElement && form.contains(document.activeElement)) document.activeElement.blur();
    showError("");
    if (!task) {
      $("task").hidden = true; $("empty").hidden = false;
      root.dataset.taskId = ""; root.dataset.state = "empty";
      $("domain").textContent = "–"; $("risk").hidden = true; $("batch").textContent = "";
      renderProgress(data.progress); tick();
      return;
    }
    var list = $("dialogue");
    list.textContent = "";
    task.dialogue.forEach(function (turn) {
      var li = document.createElement("li");
      li.className = "turn " + turn.role;
      var who = document.createElement("span"); who.className = "who"; who.textContent = turn.role === "user" ? "User" : "Assistant";
      var text = document.createElement("div"); text.className = "text"; text.textContent = turn.content;
      li.appendChild(who); li.appendChild(text); list.appendChild(li);
    });
    showResponse($("text-a"), task.response_a);
    showResponse($("text-b"), task.response_b);
    $("domain").textContent = task.domain;
    $("domain").className = "badge " + task.domain;
    $("risk").textContent = task.risk_category; $("risk").hidden = !task.risk_category;
    $("batch").textContent = task.batch;
    $("guide").href = root.dataset.guidelinesUrl + task.domain + "/";
    // Safety labels belong to safety tasks only (the server refuses one on a helpfulness task).
    form.querySelector("fieldset.safety").hidden = task.domain !== "safety";
    expiresAt = Date.parse(task.expires_at) - clockSkew;
    $("empty").hidden = true; $("task").hidden = false;
    root.dataset.taskId = String(task.task_id); root.dataset.state = "ready";
    renderProgress(data.progress); tick();
    shownAt = performance.now();
  }

  // An empty reply is real data (a model that stopped at once): say so instead of showing a blank box.
  function showResponse(el, text) {
    el.textContent = text || "(empty response)";
    el.classList.toggle("empty", !text);
  }

  function load() {
    lock(true);
    return post(root.dataset.nextUrl).then(function (data) {
      lock(false);
      if (data.error) { showError(data.error.message); return; }
      render(data);
    }, function () { lock(false); showError("Could not reach the server; check your connection and press Enter."); });
  }

  function value(name) { var el = form.querySelector("input[name=" + name + "]:checked"); return el ? el.value : ""; }

  function submit() {
    if (busy) return;
    if (!task) { load(); return; }
    var body = {
      choice: value("choice"), strength: value("strength"),
      safety_label: task.domain === "safety" ? value("safety_label") : "",
      note: $("note").value, continue_with: $("continue_with").value,
      time_on_task_ms: Math.round(performance.now() - shownAt),
    };
    if (!body.choice) { showError("Choose A or B first (keys 1 / 2)."); return; }
    if (!body.strength) { showError("Say by how much (keys a / s / d / f)."); return; }
    if (task.domain === "safety" && !body.safety_label) { showError("Safety prompts need a safety label (keys j / k / l)."); return; }
    lock(true);
    root.dataset.state = "submitting";
    $("status").textContent = "Sending your answer… the form is locked until it is saved.";
    post("/annotate/" + task.task_id + "/submit/", body).then(function (data) {
      lock(false);
      if (data.error) {
        root.dataset.state = "ready";
        if (data.error.code === "lease_expired" || data.error.code === "not_found" || data.error.code === "conflict") {
          $("status").textContent = data.error.message + " Loading the next comparison.";
          return load();
        }
        $("status").textContent = "";
        showError(data.error.message);
        return;
      }
      var s = data.submitted;
      if (remaining !== null && remaining > 0) remaining -= 1;
      $("status").textContent = "Saved comparison " + s.task_id + "." + (s.continuation_task_id ? " Your next message opens a new comparison when the model replies." : "");
      render(data);
      if (data.next_withheld) showError(data.next_withheld);
    }, function () { lock(false); root.dataset.state = "ready"; $("status").textContent = ""; showError("Could not reach the server; your answer was not saved. Press Enter to retry."); });
  }

  function skip() {
    if (busy || !task) return;
    lock(true);
    root.dataset.state = "submitting";
    post("/annotate/" + task.task_id + "/skip/").then(function (data) {
      lock(false);
      root.dataset.state = "ready";
      if (data.error) { showError(data.error.message); return load(); }
      $("status").textContent = "Skipped comparison " + data.skipped + ".";
      if (remaining !== null && remaining > 0) remaining -= 1;
      render(data);
    }, function () { lock(false); root.dataset.state = "ready"; showError("Could not reach the server."); });
  }

  function pick(name, val) {
    var el = form.querySelector("input[name=" + name + "][value='" + val + "']");
    if (el) { el.checked = true; showError(""); }
  }

  var keys = {};
  form.querySelectorAll("input[data-key]").forEach(function (el) { keys[el.dataset.key] = el; });

  // Elements whose own Enter does something (follow, press, open): Enter there is theirs, not a submit.
  var OWN_ENTER = { A: 1, BUTTON: 1, SUMMARY: 1, SELECT: 1 };

  document.addEventListener("keydown", function (e) {
    var t = e.target, typing = t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "radio");
    // Ctrl+Enter (Cmd+Enter on a Mac) submits from anywhere on the form, text boxes included.
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !e.altKey && task && (form.contains(t) || !typing)) {
      e.preventDefault(); submit(); return;
    }
    if (e.ctrlKey || e.altKey || e.metaKey) return;
    if (typing) {
      // In the note and continue boxes Enter is a new line (the browser's own); Esc leaves the box.
      if (e.key === "Escape") { t.blur(); e.preventDefault(); }
      return;
    }
    if (busy) {
      // The answer is on its way: keys must not change the form of the task already sent.
      if (e.key.length === 1 || e.key === "Enter") { e.preventDefault(); $("status").textContent = "Sending your answer… the form is locked until it is saved."; }
      return;
    }
    if (OWN_ENTER[t.tagName] && e.key === "Enter") return;
    if (root.dataset.state === "empty" && e.key === "Enter") { e.preventDefault(); load(); return; }
    if (!task) return;
    if (e.key === "Enter") { e.preventDefault(); submit(); return; }
    if (e.key === "1") pick("choice", "a");
    else if (e.key === "2") pick("choice", "b");
    else if (keys[e.key]) { keys[e.key].checked = true; showError(""); }
    else if (e.key === "n") $("note").focus();
    else if (e.key === "m") $("continue_with").focus();
    else if (e.key === "x") skip();
    else return;
    e.preventDefault();
  });
  form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
  $("skip").addEventListener("click", skip);
  $("again").addEventListener("click", load);
  timer = setInterval(tick, 1000);
  // With nothing to do, look again every 20 s.
  setInterval(function () { if (!task && !busy && !document.hidden) load(); }, 20000);
  load();
})();
