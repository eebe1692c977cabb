// The signaling socket (PROTOCOL.md): join, resume after a drop, keep-alive, and a
// queue so that nothing the client says during a short outage is lost.

/**
 * @typedef {{type: string, [key: string]: any}} Msg
 * @typedef {{
 *   onMessage: (msg: Msg) => void,
 *   onState: (state: 'connecting'|'open'|'reconnecting'|'unreachable') => void,
 * }} SignalingHandlers
 */

const PING_EVERY_MS = 10000;
const SILENCE_LIMIT_MS = 30000;
const BACKOFF_MS = [300, 700, 1500, 3000, 5000];
/** Consecutive failed first attempts before the server counts as unreachable. */
const FIRST_CONNECT_TRIES = 3;
/** A socket that has not opened by then is given up and retried. */
const OPEN_TIMEOUT_MS = 8000;

export class Signaling {
  /**
   * @param {string} url
   * @param {SignalingHandlers} handlers
   */
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    /** @type {WebSocket|null} */
    this.ws = null;
    /** join message fields (room, name, password) */
    /** @type {{room: string, name?: string, password?: string}|null} */
    this.joinFields = null;
    /** resume token from the last `joined` */
    /** @type {string|null} */
    this.resumeToken = null;
    /** true between `joined` and the socket going away */
    this.joined = false;
    /** messages for peers, held while not joined */
    /** @type {Msg[]} */
    this.queue = [];
    this.stopped = false;
    this.everOpened = false;
    this.attempt = 0;
    this.lastHeard = 0;
    /** when the oldest ping not yet answered was sent (0: none) */
    this.pingSince = 0;
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this.pinger = undefined;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.retryTimer = undefined;
  }

  /** Opens the socket; `join` is sent when it opens. */
  connect() {
    this.stopped = false;
    clearTimeout(this.retryTimer);
    this.handlers.onState(this.everOpened ? 'reconnecting' : 'connecting');
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    const openTimer = setTimeout(() => {
      if (this.ws === ws && ws.readyState === WebSocket.CONNECTING) this.drop();
    }, OPEN_TIMEOUT_MS);
    ws.onopen = () => {
      clearTimeout(openTimer);
      if (this.ws !== ws) return;
      this.everOpened = true;
      this.attempt = 0;
      this.lastHeard = Date.now();
      this.pingSince = 0;
      if (this.joinFields) this.sendJoin();
      clearInterval(this.pinger);
      this.pinger = setInterval(() => this.keepAlive(), PING_EVERY_MS);
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      let msg;
      try {
        msg = JSON.parse(typeof ev.data === 'string' ? ev.data : '');
      } catch {
        return;
      }
      if (!msg || typeof msg.type !== 'string') return;
      if (msg.type === 'joined') {
        this.joined = true;
        this.resumeToken = typeof msg.resume === 'string' ? msg.resume : null;
        if (!msg.resumed) this.queue = [];
        // The `joined` handler runs first (it may reset peers), then the queue drains.
        this.handlers.onMessage(msg);
        const q = this.queue;
        this.queue = [];
        for (const m of q) this.send(m);
        return;
      }
      if (msg.type === 'pong') return;
      this.handlers.onMessage(msg);
    };
    ws.onclose = () => {
      clearTimeout(openTimer);
      if (this.ws !== ws) return;
      this.ws = null;
      this.joined = false;
      clearInterval(this.pinger);
      if (this.stopped) return;
      this.scheduleRetry();
    };
    ws.onerror = () => {};
  }

  scheduleRetry() {
    this.attempt += 1;
    if (!this.everOpened && this.attempt >= FIRST_CONNECT_TRIES) {
      this.handlers.onState('unreachable');
      return;
    }
    this.handlers.onState(this.everOpened ? 'reconnecting' : 'connecting');
    const delay = BACKOFF_MS[Math.min(this.attempt - 1, BACKOFF_MS.length - 1)];
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  keepAlive() {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const now = Date.now();
    const unanswered = this.pingSince > 0 && this.lastHeard < this.pingSince;
    if (unanswered && now - this.pingSince > SILENCE_LIMIT_MS) {
      // A ping went unanswered: treat the socket as dead and resume on a new one.
      // (Only an unanswered ping counts: timers in background tabs may run just once
      // a minute, which alone is no sign of a dead socket.)
      this.drop();
      return;
    }
    if (!unanswered) this.pingSince = now;
    this.ws.send(JSON.stringify({ type: 'ping' }));
  }

  /**
   * Joins a room (now, or as soon as the socket opens).
   * @param {{room: string, name?: string, password?: string}} fields
   */
  join(fields) {
    this.joinFields = fields;
    this.resumeToken = null;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.sendJoin();
    else if (!this.ws) this.connect();
  }

  sendJoin() {
    if (!this.joinFields) return;
    /** @type {Msg} */
    const m = { type: 'join', room: this.joinFields.room };
    if (this.joinFields.name) m.name = this.joinFields.name;
    if (this.joinFields.password) m.password = this.joinFields.password;
    if (this.resumeToken) m.resume = this.resumeToken;
    this.raw(m);
  }

  /**
   * Sends a message that belongs to the call (offer, answer, candidate, media,
   * chat): held while the socket is down and sent after resuming.
   * @param {Msg} msg
   */
  send(msg) {
    if (this.joined && this.ws && this.ws.readyState === WebSocket.OPEN) this.raw(msg);
    else this.queue.push(msg);
  }

  /**
   * Sends now if possible; returns whether it went out.
   * @param {Msg} msg
   */
  raw(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  /**
   * Closes the socket without `leave` (as a network drop would); it reconnects,
   * after `holdMs` if given (tests use it to make an outage last).
   * @param {number} [holdMs]
   */
  drop(holdMs) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    this.joined = false;
    clearInterval(this.pinger);
    try {
      ws.close();
    } catch {
      /* already closing */
    }
    if (this.stopped) return;
    if (holdMs) {
      this.handlers.onState('reconnecting');
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => this.connect(), holdMs);
    } else this.scheduleRetry();
  }

  /** Sends `leave` and stops reconnecting; the socket stays open for a later join. */
  leave() {
    this.raw({ type: 'leave' });
    this.joined = false;
    this.joinFields = null;
    this.resumeToken = null;
    this.queue = [];
  }

  /** Closes for good. */
  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.pinger);
    if (this.ws) {
      try {
        this.ws.close(1000);
      } catch {
        /* ignore */
      }
    }
    this.ws = null;
  }
}
