// The dashboard's one script: it refreshes the part of the page marked
// data-live, keeping the filters (they are in the URL), the scroll
// position and anything being typed. Served from this server; the
// Content-Security-Policy allows no other script.
(function () {
  "use strict";
  var every = Number(document.body.getAttribute("data-refresh") || "0") * 1000;
  var live = document.querySelector("[data-live]");
  var toggle = document.getElementById("live");
  var updated = document.getElementById("updated");
  if (!live || !every) {
    if (toggle) toggle.parentNode.hidden = true;
    return;
  }
  function stamp() {
    if (updated) updated.textContent = "updated " + new Date().toLocaleTimeString();
  }
  function busy() {
    var a = document.activeElement;
    return a && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }
  var running = false;
  function tick() {
    if (running || document.hidden || busy() || (toggle && !toggle.checked)) return;
    running = true;
    fetch(location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) return;
        var fresh = new DOMParser().parseFromString(text, "text/html").querySelector("[data-live]");
        if (!fresh) return;
        var nodes = Array.prototype.map.call(fresh.childNodes, function (n) {
          return document.importNode(n, true);
        });
        live.replaceChildren.apply(live, nodes);
        stamp();
      })
      .catch(function () {})
      .then(function () { running = false; });
  }
  stamp();
  setInterval(tick, every);
})();
