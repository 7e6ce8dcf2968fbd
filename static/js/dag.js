/* The DAG and Gantt pictures (tasks_app/dagsvg.py, tasks_app/gantt.py): live states, pan & zoom, click-through.
   Vanilla JS, no dependencies, no inline handlers.

   Live updates. The page carries the latest states as a JSON script element with id "dag-states":
       {{ states|json_script:"dag-states" }}       (states = tasks_app.dagsvg.state_codes(tasks))
   which renders <script id="dag-states" type="application/json">{"<task id>": ["running", 0.42], ...}</script>,
   node id -> [state, progress 0..1]. An element with id "dag-states" wrapping such a script (an htmx
   out-of-band panel) works too, as does <div id="dag-states" data-states='{...}'>. Once on load and whenever
   htmx swaps in content holding it (htmx:afterSwap; htmx:oobAfterSwap, which the ws extension fires too), the
   map is applied to every svg.dag on the page: each node's st-<state> class, data-state, state word, tooltip state
   line and progress bar. Ids not in the picture are ignored. window.cpDag.apply(svgEl, states) does it by hand.

   Pan & zoom (svg.dag, svg.gantt): the wheel zooms around the cursor, dragging pans, a double-click resets;
   all by rewriting the viewBox. A click on a DAG node (g.node, id "n-<id>") opens the svg's data-node-href
   with {id} replaced (dagsvg's default: /tasks/{id}/); without that attribute clicks do nothing. */
