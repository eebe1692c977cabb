// The signaling socket (docs/PROTOCOL.md): join, resume after a drop, keep-alive, and a
// queue so that nothing the client says during a short outage is lost. No DOM: the
// page gets messages and connection states through two callbacks. The typedefs below
// are the protocol's messages (version 1.1) as this client reads and writes them.

/**
 * Mute / camera / screen-share state of a participant.
 * `recording` (protocol 1.2): this peer records the call on its device.
 * @typedef {{audio: boolean, video: boolean, screen: boolean, recording?: boolean}} MediaState
 *
 * One ICE server entry as the server hands it out (`urls` is always an array).
 * @typedef {{urls: string[], username?: string, credential?: string}} IceServer
 *
 * `joined.ice` and `ice.ice`: what `new RTCPeerConnection(...)` takes, plus when the
 * TURN credentials expire (Unix seconds).
 * @typedef {{iceServers: IceServer[], iceTransportPolicy: 'all'|'relay', expiresAt: number}} IceConfig
 *
 * @typedef {{id: string, name: string, media: MediaState|null}} PeerInfo
 *
 * A joiner waiting in the room's lobby, as hosts see it (1.1).
 * @typedef {{id: string, name: string}} Waiter
 *
 * @typedef {'bad_message'|'invalid_room'|'invalid_name'|'not_joined'|'already_joined'
 *   |'unknown_peer'|'bad_password'|'rate_limited'|'not_host'|'room_locked'|'lobby_full'} ErrorCode
 */

/**
 * Client to server.
 * @typedef {{type: 'join', room: string, name?: string, password?: string, resume?: string,
 *   room_password?: string}} JoinMsg
 * @typedef {{type: 'offer'|'answer', to: string, sdp: string}} DescriptionOut
 * @typedef {{type: 'candidate', to: string, candidate: RTCIceCandidateInit|null}} CandidateOut
 * @typedef {{type: 'media', audio: boolean, video: boolean, screen: boolean, recording?: boolean}} MediaOut
 * @typedef {{type: 'chat', text: string}} ChatOut
 * @typedef {{type: 'leave'}} LeaveMsg
 * @typedef {{type: 'ping'}} PingMsg
 * @typedef {{type: 'ice_request', password?: string}} IceRequestMsg
 *
 * Host actions (1.1): the server checks that the sender is a host.
 * @typedef {{type: 'host'|'admit'|'deny'|'kick', id: string}} PeerActionMsg
 * @typedef {{type: 'lock', locked: boolean}} LockMsg
 * @typedef {{type: 'room_password', password: string}} RoomPasswordMsg
 * @typedef {{type: 'lobby', on: boolean}} LobbyMsg
 * @typedef {{type: 'mute_request', id: string, audio: boolean, video: boolean}} MuteRequestOut
 * @typedef {PeerActionMsg|LockMsg|RoomPasswordMsg|LobbyMsg|MuteRequestOut} ControlMsg
 *
 * @typedef {JoinMsg|DescriptionOut|CandidateOut|MediaOut|ChatOut|LeaveMsg|PingMsg|IceRequestMsg
 *   |ControlMsg} ClientMsg
 */

/**
 * Server to client.
 * @typedef {{type: 'joined', protocol: number, id: string, room: string, capacity: number,
 *   peers: PeerInfo[], ice: IceConfig, resume: string, resumed: boolean, minor?: number,
 *   hosts?: string[]}} JoinedMsg
 * @typedef {{type: 'peer_joined', id: string, name: string}} PeerJoinedMsg
 * @typedef {{type: 'peer_left', id: string}} PeerLeftMsg
 * @typedef {{type: 'offer'|'answer', from: string, sdp: string}} DescriptionIn
 * @typedef {{type: 'candidate', from: string, candidate: RTCIceCandidateInit|null}} CandidateIn
 * @typedef {{type: 'media', from: string, audio: boolean, video: boolean, screen: boolean, recording?: boolean}} MediaIn
 * @typedef {{type: 'ice', ice: IceConfig}} IceMsg
 * @typedef {{type: 'chat', from: string, name: string, text: string, ts: number}} ChatIn
 * @typedef {{type: 'room_full', room: string, capacity: number}} RoomFullMsg
 * @typedef {{type: 'pong'}} PongMsg
 * @typedef {{type: 'error', code: ErrorCode, message: string, scope?: 'room'}} ErrorMsg
 *
 * Room control (1.1).
 * @typedef {{type: 'room_state', hosts: string[], locked: boolean, password: boolean,
 *   lobby: boolean, waiting?: Waiter[]}} RoomStateMsg
 * @typedef {{type: 'waiting', room: string, id: string}} WaitingMsg
 * @typedef {{type: 'knock', id: string, name: string}} KnockMsg
 * @typedef {{type: 'denied', room: string, reason: 'denied'|'timeout'|'locked'}} DeniedMsg
 * @typedef {{type: 'kicked', by: string, name: string}} KickedMsg
 * @typedef {{type: 'mute_request', from: string, name: string, audio: boolean, video: boolean}} MuteRequestIn
 *
 * @typedef {JoinedMsg|PeerJoinedMsg|PeerLeftMsg|DescriptionIn|CandidateIn|MediaIn|IceMsg|ChatIn
 *   |RoomFullMsg|PongMsg|ErrorMsg|RoomStateMsg|WaitingMsg|KnockMsg|DeniedMsg|KickedMsg
 *   |MuteRequestIn} ServerMsg
 */

