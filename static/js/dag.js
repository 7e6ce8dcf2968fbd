/* The DAG and Gantt pictures: the run page's DAG drawn on a canvas from compact data, and pan & zoom for the
   server-drawn SVG pictures (the Gantt chart, tasks_app/dashboard/gantt.py; the admin's workflow preview,
   tasks_app/dashboard/dagsvg.render_svg). Vanilla JS, no dependencies, no inline handlers.

   The run page's DAG. A JSON data island (<script type="application/json" id="dag-data">, never executed, so
   the 'self'-only CSP allows it) holds the laid-out graph, tasks_app/dashboard/dagsvg.picture_data plus
   picture_states: per node its key, sub-column and row, its state (an index into `states`), the live ones'
   progress, and the edges as index pairs. The element `.dag-wrap[data-dag-source=<island id>]` gets a canvas
   drawing of it: edges, boxes coloured by state (the palette of static/css/dag.css, so the theme applies),
   progress bars, and keys (and, in the normal style, state words and diffstats) once they are legible. Only
   what is in view is drawn: 10,000 tasks cost a few milliseconds a frame. Drag pans, the wheel and the +/-
   buttons zoom, a double-click resets, "Fit" shows everything; the find form (`[data-dag-find]`) centres and
   rings the node whose key matches (exactly, else the first containing the text); a click on a node opens its
   data's `href` with {key} replaced; hovering shows a node's key, title, estimate and state as a tooltip.

   Live updates. The states panel (id "dag-states", an htmx out-of-band panel) wraps a JSON script with
   {key: state} or {key: [state, progress 0..1]} for the tasks whose state changed (the whole map on a
   socket's connect). Once on load and whenever htmx swaps it in, the map is applied to every drawing and the
   changed nodes repainted in the next frame; then a "cp:dag-drawn" event (detail: {changed: [[key, state],
   ...], at: the frame's time}) tells observers (the browser bench, tests) that the picture shows them.
   Keys not in the picture are ignored. window.cpDag.views lists the drawings; each has find(key),
   stateOf(key), labelsOf(key) (the words drawn on the node), screenOf(key) (its centre in client pixels),
   painted (frames drawn) and firstPaintMs (when the first was, on the page's performance.now() clock).

   Pan & zoom (svg.dag, svg.gantt): the wheel zooms around the cursor, dragging pans, a double-click resets;
   all by rewriting the viewBox. A click on an SVG DAG node (g.node, id "n-<id>") opens the svg's
   data-node-href with {id} replaced; without that attribute clicks do nothing. */
