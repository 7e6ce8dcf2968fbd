/* The workflow change page (tasks_app/admin.py, templates/admin/tasks_app/workflow/change_form.html).

   Key suggestions: a deps field offers the keys of the workflow's task rows as they stand in the form (not as
   saved: a row typed a second ago counts), minus its own key and the keys it already lists, through the
   <datalist id="workflow-keys">. On a single task's page (no rows) the keys come from the JSON script
   "workflow-key-list".

   Live preview: whenever a task row changes (typing, a row added, removed or marked for deletion), the form is
   posted to data-preview-url, which answers the DAG picture as HTML (tasks_app/workflow_preview.py); the
   answer replaces the picture. Edits are debounced, and an answer older than the latest request is dropped,
   so a slow answer never overwrites a newer picture. Without data-preview-url (a read-only page, or a
   workflow too big to edit in place) the saved picture (data-url) is shown once.

   JSON fields (params, defaults) say as they are typed when they are not a JSON object. Vanilla JS, no inline
   handlers. */
(function () {
  "use strict";
  var DEBOUNCE_MS = 250;

  function start() {
    var form = document.getElementById("workflow_form") || document.getElementById("workflowtask_form");
    var list = document.getElementById("workflow-keys");
    var box = document.getElementById("dag-preview");
    if (!form) { return; }

    checkJsonFields(form);

    var saved = document.getElementById("workflow-key-list");
    var savedKeys = saved ? JSON.parse(saved.textContent) : [];
    function taskKeys() {
      var rows = form.querySelectorAll('input[name^="tasks-"][name$="-key"]');
      if (!rows.length) { return savedKeys; }
      return Array.prototype.map.call(rows, function (input) { return input.value.trim(); }).filter(Boolean);
    }

    function suggest(input) {
      if (!list) { return; }
      var value = input.value, cut = value.lastIndexOf(",");
      var head = cut < 0 ? "" : value.slice(0, cut + 1) + " ";
      var used = value.split(/[\s,]+/).filter(Boolean);
      var ownInput = form.querySelector('input[name="' + input.name.replace(/deps_keys$/, "key") + '"]');
      var own = ownInput ? ownInput.value.trim() : "";
      list.textContent = "";
      taskKeys().forEach(function (key) {
        if (key === own || used.indexOf(key) >= 0) { return; }
        var option = document.createElement("option");
        option.value = head + key;
        list.appendChild(option);
      });
    }

    ["focusin", "input"].forEach(function (type) {
      form.addEventListener(type, function (event) {
        var t = event.target;
        if (t.classList && t.classList.contains("deps-input")) { suggest(t); }
      });
    });

    if (!box) { return; }
    var latest = 0;

    function show(seq, response) {
      return response.text().then(function (text) {
        if (seq !== latest) { return; }  // a newer request is on its way: its answer wins
        box.classList.remove("stale");
        if (response.ok) {
          box.innerHTML = text;  // server-rendered, every text escaped (workflow_preview.picture)
          if (window.cpDag) { window.cpDag.init(); }
        } else {
          box.textContent = "The picture could not be drawn (" + response.status + ").";
        }
        box.dispatchEvent(new CustomEvent("dag-preview:drawn", { bubbles: true }));
      });
    }

    function fetchPicture(url, options) {
      var seq = ++latest;
      box.classList.add("stale");
      return fetch(url, Object.assign({ credentials: "same-origin" }, options || {}))
        .then(function (response) { return show(seq, response); })
        .catch(function () {
          if (seq === latest) { box.classList.remove("stale"); box.textContent = "The picture could not be drawn (network)."; }
        });
    }

    var live = box.dataset.previewUrl;
    function redraw() {
      fetchPicture(live, { method: "POST", body: new FormData(form) });
    }

    if (!live) {
      if (box.dataset.url) { fetchPicture(box.dataset.url); }
      return;
    }
    var timer = null;
    function soon() {
      clearTimeout(timer);
      timer = setTimeout(redraw, DEBOUNCE_MS);
    }
    function isTaskField(el) { return el && el.name && el.name.indexOf("tasks-") === 0; }
    form.addEventListener("input", function (event) { if (isTaskField(event.target)) { soon(); } });
    form.addEventListener("change", function (event) { if (isTaskField(event.target)) { soon(); } });
    // Django's inlines announce added and removed rows with these events.
    document.addEventListener("formset:added", soon);
    document.addEventListener("formset:removed", soon);
    redraw();
  }

  // JSON object fields (JSONObjectWidget): a line beside the field says at once what JSON.parse says of it.
  function checkJsonFields(form) {
    function check(field) {
      var note = field.nextElementSibling;
      if (!note || !note.classList.contains("json-problem")) {
        note = document.createElement("p");
        note.className = "json-problem errornote";
        field.insertAdjacentElement("afterend", note);
      }
      var text = field.value.trim(), problem = "";
      if (text) {
        try {
          var value = JSON.parse(text);
          if (value === null || typeof value !== "object" || Array.isArray(value)) { problem = "must be a JSON object, {…}"; }
        } catch (err) {
          problem = "not valid JSON: " + err.message;
        }
      }
      note.textContent = problem;
      note.hidden = !problem;
    }
    form.addEventListener("input", function (event) {
      if (event.target.hasAttribute && event.target.hasAttribute("data-json-object")) { check(event.target); }
    });
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