/**
 * `ended`: the server removed this client (close code 4002, kicked) or turned it away
 * from the lobby (4003, denied); the socket is not reopened until `join()` or
 * `connect()` is called.
 * @typedef {'connecting'|'open'|'reconnecting'|'unreachable'|'ended'} SignalingState
 * @typedef {{room: string, name?: string, password?: string, room_password?: string}} JoinFields
 * @typedef {{
 *   onMessage: (msg: ServerMsg) => void,
 *   onState: (state: SignalingState) => void,
 * }} SignalingHandlers
 */

const PING_EVERY_MS = 10000;
const SILENCE_LIMIT_MS = 30000;
const BACKOFF_MS = [300, 700, 1500, 3000, 5000];
/** Consecutive failed first attempts before the server counts as unreachable. */
const FIRST_CONNECT_TRIES = 3;
/** A socket that has not opened by then is given up and retried. */
const OPEN_TIMEOUT_MS = 8000;
/** Close codes after which the client must neither resume nor rejoin on its own. */
export const CLOSE_KICKED = 4002;
export const CLOSE_DENIED = 4003;

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
    /** join message fields (room, name, password, room password) */
    /** @type {JoinFields|null} */
    this.joinFields = null;
    /** resume token from the last `joined` */
    /** @type {string|null} */
    this.resumeToken = null;
    /** true between `joined` and the socket going away */
    this.joined = false;
    /** messages for peers, held while not joined */
    /** @type {ClientMsg[]} */
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
    /** the close code that ended the session (4002 or 4003), or 0 */
    this.endCode = 0;
  }

  /** Opens the socket; `join` is sent when it opens. */
  connect() {
    this.stopped = false;
    this.endCode = 0;
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
      let data;
      try {
        data = JSON.parse(typeof ev.data === 'string' ? ev.data : '');
      } catch {
        return;
      }
      if (!data || typeof data.type !== 'string') return;
      // Any object with a string `type`; types this client does not know are passed on
      // and ignored there (later protocol versions may add some).
      /** @type {ServerMsg} */
      const msg = data;
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
    ws.onclose = (ev) => {
      clearTimeout(openTimer);
      if (this.ws !== ws) return;
      this.ws = null;
      this.joined = false;
      clearInterval(this.pinger);
      if (ev.code === CLOSE_KICKED || ev.code === CLOSE_DENIED) {
        // Removed by a host, or turned away from the lobby: the identity is gone and
        // coming back is the person's decision, so no resume and no rejoin.
        this.stopped = true;
        this.endCode = ev.code;
        this.joinFields = null;
        this.resumeToken = null;
        this.queue = [];
        this.handlers.onState('ended');
        return;
      }
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
   * @param {JoinFields} fields
   */
  join(fields) {
    this.joinFields = fields;
    this.resumeToken = null;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.sendJoin();
    else if (!this.ws) this.connect();
  }

  sendJoin() {
    if (!this.joinFields) return;
    /** @type {JoinMsg} */
    const m = { type: 'join', room: this.joinFields.room };
    if (this.joinFields.name) m.name = this.joinFields.name;
    if (this.joinFields.password) m.password = this.joinFields.password;
    if (this.joinFields.room_password) m.room_password = this.joinFields.room_password;
    if (this.resumeToken) m.resume = this.resumeToken;
    this.raw(m);
  }

  /**
   * Sends a message that belongs to the call (offer, answer, candidate, media,
   * chat): held while the socket is down and sent after resuming.
   * @param {ClientMsg} msg
   */
  send(msg) {
    if (this.joined && this.ws && this.ws.readyState === WebSocket.OPEN) this.raw(msg);
    else this.queue.push(msg);
  }

  /**
   * Sends now if possible; returns whether it went out.
   * @param {ClientMsg} msg
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
