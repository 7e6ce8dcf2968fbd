/* The dashboard's live connection: the htmx websocket extension reconnects by itself and the server resends
   the whole page on connect (a page resyncs after a server restart); this tells people whether the page is
   live, sets the reconnect pace, swaps the pushed panels in, and keeps a streaming log at its end. */
(function () {
  function set(state, text) {
    var el = document.getElementById("live-status");
    if (el) { el.dataset.state = state; el.textContent = text; }
  }
  // After a server restart, come back within seconds: at most 5 s between tries (jittered, so that a room of
  // open pages does not reconnect at once), not the extension's default of up to a minute.
  htmx.config.wsReconnectDelay = function (retries) {
    return Math.min(5000, 500 * Math.pow(2, retries)) * (0.5 + Math.random() / 2);
  };
  // An operator's action that the server refuses (409: the run already ended; 403: not an operator) answers
  // with a flash fragment for #flash. htmx drops 4xx answers unless told: show that one.
  document.addEventListener("htmx:beforeSwap", function (e) {
    var status = e.detail.xhr.status;
    if ((status === 409 || status === 403) && e.detail.target && e.detail.target.id === "flash") {
      e.detail.shouldSwap = true;
      e.detail.isError = false;
    }
  });
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
  // Browser notifications, opted into with "Notify me": one for each approval or agent's question that
  // appears in the overview's Waiting for you panel while the page is open (not for those already there).
  var seen = null;
  function waiting() {
    return Array.prototype.slice.call(document.querySelectorAll("#panel-waiting [data-wait]"));
  }
  function notifyNew() {
    var items = waiting(), ids = items.map(function (el) { return el.dataset.wait; });
    if (seen !== null && window.Notification && Notification.permission === "granted") {
      items.forEach(function (el) {
        if (seen.indexOf(el.dataset.wait) < 0) {
          new Notification("Waiting for you", { body: el.dataset.waitText, tag: el.dataset.wait });
        }
      });
    }
    seen = ids;
  }
  document.addEventListener("DOMContentLoaded", function () {
    if (document.getElementById("panel-waiting")) notifyNew();
    var optin = document.getElementById("notify-optin");
    if (!optin || !window.Notification || Notification.permission !== "default") return;
    optin.hidden = false;
    optin.addEventListener("click", function () {
      Notification.requestPermission().then(function () { optin.hidden = true; });
    });
  });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    if (e.target && e.target.id === "panel-waiting") notifyNew();
  });
  // The task page's log: a tab per attempt (the latest shown first), each opening at its end (a failure's
  // error is at the bottom), and a streaming log following its end unless the reader scrolled up. A push
  // replaces the panel: the chosen tab and the reader's place are carried over.
  var logTab = null, logPlace = null;
  function shownLog() { return document.querySelector("[data-log-panel] pre.log:not([hidden])"); }
  function toEnd(log) { if (log) { log.scrollTop = log.scrollHeight; } }
  function showLog(number) {
    var panel = document.querySelector("[data-log-panel]");
    if (!panel || !panel.querySelector('pre.log[data-attempt="' + number + '"]')) return false;
    panel.querySelectorAll("pre.log").forEach(function (pre) { pre.hidden = pre.dataset.attempt !== number; });
    panel.querySelectorAll("[data-log-tab]").forEach(function (tab) {
      tab.setAttribute("aria-selected", tab.dataset.logTab === number ? "true" : "false");
    });
    return true;
  }
  document.addEventListener("click", function (e) {
    var tab = e.target.closest && e.target.closest("[data-log-tab]");
    if (!tab) return;
    var first = document.querySelector("[data-log-panel] [data-log-tab]");
    logTab = tab === first ? null : tab.dataset.logTab;  // the latest tab follows a new attempt
    if (showLog(tab.dataset.logTab)) toEnd(shownLog());
  });
  document.addEventListener("DOMContentLoaded", function () { toEnd(shownLog()); });
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var log = shownLog();
    if (!log || !e.target || !e.target.hasAttribute("data-log-panel")) return;
    var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    logPlace = { attempt: log.dataset.attempt, atEnd: atEnd, top: log.scrollTop };
  });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    if (!e.target || !e.target.hasAttribute("data-log-panel")) return;
    if (logTab !== null && !showLog(logTab)) logTab = null;
    var log = shownLog(), place = logPlace;
    logPlace = null;
    if (!log) return;
    if (place && place.attempt === log.dataset.attempt && !place.atEnd) { log.scrollTop = place.top; } else { toEnd(log); }
  });
})();
