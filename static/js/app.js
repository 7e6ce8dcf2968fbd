/* Live-connection indicator for the dashboard: the htmx websocket extension reconnects by itself (with
   jittered backoff) and the server resends the whole page on connect, so this only tells people. */
(function () {
  function set(state, text) {
    var el = document.getElementById("live-status");
    if (el) { el.dataset.state = state; el.textContent = text; }
  }
  document.addEventListener("htmx:wsOpen", function () { set("live", "live"); });
  document.addEventListener("htmx:wsClose", function () { set("reconnecting", "reconnecting…"); });
  document.addEventListener("htmx:wsError", function () { set("reconnecting", "reconnecting…"); });
  // Live pushes are out-of-band panels (hx-swap-oob="true"): each replaces the element with its id. We swap
  // them here rather than through htmx's general swap, which fires an event for every element it removes and
  // re-fires the after-swap events of all panels after each one: at 1,000 tasks that cost the page ~60 ms of
  // script a push, enough to fall behind. The outcome is the same: hx- attributes inside are wired up by
  // htmx.process, and htmx:oobBeforeSwap / htmx:oobAfterSwap fire once per panel (dag.js and the log
  // scrolling below listen to them). Anything else in a message is left to htmx.
  document.addEventListener("htmx:wsBeforeMessage", function (e) {
    var template = document.createElement("template");
    template.innerHTML = e.detail.message;
    var panels = Array.prototype.slice.call(template.content.children);
    var ours = panels.length && panels.every(function (el) {
      return el.id && el.getAttribute("hx-swap-oob") === "true" && document.getElementById(el.id);
    });
    if (!ours) return;
    e.preventDefault();
    panels.forEach(function (el) {
      var old = document.getElementById(el.id);
      el.removeAttribute("hx-swap-oob");
      if (!htmx.trigger(old, "htmx:oobBeforeSwap", { target: old, fragment: el, shouldSwap: true })) return;
      old.replaceWith(el);
      htmx.process(el);
      htmx.trigger(el, "htmx:oobAfterSwap", { target: el, fragment: el });
    });
  });
  // Keep a streaming log scrolled to its end, unless the reader scrolled up.
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var log = document.querySelector("pre.log");
    if (log) { window.cpLogAtEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8; }
  });
  document.addEventListener("htmx:oobAfterSwap", function () {
    var log = document.querySelector("pre.log");
    if (log && window.cpLogAtEnd !== false) { log.scrollTop = log.scrollHeight; }
  });
})();