(function () {
  "use strict";
  var LIVE = { assigned: true, running: true };
  var NS = "http://www.w3.org/2000/svg";

  function nodesOf(svg) {  // id -> g.node, built once per svg element (a re-rendered svg is a new element)
    if (!svg._cpNodes) {
      svg._cpNodes = {};
      svg.querySelectorAll("g.node").forEach(function (g) { svg._cpNodes[g.id.slice(2)] = g; });
    }
    return svg._cpNodes;
  }

  function stateLine(state, progress) {  // the same words as dagsvg.state_line
    return "state: " + state + (LIVE[state] ? " · " + Math.round(progress * 100) + "%" : "");
  }

  function setBar(svg, g, state, progress) {
    var bar = g.querySelector("rect.pbar"), box = g.querySelector("rect.box");
    if (!LIVE[state] || !box) { if (bar) bar.remove(); return; }
    var p = (svg.getAttribute("data-pbar") || "4 3").split(" ").map(Number);  // inset, height
    if (!bar) {
      bar = document.createElementNS(NS, "rect");
      bar.setAttribute("class", "pbar");
      bar.setAttribute("x", +box.getAttribute("x") + p[0]);
      bar.setAttribute("y", +box.getAttribute("y") + +box.getAttribute("height") - p[0] - p[1]);
      bar.setAttribute("height", p[1]);
      box.after(bar);
    }
    bar.setAttribute("width", Math.round((+box.getAttribute("width") - 2 * p[0]) * progress));
  }

  function apply(svg, states) {
    var nodes = nodesOf(svg);
    Object.keys(states).forEach(function (id) {
      var g = nodes[id], v = states[id];
      if (!g) return;
      var state = String(Array.isArray(v) ? v[0] : v);
      var progress = Math.min(1, Math.max(0, Number(Array.isArray(v) ? v[1] : 0) || 0));
      if (g._cp === state + progress) return;  // unchanged since the last update: touch nothing
      g._cp = state + progress;
      var old = g.getAttribute("data-state");
      if (old !== state) {
        g.classList.remove("st-" + old);
        g.classList.add("st-" + state);
        g.setAttribute("data-state", state);
        var word = g.querySelector("text.st");
        if (word) word.textContent = state;
      }
      setBar(svg, g, state, progress);
      var tip = g.querySelector("title");
      if (tip) {
        var lines = tip.textContent.split("\n");
        lines[lines.length - 1] = stateLine(state, progress);
        tip.textContent = lines.join("\n");
      }
    });
  }

  var applied = null;  // the states element applied last: each one is applied once (see initSwapped)

  function applyFromPage(force) {
    var el = document.getElementById("dag-states");
    if (el && el.tagName !== "SCRIPT") el = el.querySelector('script[type="application/json"]') || el;
    if (!el || (el === applied && !force)) return;
    applied = el;
    var states;
    try { states = JSON.parse(el.tagName === "SCRIPT" ? el.textContent : el.getAttribute("data-states")); }
    catch (e) { return; }
    document.querySelectorAll("svg.dag").forEach(function (svg) { apply(svg, states); });
  }

  function initView(svg) {
    if (svg._cpView || !svg.getAttribute("viewBox")) return;
    svg._cpView = true;
    var home = svg.getAttribute("viewBox");
    var box = function () { return svg.getAttribute("viewBox").split(/[\s,]+/).map(Number); };
    var set = function (v) { svg.setAttribute("viewBox", v.join(" ")); };
    var drag = null, dragged = false;

    svg.addEventListener("wheel", function (e) {
      var m = svg.getScreenCTM();
      if (!m) return;
      e.preventDefault();
      var p = new DOMPoint(e.clientX, e.clientY).matrixTransform(m.inverse());  // the point under the cursor
      var v = box(), full = Number(home.split(/[\s,]+/)[2]);
      var w = v[2] * Math.exp(e.deltaY * (e.deltaMode ? 0.05 : 0.0015));  // deltaMode 1: lines, not pixels
      w = Math.min(full * 4, Math.max(full / 50, w));
      var f = w / v[2];  // keep p where it is on screen: scale the box around it
      set([p.x - (p.x - v[0]) * f, p.y - (p.y - v[1]) * f, v[2] * f, v[3] * f]);
    }, { passive: false });

    svg.addEventListener("pointerdown", function (e) {
      var m = svg.getScreenCTM();
      if (e.button !== 0 || !m) return;
      drag = { x: e.clientX, y: e.clientY, v: box(), s: m.a, id: e.pointerId, moved: false };
    });
    svg.addEventListener("pointermove", function (e) {
      if (!drag) return;
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;  // a click's jitter is not a pan
      if (!drag.moved) { drag.moved = true; svg.setPointerCapture(drag.id); svg.classList.add("panning"); }
      set([drag.v[0] - dx / drag.s, drag.v[1] - dy / drag.s, drag.v[2], drag.v[3]]);
    });
    var end = function () {
      dragged = !!(drag && drag.moved);  // swallow the click that ends a pan
      drag = null;
      svg.classList.remove("panning");
    };
    svg.addEventListener("pointerup", end);
    svg.addEventListener("pointercancel", end);
    svg.addEventListener("dblclick", function (e) { e.preventDefault(); set(home.split(/[\s,]+/)); });

    svg.addEventListener("click", function (e) {
      if (dragged) { dragged = false; return; }
      var g = e.target.closest && e.target.closest("g.node"), href = svg.getAttribute("data-node-href");
      if (!g || !href) return;
      var url = href.replace("{id}", encodeURIComponent(g.id.slice(2)));
      if (e.ctrlKey || e.metaKey) window.open(url, "_blank", "noopener"); else window.location.href = url;
    });
  }

  function init() {
    document.querySelectorAll("svg.dag, svg.gantt").forEach(initView);
    applyFromPage(true);
  }

  // One live push swaps several panels, and htmx fires an out-of-band after-swap event for every element
  // swapped so far (and for the socket's own element) after each of them: a dozen events a push. Each such
  // element is looked into once, and each states map applied once: scanning and applying a 1,000-task page
  // for every event was most of the page's script time. (A regular swap may fill a lasting element anew.)
  function initSwapped(e) {
    var root = e.target;
    if (!root || root.nodeType !== 1) return;
    if (e.type === "htmx:oobAfterSwap") {
      if (root._cpSeen) return;
      root._cpSeen = true;
    }
    if (root.matches("svg.dag, svg.gantt")) initView(root);
    else root.querySelectorAll("svg.dag, svg.gantt").forEach(initView);
    if (root.id === "dag-states" || root.querySelector("#dag-states")) applyFromPage();
  }

  document.addEventListener("htmx:afterSwap", initSwapped);
  document.addEventListener("htmx:oobAfterSwap", initSwapped);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
  window.cpDag = { apply: apply, applyFromPage: function () { applyFromPage(true); }, init: init };
})();
