// batchd status page: refresh the page in place every `data-refresh-s` seconds.
// The page works without this script; with it, the figures stay current. It pauses while
// the tab is hidden or the filter form is being edited, and marks the page "stale" when
// the daemon does not answer. It loads nothing but the page's own URL.
(function () {
  "use strict";
  var body = document.body;
  var every = Number(body.getAttribute("data-refresh-s")) || 5;
  body.setAttribute("data-live", "on");

  function editing() {
    var active = document.activeElement;
    return Boolean(active && active.form);
  }

  function swap(fresh, id) {
    var found = fresh.getElementById(id);
    var current = document.getElementById(id);
    if (found && current) {
      current.replaceWith(document.importNode(found, true));
    }
  }

  function refresh() {
    if (document.hidden || editing()) {
      return;
    }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (answer) {
        if (!answer.ok) {
          throw new Error("HTTP " + answer.status);
        }
        return answer.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html");
        swap(fresh, "live");
        swap(fresh, "stamp");
        body.setAttribute("data-live", "on");
      })
      .catch(function () {
        body.setAttribute("data-live", "stale");
      });
  }

  window.setInterval(refresh, every * 1000);
})();
