/*
 * muxd web console: theory of operation.
 *
 * Two independent loops drive the page.
 *
 * 1. A poll loop fetches api/v1/ports every REFRESH_MS (and the selected
 *    port's clients) and updates the ports list and clients table in place,
 *    so keyboard focus survives a refresh. The next poll is scheduled only
 *    after the previous one finished, so a slow daemon never piles requests up.
 *
 * 2. One WebSocket, ws/<port>?history=N&format=raw, for the selected port:
 *    raw whatever the listener's `format`. Binary frames are raw device bytes
 *    and go straight into xterm.js, which parses ANSI and UTF-8 itself. When
 *    the socket closes it is reopened after a backoff
 *    (doubling, capped); a reopen writes a marked separator and replays muxd's
 *    history again, so nothing already shown is thrown away and the repeat is
 *    visibly labelled. Lines typed in the input are sent as one binary frame of
 *    UTF-8 bytes; muxd writes them to the device only when the port is writable,
 *    and the input is shown only then.
 *
 * Input on a writable port works as in a real terminal (raw mode): every key
 * typed in the terminal goes out at once as xterm.js encodes it (Enter as CR,
 * Ctrl-C as 0x03, arrows and function keys as escape sequences), one frame per
 * key, and the device's echo is what shows it. Nothing is echoed or edited
 * here. The input line (history, a chosen line ending) stays available as an
 * option: the "Line input" toggle shows or hides it, and is remembered per
 * browser. On a read-only port the terminal takes no keys at all.
 *
 * The write lock. Under `write_lock: first` another client may hold the
 * port's keyboard (api/v1/ports: write_lock.holder). The page cannot know
 * its own client id, so it judges: a holder on another listener is someone
 * else; a holder on the WebSocket listener is this page only if this page
 * sent input since shortly before the holder took the lock (clocks may
 * differ by a few seconds: LOCK_SKEW_S). While someone else holds it, the
 * terminal takes no keys and the input line is disabled, its placeholder
 * naming the holder; muxd refuses the input anyway (and says so in-band).
 *
 * Tokens. When muxd answers an API request with 401 (its http server has
 * `tokens:`), the page asks for a token (window.prompt), keeps it in
 * sessionStorage (this tab only, gone when it closes), and sends it as
 * `Authorization: Bearer` on API requests. A browser's WebSocket cannot set
 * headers, so the socket offers two subprotocols instead: `muxd` and
 * `bearer.<base64url(token)>`; muxd selects `muxd` (docs/http.md). A wrong
 * token is dropped and asked for again at the next 401.
 *
 * Pause is a scroll lock done by holding bytes here rather than in xterm: the
 * view cannot move because nothing is written; on resume the held bytes are
 * written in order. The port is selected by the URL fragment #port=NAME, so
 * a link opens a given port and Back returns to the previous one.
 *
 * Plain ES2017, no build step: the page must be served as-is by muxd.
 */