(function () {
  "use strict";
  var LIVE = { assigned: true, running: true };

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


  // --- The run page's DAG on a canvas -------------------------------------------------------------------

  function stateLine(state, progress) {  // the same words as dagsvg.state_line
    return "state: " + state + (LIVE[state] ? " · " + Math.round(progress * 100) + "%" : "");
  }

  function fmtDuration(s) {  // the same as gantt.fmt_duration
    if (s < 10 && s !== Math.floor(s)) return s.toFixed(1) + "s";
    s = Math.round(s);
    if (s < 60) return s + "s";
    if (s < 3600) { var m = Math.floor(s / 60), sec = s % 60; return m + "m" + (sec ? (sec < 10 ? "0" : "") + sec + "s" : ""); }
    var h = Math.floor(s / 3600), rest = s % 3600;
    return h + "h" + (rest >= 60 ? (rest < 600 ? "0" : "") + Math.floor(rest / 60) + "m" : "");
  }

  function trunc(text, n) { return text.length <= n ? text : text.slice(0, n - 1) + "…"; }

  function DagView(wrap, data) {
    var self = this, st = data.style;
    this.wrap = wrap;
    this.data = data;
    this.canvas = wrap.querySelector("canvas") || wrap.appendChild(document.createElement("canvas"));
    this.ctx = this.canvas.getContext("2d");
    var n = this.n = data.keys.length;
    this.x = new Float64Array(n);
    this.y = new Float64Array(n);
    this.s = new Uint8Array(n);
    this.p = new Float32Array(n);
    this.index = new Map();
    this.code = {};
    data.states.forEach(function (name, i) { self.code[name] = i; });
    for (var i = 0; i < n; i++) {
      this.x[i] = data.cx[data.col[i]];
      this.y[i] = st.top + data.row[i] * st.pitch / 2;
      this.s[i] = data.s[i];
      this.index.set(data.keys[i], i);
    }
    Object.keys(data.p || {}).forEach(function (i) { self.p[+i] = data.p[i]; });
    // The nodes' bounding box, with a margin: what "fit" shows (the laid-out width also makes room for the
    // SVG's legend, which this drawing leaves to the page).
    var minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
    for (i = 0; i < n; i++) {
      minX = Math.min(minX, this.x[i]); minY = Math.min(minY, this.y[i]);
      maxX = Math.max(maxX, this.x[i] + st.nw); maxY = Math.max(maxY, this.y[i] + st.nh);
    }
    if (!n) { minX = minY = 0; maxX = maxY = 1; }
    this.box = { x: minX - 10, y: minY - 10, w: maxX - minX + 20, h: maxY - minY + 20 };
    this.found = -1;
    this.changed = [];
    this.frame = 0;
    this.readColours();
    this.resize();
    this.home();
    this.listen();
    if (window.ResizeObserver) new ResizeObserver(function () { self.resize(); self.draw(); }).observe(wrap);
    if (window.matchMedia) {
      window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", function () {
        self.readColours(); self.draw();
      });
    }
  }

  DagView.prototype.readColours = function () {
    // Each state's pair from the stylesheet (.st-<state> sets --fill and --stroke), read off a probe element.
    var probe = document.createElement("span"), wrap = this.wrap, colours = [];
    probe.hidden = true;
    wrap.appendChild(probe);
    this.data.states.forEach(function (state) {
      probe.className = "st-" + state;
      var cs = getComputedStyle(probe);
      colours.push({ fill: cs.getPropertyValue("--fill").trim() || "#ddd", stroke: cs.getPropertyValue("--stroke").trim() || "#888" });
    });
    var cs = getComputedStyle(wrap);
    this.ink = {
      text: cs.getPropertyValue("--text").trim() || "#222", muted: cs.getPropertyValue("--muted").trim() || "#666",
      edge: cs.getPropertyValue("--edge").trim() || "#999", ring: cs.getPropertyValue("--now").trim() || "#d00",
      add: "#2e7d32", del: "#c62828",
    };
    probe.remove();
    this.colours = colours;
  };

  DagView.prototype.resize = function () {
    var r = this.wrap.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    this.W = Math.max(1, r.width);
    this.H = Math.max(1, r.height);
    this.canvas.width = Math.round(this.W * dpr);
    this.canvas.height = Math.round(this.H * dpr);
    this.canvas.style.width = this.W + "px";
    this.canvas.style.height = this.H + "px";
    this.dpr = dpr;
  };

  DagView.prototype.fitScale = function () { return Math.min(this.W / this.box.w, this.H / this.box.h); };

  DagView.prototype.fit = function (k) {  // at scale k, centred (from the left when wider than the view)
    var b = this.box;
    this.k = k;
    this.tx = b.w * k <= this.W ? (this.W - b.w * k) / 2 - b.x * k : -b.x * k;
    this.ty = (this.H - b.h * k) / 2 - b.y * k;
    this.draw();
  };

  DagView.prototype.home = function () {
    // Everything in view, unless that makes boxes under 4 px wide (a 10,000-task chain): then that scale,
    // from the left.
    this.fit(Math.max(this.fitScale(), Math.min(4 / this.data.style.nw, this.H / this.box.h)));
  };

  DagView.prototype.zoomAt = function (f, sx, sy) {
    var fit = this.fitScale(), k = Math.min(4, Math.max(Math.min(fit, 0.02) / 2, this.k * f));
    f = k / this.k;
    this.tx = sx - (sx - this.tx) * f;
    this.ty = sy - (sy - this.ty) * f;
    this.k = k;
    this.draw();
  };

  DagView.prototype.centreOn = function (i, k) {
    var st = this.data.style;
    this.k = k || this.k;
    this.tx = this.W / 2 - (this.x[i] + st.nw / 2) * this.k;
    this.ty = this.H / 2 - (this.y[i] + st.nh / 2) * this.k;
    this.draw();
  };

  DagView.prototype.find = function (text) {
    text = String(text || "").trim();
    if (!text) return null;
    var i = this.index.has(text) ? this.index.get(text) : -1, low = text.toLowerCase();
    for (var j = 0; i < 0 && j < this.n; j++) if (this.data.keys[j].toLowerCase().indexOf(low) >= 0) i = j;
    if (i < 0) return null;
    this.found = i;
    this.centreOn(i, Math.max(this.k, 1));
    return this.data.keys[i];
  };

  DagView.prototype.at = function (sx, sy) {  // the node under a point in the canvas's CSS pixels, or -1
    var st = this.data.style, wx = (sx - this.tx) / this.k, wy = (sy - this.ty) / this.k;
    for (var i = 0; i < this.n; i++) {
      if (wx >= this.x[i] && wx <= this.x[i] + st.nw && wy >= this.y[i] && wy <= this.y[i] + st.nh) return i;
    }
    return -1;
  };

  DagView.prototype.stateOf = function (key) {
    var i = this.index.get(key);
    return i === undefined ? null : this.data.states[this.s[i]];
  };

  DagView.prototype.labelsOf = function (key) {  // the words drawn on the node once legible, as drawn
    var i = this.index.get(key), st = this.data.style;
    if (i === undefined) return null;
    var out = [trunc(key, st.chars)];
    if (!this.data.compact) out.push(this.data.states[this.s[i]]);
    return out;
  };

  DagView.prototype.screenOf = function (key) {
    var i = this.index.get(key), st = this.data.style, r = this.canvas.getBoundingClientRect();
    if (i === undefined) return null;
    return { x: r.left + this.tx + (this.x[i] + st.nw / 2) * this.k, y: r.top + this.ty + (this.y[i] + st.nh / 2) * this.k };
  };

  DagView.prototype.tooltip = function (i) {
    var d = this.data, lines = [d.keys[i]];
    if (d.titles && d.titles[i]) lines.push(d.titles[i]);
    if (d.estimates && d.estimates[i]) lines.push("estimate: " + fmtDuration(d.estimates[i]));
    lines.push(stateLine(d.states[this.s[i]], this.p[i]));
    return lines.join("\n");
  };

  DagView.prototype.apply = function (states) {
    var self = this;
    Object.keys(states).forEach(function (key) {
      var i = self.index.get(key), v = states[key];
      if (i === undefined) return;
      var state = String(Array.isArray(v) ? v[0] : v), c = self.code[state];
      var progress = Math.min(1, Math.max(0, Number(Array.isArray(v) ? v[1] : 0) || 0));
      if (c === undefined || (self.s[i] === c && self.p[i] === Math.fround(progress))) return;
      self.s[i] = c;
      self.p[i] = progress;
      self.changed.push([key, state]);
    });
    if (this.changed.length) this.draw();
  };

  DagView.prototype.draw = function () {
    var self = this;
    if (this.frame) return;
    this.frame = requestAnimationFrame(function (t) { self.frame = 0; self.paint(t); });
  };

  DagView.prototype.paint = function (t) {
    var ctx = this.ctx, d = this.data, st = d.style, k = this.k, n = this.n, X = this.x, Y = this.y, S = this.s;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.setTransform(this.dpr * k, 0, 0, this.dpr * k, this.dpr * this.tx, this.dpr * this.ty);
    // The world rectangle in view, a box's size wider so boxes cut by an edge of the view are drawn.
    var x0 = -this.tx / k - st.nw, y0 = -this.ty / k - st.nh, x1 = (this.W - this.tx) / k, y1 = (this.H - this.ty) / k;
    var seen = new Uint8Array(n), visible = [], i;
    for (i = 0; i < n; i++) {
      if (X[i] >= x0 && X[i] <= x1 && Y[i] >= y0 && Y[i] <= y1) { seen[i] = 1; visible.push(i); }
    }
    // Edges: an S from the right of the upstream box to the left of the downstream one, when either end is in
    // view or the edge spans it.
    var e = d.e, half = st.nh / 2;
    ctx.beginPath();
    for (var j = 0; j < e.length; j += 2) {
      var u = e[j], v = e[j + 1];
      if (!seen[u] && !seen[v]) {
        var lx = X[u] + st.nw, rx = X[v], ty = Math.min(Y[u], Y[v]), by = Math.max(Y[u], Y[v]);
        if (rx < x0 || lx > x1 || by < y0 || ty > y1) continue;
      }
      var ax = X[u] + st.nw, ay = Y[u] + half, bx = X[v], by2 = Y[v] + half, dx = Math.max(12, (bx - ax) / 2);
      ctx.moveTo(ax, ay);
      ctx.bezierCurveTo(ax + dx, ay, bx - dx, by2, bx, by2);
    }
    ctx.strokeStyle = this.ink.edge;
    ctx.globalAlpha = d.compact ? 0.4 : 0.6;
    ctx.lineWidth = Math.max(d.compact ? 0.8 : 1.2, 0.5 / k);
    ctx.stroke();
    ctx.globalAlpha = 1;
    // Boxes, one path per state: fill, then outline (failed thicker, canceled and skipped dashed, as in dag.css).
    var round = k * st.nw > 12 && ctx.roundRect, groups = d.states.map(function () { return []; });
    visible.forEach(function (i) { groups[S[i]].push(i); });
    var self = this;
    groups.forEach(function (list, c) {
      if (!list.length) return;
      var state = d.states[c];
      ctx.beginPath();
      list.forEach(function (i) {
        if (round) ctx.roundRect(X[i], Y[i], st.nw, st.nh, st.rx); else ctx.rect(X[i], Y[i], st.nw, st.nh);
      });
      ctx.fillStyle = self.colours[c].fill;
      ctx.fill();
      ctx.strokeStyle = self.colours[c].stroke;
      ctx.lineWidth = Math.max(state === "failed" ? 2.5 : 1.5, 0.6 / k);
      ctx.setLineDash(state === "canceled" ? [5, 3] : state === "skipped" ? [2, 3] : []);
      ctx.stroke();
      ctx.setLineDash([]);
      if (LIVE[state]) {  // progress bars
        ctx.fillStyle = self.colours[c].stroke;
        list.forEach(function (i) {
          ctx.fillRect(X[i] + st.inset, Y[i] + st.nh - st.inset - st.bar, (st.nw - 2 * st.inset) * self.p[i], st.bar);
        });
      }
    });
    if (this.found >= 0) {
      var f = this.found;
      ctx.strokeStyle = this.ink.ring;
      ctx.lineWidth = Math.max(3, 2 / k);
      ctx.strokeRect(X[f] - 4 / Math.min(k, 1), Y[f] - 4 / Math.min(k, 1), st.nw + 8 / Math.min(k, 1), st.nh + 8 / Math.min(k, 1));
    }
    // Words, once a line of them is at least 7 px high on screen.
    if (st.font * k >= 7) {
      var pad = d.compact ? 5 : 8, diff = d.diff || {};
      ctx.textBaseline = "alphabetic";
      visible.forEach(function (i) {
        var state = d.states[S[i]];
        ctx.font = "600 " + st.font + "px system-ui, sans-serif";
        ctx.fillStyle = state === "skipped" ? self.ink.muted : self.ink.text;
        ctx.fillText(trunc(d.keys[i], st.chars), X[i] + pad, Y[i] + st.font + (d.compact ? 3 : 6));
        if (d.compact) return;
        ctx.font = "10px system-ui, sans-serif";
        ctx.fillStyle = self.ink.muted;
        ctx.fillText(state, X[i] + pad, Y[i] + 32);
        if (diff[i]) {
          ctx.textAlign = "end";
          ctx.fillStyle = self.ink.del;
          var minus = "−" + diff[i][1], right = X[i] + st.nw - pad;
          ctx.fillText(minus, right, Y[i] + 32);
          ctx.fillStyle = self.ink.add;
          ctx.fillText("+" + diff[i][0] + " ", right - ctx.measureText(minus).width, Y[i] + 32);
          ctx.textAlign = "start";
        }
      });
    }
    this.painted = (this.painted || 0) + 1;
    if (!this.firstPaintMs) this.firstPaintMs = performance.now();  // since the page's navigation began
    if (this.changed.length) {
      var changed = this.changed;
      this.changed = [];
      this.wrap.dispatchEvent(new CustomEvent("cp:dag-drawn", { bubbles: true, detail: { changed: changed, at: t } }));
    }
  };

  DagView.prototype.listen = function () {
    var self = this, c = this.canvas, drag = null, dragged = false;
    var local = function (e) { var r = c.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
    c.addEventListener("wheel", function (e) {
      e.preventDefault();
      var p = local(e);
      self.zoomAt(Math.exp(-e.deltaY * (e.deltaMode ? 0.05 : 0.0015)), p[0], p[1]);  // deltaMode 1: lines
    }, { passive: false });
    c.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) return;
      dragged = false;  // a pan's own click may never come (pointer capture): it must not swallow this one
      drag = { x: e.clientX, y: e.clientY, tx: self.tx, ty: self.ty, id: e.pointerId, moved: false };
    });
    c.addEventListener("pointermove", function (e) {
      if (!drag) {
        var p = local(e), i = self.at(p[0], p[1]);
        c.style.cursor = i >= 0 ? "pointer" : "grab";
        c.title = i >= 0 ? self.tooltip(i) : "";
        return;
      }
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;  // a click's jitter is not a pan
      if (!drag.moved) { drag.moved = true; c.setPointerCapture(drag.id); c.style.cursor = "grabbing"; }
      self.tx = drag.tx + dx;
      self.ty = drag.ty + dy;
      self.draw();
    });
    var end = function () { dragged = !!(drag && drag.moved); drag = null; c.style.cursor = "grab"; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("dblclick", function (e) { e.preventDefault(); self.home(); });
    c.addEventListener("click", function (e) {
      if (dragged) { dragged = false; return; }
      var p = local(e), i = self.at(p[0], p[1]);
      if (i < 0 || !self.data.href) return;
      var url = self.data.href.replace("{key}", encodeURIComponent(self.data.keys[i]));
      if (e.ctrlKey || e.metaKey) window.open(url, "_blank", "noopener"); else window.location.href = url;
    });
  };

  function wireTools(form, view) {
    var out = form.querySelector("[data-dag-found]");
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var text = form.elements.key.value, key = view.find(text);
      if (out) out.textContent = key ? "found " + key : "no task with a key like “" + text.trim() + "”";
    });
    form.querySelectorAll("[data-dag-zoom]").forEach(function (b) {
      b.addEventListener("click", function () { view.zoomAt(Number(b.dataset.dagZoom), view.W / 2, view.H / 2); });
    });
    var fit = form.querySelector("[data-dag-fit]");
    if (fit) fit.addEventListener("click", function () { view.fit(view.fitScale()); });
  }

  var views = [];

  function initDrawings() {
    document.querySelectorAll(".dag-wrap[data-dag-source]").forEach(function (wrap) {
      if (wrap._cpView) return;
      var island = document.getElementById(wrap.dataset.dagSource), data;
      try { data = JSON.parse(island.textContent); } catch (e) { return; }
      var view = wrap._cpView = new DagView(wrap, data);
      views.push(view);
      var form = document.querySelector('[data-dag-find="' + wrap.id + '"]');
      if (form) wireTools(form, view);
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
    views.forEach(function (view) { view.apply(states); });
  }

  function init() {
    document.querySelectorAll("svg.dag, svg.gantt").forEach(initView);
    initDrawings();
    applyFromPage(true);
  }

  // One live push swaps several panels, and htmx fires an out-of-band after-swap event for every element
  // swapped so far (and for the socket's own element) after each of them: a dozen events a push. Each such
  // element is looked into once, and each states map applied once. (A regular swap may fill a lasting element
  // anew.)
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
  window.cpDag = { views: views, applyFromPage: function () { applyFromPage(true); }, init: init };
})();
