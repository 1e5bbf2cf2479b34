// Kanade console: local times, live elapsed times, live updates and copy buttons. Every page
// works without this script; it only keeps pages current.
"use strict";
(function () {
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var at = new Date(t.getAttribute("datetime"));
      if (!isNaN(at)) {
        t.title = t.getAttribute("datetime") + " (UTC)";
        t.textContent = at.toLocaleString();
      }
    });
  }
  function duration(ms) {
    if (ms < 1000) return Math.max(0, Math.floor(ms)) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    var s = Math.floor(ms / 1000);
    if (ms < 3600000) return Math.floor(s / 60) + " m " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor(s / 60) % 60).padStart(2, "0") + " m";
  }
  function tick() {
    document.querySelectorAll("[data-since]").forEach(function (e) {
      e.textContent = duration(Date.now() - Date.parse(e.getAttribute("data-since")));
    });
  }
  function copyButtons(root) {
    root.querySelectorAll("button[data-copy]").forEach(function (b) {
      var source = document.getElementById(b.getAttribute("data-copy"));
      if (!source || !navigator.clipboard) return;
      b.hidden = false;
      b.addEventListener("click", function () {
        navigator.clipboard.writeText(source.textContent).then(function () {
          b.textContent = "Copied";
          setTimeout(function () { b.textContent = "Copy"; }, 1500);
        });
      });
    });
  }

  // Live: on "changed", re-read this page and swap in its [data-live] part. One re-read at a
  // time; changes during one fold into a single re-read after it (nothing queues).
  function live() {
    var view = document.querySelector("[data-live]");
    if (!view || view.getAttribute("data-live") === "final" || !window.EventSource) return;
    // A view may ask to be re-read at most every N seconds (data-live-every: the manifest
    // summary is an expensive query); a change meanwhile is picked up when the wait ends.
    var every = 1000 * (parseFloat(view.getAttribute("data-live-every")) || 0);
    var busy = false, again = false, last = 0, waiting = null;
    function refresh() {
      if (busy) { again = true; return; }
      var wait = last + every - Date.now();
      if (wait > 0) {
        if (!waiting) waiting = setTimeout(function () { waiting = null; refresh(); }, wait);
        return;
      }
      busy = true;
      last = Date.now();
      fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) {
          // Sent elsewhere (the session ended: /signin): show that page, not a stale one.
          if (r.redirected) { location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null) return;
          var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-live]");
          var current = document.querySelector("[data-live]");
          if (fresh && current) {
            current.replaceWith(document.adoptNode(fresh));
            localTimes(fresh);
            copyButtons(fresh);
            tick();
          }
          // A finished run's page is final: nothing more to follow, nothing left to cancel.
          if (fresh && fresh.getAttribute("data-live") === "final") {
            events.close();
            if (status) status.hidden = true;
            document.querySelectorAll("[data-hide-when-final]").forEach(function (e) { e.hidden = true; });
          }
        })
        .catch(function () {})
        .then(function () {
          busy = false;
          if (again) { again = false; refresh(); }
        });
    }
    // The run's live output asks for a re-read when the run ends.
    document.addEventListener("kanade:refresh", refresh);
    var status = document.querySelector("[data-live-status]");
    var events = new EventSource("/events");
    events.addEventListener("ready", function () {
      if (status) status.hidden = false;
      refresh();
    });
    events.addEventListener("changed", refresh);
    events.onerror = function () { if (status) status.hidden = true; };
  }

  // A running run's output as its script writes it: appended as text (never markup), each
  // stream in order by its offsets; bytes the page did not get show as a gap; what it already
  // has (after the browser reconnects the stream) is not shown twice.
  function tail() {
    var panel = document.querySelector("[data-tail]");
    if (!panel || !window.EventSource) return;
    var outs = {}, next = {};
    panel.querySelectorAll("[data-tail-stream]").forEach(function (pre) {
      outs[pre.getAttribute("data-tail-stream")] = pre;
    });
    var notice = panel.querySelector("[data-tail-notice]");
    var encoder = new TextEncoder(), decoder = new TextDecoder();
    var source = new EventSource(panel.getAttribute("data-tail"));
    source.addEventListener("chunk", function (e) {
      var c = JSON.parse(e.data), out = outs[c.stream];
      if (!out) return;
      panel.hidden = false;
      var data = c.data, start = c.offset, have = next[c.stream] || 0;
      if (start + c.length <= have && next[c.stream] !== undefined) return;
      if (start < have) {
        // Cut what the page has only where the text maps byte for byte onto the output.
        var bytes = encoder.encode(data);
        if (bytes.length !== c.length) return;
        data = decoder.decode(bytes.slice(have - start));
        start = have;
      }
      var atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      if (start > have) {
        var gap = document.createElement("span");
        gap.className = "gap";
        gap.textContent = "[" + (start - have) + (next[c.stream] === undefined ? " earlier" : "") +
          " bytes not shown]\n";
        out.appendChild(gap);
      }
      out.appendChild(document.createTextNode(data));
      next[c.stream] = c.offset + c.length;
      if (atEnd) out.scrollTop = out.scrollHeight;
    });
    source.addEventListener("notice", function (e) {
      panel.hidden = false;
      if (notice) notice.textContent = JSON.parse(e.data).message;
    });
    source.addEventListener("finished", function () {
      source.close();
      document.dispatchEvent(new Event("kanade:refresh"));
    });
    source.addEventListener("open", function () { panel.hidden = false; });
  }

  function start() {
    localTimes(document);
    copyButtons(document);
    tick();
    setInterval(tick, 1000);
    live();
    tail();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