(function () {
  'use strict';

  var REFRESH_MS = 2000;
  var FETCH_TIMEOUT_MS = 5000;
  // Bytes of recent output asked for on open; muxd caps it at the port's
  // `history` (64 KiB by default), so asking for that default shows it all.
  var HISTORY_BYTES = 65536;
  // ~10,000 lines of 80-200 columns is 1-2 MB of cells: hours of a chatty
  // console, yet small enough for a laptop tab.
  var SCROLLBACK_LINES = 10000;
  // Held while paused. 1 MiB is ~90 s of a saturated 115200-baud line, and
  // more than the scrollback could keep on resume anyway; beyond it the
  // oldest held bytes are dropped, counted and reported.
  var PAUSE_HOLD_LIMIT = 1024 * 1024;
  // Reconnect backoff: fast first retry for a daemon restart, capped so a
  // long outage costs one attempt per 10 s per open tab.
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 10000;
  // A socket that stayed open this long was a real connection: the next
  // failure starts from BACKOFF_MIN_MS again rather than from a grown delay.
  var STABLE_MS = 5000;
  // Up/Down recall; 100 lines is far more than anyone scrolls through.
  var SENT_HISTORY_LIMIT = 100;

  // What Enter sends. A real terminal sends CR for Enter: a Linux getty/shell
  // maps it to NL (ICRNL), U-Boot, Zephyr and most RTOS shells act on CR, and
  // CRLF would be seen as two line ends (an extra empty command) by a tty
  // with ICRNL. So CR is the default; LF/CRLF/none exist for odd devices.
  var LINE_ENDINGS = { cr: '\r', lf: '\n', crlf: '\r\n', none: '' };

  var encoder = new TextEncoder();

  // ---- token (see the theory above) ---------------------------------------

  var TOKEN_KEY = 'muxd-token';
  var token = null;
  // Storage may be unavailable (a private window, a file: page): then the
  // token lasts as long as the page.
  function store(value) {
    try {
      if (value === null) sessionStorage.removeItem(TOKEN_KEY); else sessionStorage.setItem(TOKEN_KEY, value);
    } catch (err) { /* kept for this page */ }
  }
  try { token = sessionStorage.getItem(TOKEN_KEY); } catch (err) { /* none kept */ }
  var askedForToken = false;  // one prompt per 401 streak: Cancel is respected

  function base64url(text) {
    var bytes = encoder.encode(text);
    var bin = '';
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }

  function askForToken() {
    if (askedForToken) return false;
    askedForToken = true;
    var given = window.prompt('This muxd needs a token (ask its administrator):', '');
    if (!given) return false;
    token = given.trim();
    store(token);
    return true;
  }

  function $(id) { return document.getElementById(id); }

  var el = {
    apiStatus: $('api-status'),
    ports: $('ports'),
    portsEmpty: $('ports-empty'),
    portTitle: $('port-title'),
    wsStatus: $('ws-status'),
    pause: $('pause'),
    pauseInfo: $('pause-info'),
    clear: $('clear'),
    terminal: $('terminal'),
    sendForm: $('send-form'),
    sendInput: $('send-input'),
    lineEnding: $('line-ending'),
    sendButton: $('send-button'),
    lineInput: $('line-input'),
    clients: $('clients'),
  };

  // ---- formatting --------------------------------------------------------

  function fmtBytes(n) {
    if (typeof n !== 'number') return '?';
    var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    // No-break space: a unit never wraps away from its number.
    return (i === 0 ? String(n) : n.toFixed(1)) + '\u00a0' + units[i];
  }

  function fmtAge(epochSeconds) {
    if (typeof epochSeconds !== 'number') return '?';
    // Clamped: the daemon's and the browser's clocks may disagree slightly.
    var s = Math.max(0, Math.floor(Date.now() / 1000 - epochSeconds));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
    return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
  }

  function fmtTime(epochSeconds) {
    return typeof epochSeconds === 'number' ? new Date(epochSeconds * 1000).toLocaleString() : '';
  }

  function make(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- terminal ----------------------------------------------------------

  var term = new Terminal({
    convertEol: true,           // device consoles often send a bare LF
    scrollback: SCROLLBACK_LINES,
    disableStdin: true,         // until the port is known to be writable: see setWritable
    cursorBlink: false,
    fontFamily: getComputedStyle(document.documentElement).getPropertyValue('--mono-font'),
    fontSize: 14,
    theme: { background: '#0c0c0c', foreground: '#d0d0d0' },
  });
  var fitAddon = new FitAddon.FitAddon();
  term.loadAddon(fitAddon);
  term.open(el.terminal);

  var fitPending = false;
  function fitSoon() {
    // Coalesced into one frame: ResizeObserver can fire many times per drag.
    if (fitPending) return;
    fitPending = true;
    requestAnimationFrame(function () {
      fitPending = false;
      fitAddon.fit();
    });
  }
  new ResizeObserver(fitSoon).observe(el.terminal);

  function terminalText() {
    var buf = term.buffer.active;
    var lines = [];
    for (var i = 0; i < buf.length; i++) {
      var line = buf.getLine(i);
      var s = line.translateToString(true);
      if (line.isWrapped && lines.length) lines[lines.length - 1] += s;
      else lines.push(s);
    }
    while (lines.length && lines[lines.length - 1] === '') lines.pop();
    return lines.join('\n');
  }

  // ---- keys typed in the terminal (raw mode) -----------------------------

  var writable = false;     // the selected port takes input (from the API)
  var lastSentMs = 0;       // when this page last sent input (Date.now())
  var LOCK_SKEW_S = 5;      // tolerated difference between muxd's clock and this browser's

  function sendBytes(bytes) {
    // Keys typed while the socket is down are dropped, not queued: replayed
    // after a reconnect they would hit whatever the device shows by then.
    if (writable && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(bytes);
      lastSentMs = Date.now();
    }
  }

  // Why this page may not type now: another client holds the port's write
  // lock (see the theory of operation), or null.
  function lockedOut(p) {
    var lock = p && p.write_lock;
    var h = lock && lock.holder;
    if (!h) return null;
    var wsl = (p.listeners || []).filter(function (l) { return l.kind === 'websocket'; });
    var onWs = wsl.some(function (l) { return l.name === h.listener; });
    if (onWs && lastSentMs && lastSentMs / 1000 >= h.since - LOCK_SKEW_S) return null;  // this page, most likely
    var since = new Date(h.since * 1000).toLocaleTimeString();
    return 'Input disabled: ' + h.listener + ' ' + h.peer + (h.token ? ' (token ' + h.token + ')' : '') +
      ' holds the write lock since ' + since;
  }
  term.onData(function (data) { sendBytes(encoder.encode(data)); });
  // Some mouse reports are raw bytes above 0x7f, not text: sent as they are.
  term.onBinary(function (data) {
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    sendBytes(bytes);
  });

  function notice(text) {
    return encoder.encode('\r\n\x1b[2;3m-- muxd console: ' + text + ' --\x1b[0m\r\n');
  }

  // ---- pause (scroll lock) ----------------------------------------------

  var paused = false;
  var held = [];          // Uint8Array chunks, oldest first
  var heldBytes = 0;
  var arrivedWhilePaused = 0;
  var droppedWhilePaused = 0;

  function show(bytes) {
    if (!paused) {
      term.write(bytes);
      return;
    }
    held.push(bytes);
    heldBytes += bytes.length;
    while (heldBytes > PAUSE_HOLD_LIMIT) {
      var excess = heldBytes - PAUSE_HOLD_LIMIT;
      var first = held[0];
      if (first.length <= excess) {
        held.shift();
        heldBytes -= first.length;
        droppedWhilePaused += first.length;
      } else {
        held[0] = first.subarray(excess);
        heldBytes -= excess;
        droppedWhilePaused += excess;
      }
    }
  }

  function updatePauseInfo() {
    if (!paused) {
      el.pauseInfo.textContent = '';
      return;
    }
    var text = 'paused: ' + fmtBytes(arrivedWhilePaused) + ' arrived';
    if (droppedWhilePaused) {
      text += ', ' + fmtBytes(droppedWhilePaused) + ' dropped (hold limit ' +
        fmtBytes(PAUSE_HOLD_LIMIT) + ')';
    }
    el.pauseInfo.textContent = text;
  }

  function dropHeld() {
    held = [];
    heldBytes = 0;
    arrivedWhilePaused = 0;
    droppedWhilePaused = 0;
  }

  function setPaused(on) {
    paused = on;
    el.pause.setAttribute('aria-pressed', String(on));
    el.pause.textContent = on ? 'Resume' : 'Pause';
    if (!on) {
      if (droppedWhilePaused) {
        term.write(notice(fmtBytes(droppedWhilePaused) + ' dropped while paused'));
      }
      held.forEach(function (chunk) { term.write(chunk); });
      term.scrollToBottom();
    }
    dropHeld();
    updatePauseInfo();
  }

  el.pause.addEventListener('click', function () { setPaused(!paused); });
  el.clear.addEventListener('click', function () { term.clear(); });

  // ---- WebSocket ---------------------------------------------------------

  var ws = null;            // the current socket; events of older ones are ignored
  var wsPort = null;        // port the socket (or the pending retry) is for
  var wsOpenedAt = 0;
  var backoffMs = BACKOFF_MIN_MS;
  var retryTimer = null;
  var countdownTimer = null;
  var hadConnection = false;

  function setWsStatus(kind, text) {
    el.wsStatus.className = 'ws-status ws-' + kind;
    el.wsStatus.textContent = text;
    wsConnected = kind === 'connected';
    el.sendButton.disabled = !wsConnected || lockReason !== null;
  }

  function wsUrl(port) {
    var url = new URL('ws/' + encodeURIComponent(port), location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    // Always the raw bytes, whatever the listener's `format` (a `jsonl` or
    // `text` listener would otherwise send records, and xterm.js would show
    // the JSON): the terminal parses the device's own escapes and UTF-8.
    url.search = '?history=' + HISTORY_BYTES + '&format=raw';
    url.hash = '';
    return url.href;
  }

  function stopSocket() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    retryTimer = countdownTimer = null;
    if (ws) {
      var old = ws;
      ws = null;
      old.close();
    }
  }

  function connect() {
    var sock = token ? new WebSocket(wsUrl(wsPort), ['muxd', 'bearer.' + base64url(token)])
      : new WebSocket(wsUrl(wsPort));
    sock.binaryType = 'arraybuffer';
    ws = sock;
    setWsStatus('connecting', 'connecting');
    sock.onopen = function () {
      if (sock !== ws) return;
      wsOpenedAt = Date.now();
      setWsStatus('connected', 'connected');
      if (hadConnection) show(notice('reconnected; replaying recent output'));
      hadConnection = true;
    };
    sock.onmessage = function (ev) {
      if (sock !== ws) return;
      var bytes = typeof ev.data === 'string' ? encoder.encode(ev.data) : new Uint8Array(ev.data);
      if (paused) {
        arrivedWhilePaused += bytes.length;
        updatePauseInfo();
      }
      show(bytes);
    };
    sock.onclose = function () {
      if (sock !== ws) return;
      ws = null;
      if (wsOpenedAt && Date.now() - wsOpenedAt >= STABLE_MS) backoffMs = BACKOFF_MIN_MS;
      wsOpenedAt = 0;
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    var delay = backoffMs;
    backoffMs = Math.min(backoffMs * 2, BACKOFF_MAX_MS);
    var due = Date.now() + delay;
    function tick() {
      var left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setWsStatus('reconnecting', 'disconnected, reconnecting in ' + left + 's');
    }
    tick();
    countdownTimer = setInterval(tick, 250);
    retryTimer = setTimeout(function () {
      clearInterval(countdownTimer);
      countdownTimer = retryTimer = null;
      connect();
    }, delay);
  }

  function openPort(port) {
    stopSocket();
    dropHeld();
    setPaused(false);
    // RIS through the write queue, not term.reset(): xterm parses writes
    // later, so bytes of the old port still queued must land before the wipe.
    term.write('\x1bc');
    wsPort = port;
    backoffMs = BACKOFF_MIN_MS;
    hadConnection = false;
    if (port === null) {
      setWsStatus('idle', 'idle');
      return;
    }
    connect();
  }

  // ---- send line ---------------------------------------------------------

  // Whether the input line is shown on a writable port (the terminal takes
  // keys either way). Shown unless this browser was told otherwise; storage
  // may be unavailable (a private window, a file: page), which is no error.
  var LINE_INPUT_KEY = 'muxd.lineInput';
  var lineInputShown = true;
  try { lineInputShown = localStorage.getItem(LINE_INPUT_KEY) !== 'off'; } catch (err) { /* default */ }

  var lockReason = null;    // set while another client holds the write lock
  var wsConnected = false;  // the socket is open (the Send button works only then)

  function setWritable(on, reason) {
    writable = on;
    if (reason !== undefined) lockReason = reason;
    var locked = on && lockReason !== null;
    term.options.disableStdin = !on || locked;
    el.lineInput.hidden = !on;
    el.lineInput.setAttribute('aria-pressed', String(lineInputShown));
    // Locked out, the input line shows why, whatever the toggle says.
    el.sendForm.hidden = !(on && (lineInputShown || locked));
    el.sendInput.disabled = locked;
    el.sendInput.placeholder = locked ? lockReason : '';
    el.sendInput.title = locked ? lockReason : '';
    el.sendButton.disabled = !wsConnected || locked;
  }

  el.lineInput.addEventListener('click', function () {
    lineInputShown = !lineInputShown;
    try { localStorage.setItem(LINE_INPUT_KEY, lineInputShown ? 'on' : 'off'); } catch (err) { /* kept for this page */ }
    setWritable(writable);
    if (!lineInputShown) term.focus();  // typing goes on in the terminal
  });

  var sent = [];            // lines sent, oldest first, bounded by SENT_HISTORY_LIMIT
  var recallIndex = 0;      // == sent.length when not recalling
  var draft = '';           // what was typed before Up was first pressed

  el.sendForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    var line = el.sendInput.value;
    ws.send(encoder.encode(line + LINE_ENDINGS[el.lineEnding.value]));
    lastSentMs = Date.now();
    if (line !== '' && line !== sent[sent.length - 1]) {
      sent.push(line);
      if (sent.length > SENT_HISTORY_LIMIT) sent.shift();
    }
    recallIndex = sent.length;
    draft = '';
    el.sendInput.value = '';
  });

  el.sendInput.addEventListener('keydown', function (ev) {
    if (ev.key !== 'ArrowUp' && ev.key !== 'ArrowDown') return;
    ev.preventDefault();
    if (ev.key === 'ArrowUp') {
      if (recallIndex === 0) return;
      if (recallIndex === sent.length) draft = el.sendInput.value;
      recallIndex--;
    } else {
      if (recallIndex === sent.length) return;
      recallIndex++;
    }
    el.sendInput.value = recallIndex === sent.length ? draft : sent[recallIndex];
    el.sendInput.setSelectionRange(el.sendInput.value.length, el.sendInput.value.length);
  });

  // ---- ports list and clients table -------------------------------------

  var selected = null;      // selected port name
  var portRows = new Map(); // name -> {li, button, state, detail, stats}

  function portFromHash() {
    return new URLSearchParams(location.hash.slice(1)).get('port');
  }

  function select(name) {
    if (name === selected) return;
    selected = name;
    el.portTitle.textContent = name === null ? 'No port selected' : name;
    portRows.forEach(function (row, rowName) {
      row.button.setAttribute('aria-current', String(rowName === name));
    });
    setWritable(false);  // until the next poll says whether it is writable
    el.clients.textContent = '';
    openPort(name);
  }

  function portRow(name) {
    var row = portRows.get(name);
    if (row) return row;
    var li = make('li');
    li.setAttribute('data-testid', 'port-' + name);
    var button = make('button');
    button.type = 'button';
    button.setAttribute('aria-current', String(name === selected));
    var head = make('span', 'port-head');
    var state = make('span', 'state');
    state.setAttribute('data-testid', 'state-' + name);
    head.appendChild(make('span', 'port-name', name));
    head.appendChild(state);
    var detail = make('span', 'port-detail');
    var stats = make('span', 'port-stats');
    var line = make('span', 'port-line');
    line.setAttribute('data-testid', 'line-' + name);
    button.appendChild(head);
    button.appendChild(detail);
    button.appendChild(line);
    button.appendChild(stats);
    button.addEventListener('click', function () {
      location.hash = 'port=' + encodeURIComponent(name);
    });
    li.appendChild(button);
    // Board control sits beside the card's button, not in it: a button may
    // not hold another. Filled by renderControls from the port's sequences.
    var controls = make('div', 'port-controls');
    controls.setAttribute('data-testid', 'controls-' + name);
    li.appendChild(controls);
    row = { li: li, button: button, state: state, detail: detail, stats: stats, line: line,
      controls: controls, sequences: null };
    portRows.set(name, row);
    return row;
  }

  function renderPorts(ports) {
    var seen = new Set();
    ports.forEach(function (p) {
      seen.add(p.name);
      var row = portRow(p.name);
      row.state.textContent = p.state;
      row.state.className = 'state state-' + p.state;
      // `since` is when the port last went up or down: retries inside an outage
      // do not move it, so "since 3m" answers "how long has the board been gone?".
      // The current attempt shows separately.
      var attempt = '';
      if (p.state !== 'up' && p.attempts) {
        attempt = ' · attempt ' + p.attempts;
        if (typeof p.next_attempt_in === 'number') {
          attempt += ', next in ' + p.next_attempt_in.toFixed(1) + 's';
        }
      }
      row.detail.textContent = (p.reason || '') + ' · since ' + fmtAge(p.since) + attempt;
      row.detail.title = fmtTime(p.since);
      row.stats.textContent = '';
      row.stats.appendChild(document.createTextNode(
        p.clients + (p.clients === 1 ? ' client' : ' clients') +
        ' · in ' + fmtBytes(p.bytes_in) + ' · out ' + fmtBytes(p.bytes_out) +
        ' · max\u00a0lag ' + fmtBytes(p.max_lag)));
      if (typeof p.dropped === 'number') {
        row.stats.appendChild(make('span', p.dropped ? 'dropped' : '',
          ' · dropped ' + fmtBytes(p.dropped)));
      }
      renderLine(row, p.line);
      renderControls(row, p.name, p.line);
      el.ports.appendChild(row.li);  // re-appending keeps the daemon's order
    });
    portRows.forEach(function (row, name) {
      if (!seen.has(name)) {
        row.li.remove();
        portRows.delete(name);
      }
    });
    el.portsEmpty.hidden = ports.length > 0;
    el.portsEmpty.textContent = 'No ports configured.';

    var current = ports.filter(function (p) { return p.name === selected; })[0];
    setWritable(Boolean(current && current.writable), lockedOut(current));
    if (selected !== null) {
      el.portTitle.textContent = current ? selected : selected + ' (no such port)';
    }
  }

  // ---- board control: the line state and buttons on the port card --------

  // What the BREAK button sends: long enough for a Linux magic SysRq or a
  // bootloader's break detection (100-500 ms), short enough not to look hung.
  var BREAK_SECONDS = 0.25;

  function level(value) { return value === null || value === undefined ? '?' : (value ? 'high' : 'low'); }

  function renderLine(row, line) {
    if (!line) { row.line.textContent = ''; return; }
    // A pty, or a K2 without RFC 2217 control, has no modem lines to show.
    var text = line.baudrate + ' ' + line.format + (line.control_lines === false
      ? ' · DTR/RTS n/a' : ' · DTR ' + level(line.dtr) + ' · RTS ' + level(line.rts));
    if (line['break']) text += ' · BREAK';
    if (line.running) text += ' · running ' + line.running;
    if (line.owner) text += ' · owner ' + line.owner;
    row.line.textContent = text;
    row.line.title = 'flow ' + line.flow + (line.changed_by
      ? '; last changed by ' + line.changed_by + ' ' + fmtAge(line.changed_at) + ' ago' : '');
  }

  async function postJson(path, body) {
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, FETCH_TIMEOUT_MS);
    try {
      var headers = { 'Content-Type': 'application/json' };
      if (token) headers.Authorization = 'Bearer ' + token;
      var resp = await fetch(path, { method: 'POST', signal: ctrl.signal, headers: headers,
        body: JSON.stringify(body || {}) });
      var answer = await resp.json().catch(function () { return {}; });
      if (!resp.ok) throw new Error(answer.error || ('HTTP ' + resp.status));
      return answer;
    } finally {
      clearTimeout(timer);
    }
  }

  function controlButton(name, label, title, path, body) {
    var b = make('button', 'control', label);
    b.type = 'button';
    b.title = title;
    b.setAttribute('data-testid', 'control-' + name + '-' + label);
    b.addEventListener('click', async function () {
      b.disabled = true;
      try {
        await postJson(path, body);
        el.apiStatus.textContent = name + ': ' + label + ' sent';
      } catch (err) {
        el.apiStatus.textContent = name + ': ' + label + ' refused: ' + err.message;
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  function renderControls(row, name, line) {
    var names = line && line.sequences ? line.sequences : [];
    var key = names.join('\n');
    if (row.sequences === key) return;  // rebuilt only when the config changed
    row.sequences = key;
    row.controls.textContent = '';
    if (!line) return;
    var base = 'api/v1/ports/' + encodeURIComponent(name);
    names.forEach(function (seq) {
      row.controls.appendChild(controlButton(name, seq, 'Run the sequence ' + seq + ' (an admin action)',
        base + '/sequences/' + encodeURIComponent(seq)));
    });
    row.controls.appendChild(controlButton(name, 'BREAK', 'Send a BREAK of ' + BREAK_SECONDS * 1000 + ' ms',
      base + '/signals', { 'break': BREAK_SECONDS }));
  }

  function renderClients(clients) {
    el.clients.textContent = '';
    if (!clients.length) {
      var tr = make('tr');
      var td = make('td', 'muted', 'No clients.');
      td.colSpan = 7;
      tr.appendChild(td);
      el.clients.appendChild(tr);
      return;
    }
    clients.forEach(function (c) {
      var tr = make('tr');
      var since = make('td', '', fmtAge(c.since));
      since.title = fmtTime(c.since);
      [make('td', '', c.peer), make('td', '', c.listener), make('td', '', c.mode), since,
        make('td', 'num', fmtBytes(c.delivered)), make('td', 'num', fmtBytes(c.dropped)),
        make('td', 'num', fmtBytes(c.lag))].forEach(function (td) { tr.appendChild(td); });
      el.clients.appendChild(tr);
    });
  }

  async function getJson(path) {
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, FETCH_TIMEOUT_MS);
    try {
      var headers = token ? { Authorization: 'Bearer ' + token } : {};
      var resp = await fetch(path, { signal: ctrl.signal, cache: 'no-store', headers: headers });
      if (resp.status === 401) {
        token = null;
        store(null);
        if (askForToken()) {
          // The socket failed without the token too: reopen it with it now.
          if (wsPort !== null) openPort(wsPort);
          return getJson(path);
        }
        throw new Error('a token is needed (reload the page to enter one)');
      }
      if (resp.ok) askedForToken = false;
      if (!resp.ok) throw new Error(path + ': HTTP ' + resp.status);
      return await resp.json();
    } finally {
      clearTimeout(timer);
    }
  }

  async function poll() {
    try {
      var ports = (await getJson('api/v1/ports')).ports;
      renderPorts(ports);
      if (selected === null && ports.length) {
        // No #port= in the link: show the first port, and put it in the URL
        // so the address bar is a link to what is on screen.
        history.replaceState(null, '', '#port=' + encodeURIComponent(ports[0].name));
        select(ports[0].name);
      }
      var port = selected;
      if (port !== null && portRows.has(port)) {
        var clients = (await getJson('api/v1/ports/' + encodeURIComponent(port) + '/clients')).clients;
        if (port === selected) renderClients(clients);
      }
      el.apiStatus.textContent = '';
    } catch (err) {
      el.apiStatus.textContent = 'API unreachable: ' + err.message;
    }
    setTimeout(poll, REFRESH_MS);
  }

  window.addEventListener('hashchange', function () { select(portFromHash()); });

  window.muxdConsole = { text: terminalText };

  select(portFromHash());
  poll();
})();
