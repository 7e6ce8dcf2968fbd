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
