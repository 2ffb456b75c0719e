// phasegate dashboard: live updates. Every page works without this script; it only keeps the
// page fresh. It talks to its own origin only (the session cookie goes with the requests).
//
// - A rollout's page (an element #rollout with data-rollout-id) listens to
//   /api/v1/rollouts/{id}/watch and, on each `transition` event, re-fetches the page and swaps
//   the content of #rollout. If someone is in the middle of a form, it does not swap (that would
//   throw their typing away) and says so instead.
// - The index (an element #rollouts) listens to /api/v1/watch and reloads on each event (also
//   on `lagged`, sent when it fell behind and the stream ends).
(function () {
  'use strict';
  if (!('EventSource' in window) || !window.fetch || !window.DOMParser) {
    return;
  }
  var live = document.getElementById('live-status');

  function say(text) {
    if (live) {
      live.textContent = text;
    }
  }

  // Is anyone working inside `root`: typing in a field, a field changed, a dialog open?
  function busy(root) {
    var active = document.activeElement;
    if (active && root.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName)) {
      return true;
    }
    if (root.querySelector('dialog[open]')) {
      return true;
    }
    var fields = root.querySelectorAll('input, textarea, select');
    for (var i = 0; i < fields.length; i++) {
      var field = fields[i];
      if (field.type === 'hidden' || field.type === 'submit') {
        continue;
      }
      if (field.type === 'checkbox' || field.type === 'radio') {
        if (field.checked !== field.defaultChecked) {
          return true;
        }
      } else if (field.tagName === 'SELECT') {
        for (var j = 0; j < field.options.length; j++) {
          if (field.options[j].selected !== field.options[j].defaultSelected) {
            return true;
          }
        }
      } else if (field.value !== field.defaultValue) {
        return true;
      }
    }
    return false;
  }

  function time() {
    return new Date().toLocaleTimeString();
  }

  var rollout = document.getElementById('rollout');
  if (rollout && rollout.getAttribute('data-rollout-id')) {
    var id = rollout.getAttribute('data-rollout-id');
    var fetching = false;
    var again = false;

    var refresh = function () {
      if (busy(rollout)) {
        say('This rollout changed (' + time() + '). Reload the page to see its latest state.');
        return;
      }
      if (fetching) {
        again = true;
        return;
      }
      fetching = true;
      fetch(window.location.href, {
        credentials: 'same-origin',
        headers: { 'Accept': 'text/html' },
        cache: 'no-store'
      })
        .then(function (response) {
          if (!response.ok) {
            throw new Error('HTTP ' + response.status);
          }
          return response.text();
        })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, 'text/html');
          var fresh = doc.getElementById('rollout');
          if (!fresh) {
            window.location.reload();
            return;
          }
          if (busy(rollout)) {
            say('This rollout changed (' + time() + '). Reload the page to see its latest state.');
            return;
          }
          var open = {};
          var details = rollout.querySelectorAll('details[id]');
          for (var i = 0; i < details.length; i++) {
            open[details[i].id] = details[i].open;
          }
          rollout.innerHTML = fresh.innerHTML;
          document.title = doc.title;
          // Keep the sections someone opened or closed as they were.
          for (var key in open) {
            var now = document.getElementById(key);
            if (now && now.tagName === 'DETAILS') {
              now.open = open[key];
            }
          }
          say('Updated at ' + time() + '.');
        })
        .catch(function () {
          say('A live update failed; reload the page to see the latest state.');
        })
        .then(function () {
          fetching = false;
          if (again) {
            again = false;
            refresh();
          }
        });
    };

    var source = new EventSource('/api/v1/rollouts/' + encodeURIComponent(id) + '/watch');
    source.addEventListener('transition', refresh);
    source.addEventListener('error', function () {
      if (source.readyState === EventSource.CLOSED) {
        say('Live updates stopped; reload the page to see the latest state.');
      }
    });
  } else if (document.getElementById('rollouts')) {
    var reload = function () {
      if (busy(document.body)) {
        say('Rollouts changed (' + time() + '). Reload the page to see them.');
      } else {
        window.location.reload();
      }
    };
    var all = new EventSource('/api/v1/watch');
    all.addEventListener('transition', reload);
    all.addEventListener('message', reload);
    all.addEventListener('lagged', reload);
  }
})();
