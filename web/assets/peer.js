// One RTCPeerConnection to one other participant: perfect negotiation, buffered ICE
// candidates, calm ICE restart, connection state and path, local tracks that arrive
// late, mesh-aware sender limits. No DOM and no socket: messages for the other side
// go out through `hooks.send`.

import { fingerprintOf, SafetyExchange, SAFETY_CHANNEL } from './safety.js';

/**
 * What a tile says about the connection:
 * - connecting: not connected yet, or connected but the selected candidate pair is
 *   not known yet (the path is not claimed before it is known);
 * - direct / relay: connected, on the selected pair's path (`path`);
 * - connected: connected, in a browser whose stats do not say which pair is selected;
 * - reconnecting: the connection's own state is `disconnected`, or `connecting` again
 *   after it had been connected (an ICE restart);
 * - failed: the connection's state is `failed` (a restart follows, with back-off).
 * @typedef {'connecting'|'connected'|'direct'|'relay'|'reconnecting'|'failed'} PeerState
 * @typedef {{local: string, remote: string, protocol: string, relayProtocol: string,
 *   localAddress: string, remoteAddress: string}} Path
 * @typedef {import('./signaling.js').MediaState} MediaState
 * @typedef {{
 *   send: (msg: import('./signaling.js').ClientMsg) => void,
 *   onState: (peer: Peer) => void,
 *   onTracks: (peer: Peer) => void,
 *   local: () => {stream: MediaStream, audio: MediaStreamTrack|null, video: MediaStreamTrack|null,
 *                  screen: MediaStream|null},
 *   limits: () => {video: {maxBitrate: number, scale: number}, screen: {maxBitrate: number}},
 *   onSafety?: (peer: Peer, r: {code: string, local: string, remote: string}) => void,
 *   onChannel?: (peer: Peer, channel: RTCDataChannel|null) => void,
 * }} PeerHooks
 */

/**
 * The data channel every connection carries (file sharing, files.js), negotiated
 * out of band with a fixed id: created with the connection's first media (start on
 * the offering side, attachLocal on the answering side), so the first offer has
 * its m=application section and nothing renegotiates for it later. (Made before
 * that, on the answering side, it would have that side offer too, colliding with
 * the offer on its way.)
 */
export const DATA_CHANNEL = { label: 'meshmeet', id: 0 };

/**
 * How long a connection may stay `disconnected` before an ICE restart. A missed
 * consent-freshness check (RFC 7675) makes a connection `disconnected` for a few
 * seconds on a busy machine and it comes back by itself: measured here between
 * Firefox ESR and Chromium on a starved two-core machine, such blips lasted 5-7 s
 * (docs/CLIENT.md). A real loss of the path turns `failed` (about 30 s after the
 * last answer in both browsers) unless this restart comes first.
 */
export const DISCONNECTED_RESTART_MS = 12_000;
/**
 * How much later the ICE-controlling side of a connection starts a restart than the
 * controlled side would: the restart is left to the controlled side where it sees
 * the trouble too. A Chromium that offers a restart while controlling may nominate a
 * pair to its peer's previous ICE generation (its old candidates are kept and
 * Firefox's old generation still answers checks), which carries no media until
 * the peer restarts again (docs/CLIENT.md, "A restart that never completes").
 */
const CONTROLLING_DEFER_MS = 5_000;
/**
 * How long an offer may go unanswered before it is sent again; each further wait
 * doubles, up to ANSWER_TIMEOUT_MAX_MS. Shorter than DISCONNECTED_RESTART_MS: a
 * Firefox that answered an ICE restart whose answer was lost is on the new ICE
 * generation alone and goes `disconnected`; the offer sent again (and the same
 * answer with it) must come before that side restarts on its own. A repeat is
 * cheap: the other side answers it with the answer it sent already.
 */
const ANSWER_TIMEOUT_MS = 6_000;
const ANSWER_TIMEOUT_MAX_MS = 60_000;
/**
 * How long a description that starts a new ICE generation waits for its first local
 * candidate before it is sent without one (it ends as soon as one is gathered).
 */
const GATHER_WAIT_MS = 5_000;
/** Remote candidates kept for an ICE generation whose description has not come yet. */
const EARLY_CANDIDATES_MAX = 64;
/** A restart that has not connected after this long counts as failed. */
const RESTART_TIMEOUT_MS = 30_000;
/** Refused answers handled by offering again with an ICE restart, between connections. */
const ANSWER_REFUSALS_MAX = 3;
/** Refused offers handled by a new connection, between connections that connected. */
const OFFER_REFUSALS_MAX = 3;
/** Back-off before a further restart after failed ones: doubling from, at most. */
const BACKOFF_FIRST_MS = 2_000;
const BACKOFF_MAX_MS = 60_000;
/** How often the selected candidate pair is re-read (where no event says it changed). */
const PATH_POLL_MS = 2_000;

let serial = 0;

/** The ICE username fragment of a description (for diagnostics). @param {string|undefined} sdp */
function ufragOf(sdp) {
  return ((sdp || '').match(/a=ice-ufrag:(\S+)/) || [])[1] || '';
}

/** The session id of a description (its `o=` line): one per RTCPeerConnection. @param {string|undefined} sdp */
function sessionOf(sdp) {
  return ((sdp || '').match(/^o=\S+ (\S+) /m) || [])[1] || '';
}

/**
 * The session-level attribute with which an answer names the offer it answers: the
 * offer's `o=` session id and version. Other clients may leave it out.
 */
const ANSWERS_ATTR = 'a=x-meshmeet-answers:';

/** The offer an answer names (see ANSWERS_ATTR), or null. @param {string} sdp */
function answersOf(sdp) {
  const m = sdp.match(/^a=x-meshmeet-answers:(.*?)\r?$/m);
  return m ? m[1] : null;
}

/** An offer's name for ANSWERS_ATTR: its `o=` session id and version. @param {string} sdp */
function offerName(sdp) {
  const m = sdp.match(/^o=\S+ (\S+) (\S+) /m);
  return m ? `${m[1]} ${m[2]}` : '';
}

/** How many candidates a description carries (for diagnostics). @param {string} sdp */
function candidates(sdp) {
  return (sdp.match(/\na=candidate:/g) || []).length;
}

/**
 * A signaling message for this connection.
 * @typedef {{type: 'candidate', to: string, candidate: RTCIceCandidateInit|null}} CandidateMsg
 */

/** @param {RTCRtpTransceiver} t */
function isStopped(t) {
  return t.currentDirection === 'stopped' || t.direction === 'stopped';
}

export class Peer {
  /**
   * @param {string} id remote peer id
   * @param {string} name
   * @param {boolean} polite
   * @param {RTCConfiguration} config
   * @param {PeerHooks} hooks
   */
  constructor(id, name, polite, config, hooks) {
    this.id = id;
    this.name = name;
    this.polite = polite;
    this.hooks = hooks;
    this.config = config;
    /** a number unique to this connection object (tests check it survives a resume) */
    this.serial = ++serial;
    /** @type {MediaState|null} */
    this.media = null;
    /** @type {PeerState} */
    this.state = 'connecting';
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.closed = false;
    /** @type {RTCIceCandidateInit[]} candidates that arrived before the remote description */
    this.pendingCandidates = [];
    /** remote streams: camera+mic, and screen */
    /** @type {MediaStream|null} */
    this.mainStream = null;
    /** @type {MediaStream|null} */
    this.screenStream = null;
    /** @type {RTCRtpTransceiver|null} */
    this.audioTx = null;
    /** @type {RTCRtpTransceiver|null} */
    this.videoTx = null;
    /** @type {RTCRtpTransceiver|null} */
    this.screenTx = null;
    this.attached = false;
    /** a scheduled ICE restart (disconnected too long, or failed with back-off) */
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.restartTimer = undefined;
    /** a restart under way: no second one until it connects or times out */
    this.restarting = false;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.restartWatch = undefined;
    /** restarts since the connection was last connected (drives the back-off) */
    this.failedRestarts = 0;
    /** ICE restarts started, in all (for the test handle and diagnostics) */
    this.restarts = 0;
    /** durations (ms) of `disconnected` spells that ended, and when the current began */
    /** @type {number[]} */
    this.blips = [];
    this.disconnectedSince = 0;
    /** the last connection state acted on */
    this.lastCs = '';
    this.everConnected = false;
    /** offers sent, and remote answers whose DTLS role was set back (for diagnostics) */
    this.offers = 0;
    this.roleFixes = 0;
    /** the selected pair's path; null until known */
    /** @type {Path|null} */
    this.path = null;
    /** false while the browser's stats name no selected pair at all */
    this.pathKnowable = true;
    /** a read of the selected pair under way, and whether another was asked for meanwhile */
    this.pathReading = false;
    this.pathAgain = false;
    /** re-reads the selected candidate pair now and then (it can change) */
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this.pathTimer = undefined;
    /** a restart scheduled because no pair is selected while connected */
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.noPathTimer = undefined;
    /** restarts made for that reason (diagnostics) */
    this.noPathRestarts = 0;
    /** our ICE role as the browser's stats last said ('controlling', 'controlled'), or '' */
    this.iceRole = '';
    /** waits for the answer to our last offer */
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.answerWatch = undefined;
    /** offers sent again for want of an answer (diagnostics) */
    this.unanswered = 0;
    /** answers the browser refused since the connection was last connected (see answerRefused) */
    this.answerRefusals = 0;
    /** offers of the other side the browser refused since the connection was last connected (see offerRefused) */
    this.offerRefusals = 0;
    /**
     * Negotiation steps run one after another (descriptions, candidates, our offers):
     * a step that awaits the browser is never overtaken by the next message.
     * @type {Promise<void>}
     */
    this.queue = Promise.resolve();
    /** the text of our offer that waits for its answer (sent again as it was) */
    this.sentOffer = '';
    /** the last remote offer applied and our answer to it, and the last remote answer applied */
    this.lastOfferIn = '';
    this.lastAnswerOut = '';
    this.lastAnswerIn = '';
    /** our candidates held back until the description they belong to has been sent */
    /** @type {CandidateMsg[]|null} */
    this.held = null;
    /** remote candidates of an ICE generation whose description has not arrived yet */
    /** @type {RTCIceCandidateInit[]} */
    this.early = [];
    /** our ICE username fragment when the restart under way was asked for */
    this.restartUfrag = '';
    /** connections replaced by new ones (see renew) */
    this.renewals = 0;
    /** the other side's session id (`o=`) last seen, and those it has replaced */
    this.remoteSession = '';
    /** @type {string[]} */
    this.retired = [];
    this.pairEventHooked = false;
    /** the last negotiation and connection events, oldest first (for diagnostics) */
    /** @type {string[]} */
    this.trace = [];
    this.born = Date.now();
    /**
     * From when the first frame of this peer counts (performance.now()): when it
     * arrived, or our Join if it was there already; and when that frame was shown.
     */
    this.since = performance.now();
    this.firstFrameAt = 0;
    /** when things first happened on this connection (performance.now(); diagnostics) */
    /** @type {Record<string, number>} */
    this.marks = {};
    /** the safety-code exchange on this connection (safety.js), once it has a channel */
    /** @type {SafetyExchange|null} */
    this.safety = null;
    /** the data channel of the current connection (see DATA_CHANNEL), null until made */
    /** @type {RTCDataChannel|null} */
    this.channel = null;
    this.pc = new RTCPeerConnection(config);
    this.wire();
  }

  /**
   * The current connection's negotiated data channels, made by the offering side
   * with its transceivers (the first offer carries them: no renegotiation of their
   * own) and by the answering side when that offer arrives: the safety-code
   * exchange's (safety.js), and file sharing's, handed to `hooks.onChannel`.
   */
  openChannels() {
    if (this.closed) return;
    if (this.safety) this.safety.close();
    const safety = this.pc.createDataChannel(SAFETY_CHANNEL.label, { negotiated: true, id: SAFETY_CHANNEL.id });
    this.safety = new SafetyExchange(safety, () => this.fingerprints(),
      (r) => { this.note(`safety code (${r.code})`); if (this.hooks.onSafety && !this.closed) this.hooks.onSafety(this, r); },
      (why) => this.note(`no safety code: ${why}`));
    if (this.channel) return;
    try {
      this.channel = this.pc.createDataChannel(DATA_CHANNEL.label, { negotiated: true, id: DATA_CHANNEL.id });
    } catch (e) {
      this.note(`data channel failed: ${e}`);
      return;
    }
    this.hooks.onChannel?.(this, this.channel);
  }

  /** The connection is closed or replaced: its data channels with it. */
  dropChannels() {
    if (this.safety) this.safety.close();
    this.safety = null;
    if (!this.channel) return;
    this.channel = null;
    this.hooks.onChannel?.(this, null);
  }

  /**
   * Notes an event in `trace` (bounded), with the time since the connection was made.
   * @param {string} what
   */
  note(what) {
    const pc = this.pc;
    this.trace.push(`${((Date.now() - this.born) / 1000).toFixed(1)}s ${what} [${pc.signalingState}/${pc.iceConnectionState}/${pc.connectionState}]`);
    if (this.trace.length > 100) this.trace.shift();
    const k = what.replace(/ \(.*$/, '').replace(/ \d+/, '');
    if (!(k in this.marks) && Object.keys(this.marks).length < 32) this.marks[k] = performance.now();
  }

  wire() {
    const pc = this.pc;
    pc.onnegotiationneeded = () => {
      this.note('negotiationneeded');
      this.run(() => this.negotiate());
    };
    pc.onicecandidate = ({ candidate }) => {
      if (this.closed) return;
      /** @type {CandidateMsg} */
      const msg = { type: 'candidate', to: this.id, candidate: candidate ? candidate.toJSON() : null };
      if (this.held) this.held.push(msg);
      else this.hooks.send(msg);
    };
    pc.ontrack = (ev) => this.onTrack(ev);
    pc.onconnectionstatechange = () => { this.note('connectionstate'); this.updateState(); };
    pc.oniceconnectionstatechange = () => { this.note('iceconnectionstate'); this.updateState(); };
    pc.onsignalingstatechange = () => {
      this.note('signalingstate');
      if (pc.signalingState !== 'stable') return;
      clearTimeout(this.answerWatch);
      this.answerWatch = undefined;
      this.applyLimits();
      if (this.safety) this.safety.descriptions();
      // A restart of a connection that stayed connected ends with its negotiation:
      // once new ICE credentials of ours are in force. (A `stable` with the old ones
      // is our restart offer rolled back in a collision; the browser offers again.)
      if (this.restarting && this.connState() === 'connected' &&
          ufragOf(pc.currentLocalDescription?.sdp) !== this.restartUfrag) {
        this.restartDone();
        this.failedRestarts = 0;
      }
    };
  }

  /**
   * Runs a negotiation step after the ones before it.
   * @param {() => Promise<void>} step
   */
  run(step) {
    this.queue = this.queue.then(() => (this.closed ? undefined : step())).catch((e) => {
      this.note(`negotiation step failed: ${e}`);
      console.warn('negotiation step failed', e);
    });
    return this.queue;
  }

  /**
   * For a local description that starts a new ICE generation (the first one, or an
   * ICE restart): waits until it holds a candidate, or gathering ends, at most
   * GATHER_WAIT_MS. Such a description has no candidate when set; sent with one,
   * the other side can check a pair at once instead of waiting for trickled
   * candidates, which a busy machine delivers late (Firefox fails an ICE generation
   * with nothing to check about 5 s after its description, and a Firefox
   * connection that failed sends no media any more; docs/CLIENT.md). A description
   * in the same generation as before carries its candidates already.
   * @param {string} before our ICE username fragment before this description
   */
  gathered(before) {
    const pc = this.pc;
    const sdp = () => pc.localDescription?.sdp || '';
    const ready = () => this.closed || /\na=candidate:/.test(sdp());
    if ((before && ufragOf(sdp()) === before) || ready()) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener('icecandidate', check);
        pc.removeEventListener('icegatheringstatechange', check);
        resolve(undefined);
      };
      const check = () => { if (ready() || pc.iceGatheringState === 'complete') done(); };
      const timer = setTimeout(done, GATHER_WAIT_MS);
      pc.addEventListener('icecandidate', check);
      pc.addEventListener('icegatheringstatechange', check);
    });
  }

  /**
   * Sends the candidates held back while a description was made (those it carries
   * already are left out).
   * @param {string} sdp the description sent, or '' if none was
   */
  releaseCandidates(sdp) {
    const held = this.held || [];
    this.held = null;
    if (this.closed) return;
    for (const m of held) {
      if (m.candidate && m.candidate.candidate && sdp.includes(`a=${m.candidate.candidate}\r\n`)) continue;
      this.hooks.send(m);
    }
  }

  /**
   * Makes an offer (perfect negotiation) and watches for its answer. Runs as a
   * negotiation step (`run`).
   */
  async negotiate() {
    const pc = this.pc;
    // One offer at a time: negotiationneeded comes again once stable if the change
    // still needs it.
    if (this.closed || pc.signalingState !== 'stable') return;
    let sent = '';
    this.makingOffer = true;
    this.held = [];
    const before = ufragOf(pc.currentLocalDescription?.sdp);
    try {
      await pc.setLocalDescription();
      const offering = () => /** @type {RTCSignalingState} */ (pc.signalingState) === 'have-local-offer';
      if (!offering()) return;
      await this.gathered(before);
      const d = pc.localDescription;
      if (this.closed || !d || d.type !== 'offer' || !offering()) return;
      this.offers += 1;
      sent = d.sdp;
      this.sentOffer = sent;
      this.hooks.send({ type: 'offer', to: this.id, sdp: sent });
      this.note(`offer ${this.offers} sent (ufrag ${ufragOf(sent)}, ${candidates(sent)} candidates)`);
      this.watchAnswer(this.offers, ANSWER_TIMEOUT_MS);
    } catch (e) {
      this.note(`offer failed: ${e}`);
      console.warn('offer failed', e);
    } finally {
      this.makingOffer = false;
      this.releaseCandidates(sent);
    }
  }

  /**
   * An offer that gets no answer (lost with a signaling socket that died, or its
   * answer lost) would leave the connection in `have-local-offer` for good: no
   * further renegotiation, no ICE restart. After ANSWER_TIMEOUT_MS (then doubling)
   * the same offer is sent again, word for word: the other side answers it if it
   * never had it, and sends its answer again if it had (see onDescription).
   * @param {number} n the offer's number (`offers` when it was sent)
   * @param {number} ms
   */
  watchAnswer(n, ms) {
    clearTimeout(this.answerWatch);
    this.answerWatch = setTimeout(() => {
      this.answerWatch = undefined;
      const pc = this.pc;
      if (this.closed || pc.signalingState !== 'have-local-offer' || this.offers !== n || !this.sentOffer) return;
      this.unanswered += 1;
      this.note(`offer ${n} unanswered: sent again`);
      this.hooks.send({ type: 'offer', to: this.id, sdp: this.sentOffer });
      this.watchAnswer(n, Math.min(ANSWER_TIMEOUT_MAX_MS, ms * 2));
    }, ms);
  }

  /** The connection state (`iceConnectionState` where `connectionState` is missing). */
  connState() {
    const pc = this.pc;
    if ('connectionState' in pc && pc.connectionState) return pc.connectionState;
    const ice = pc.iceConnectionState;
    if (ice === 'completed') return 'connected';
    if (ice === 'checking') return 'connecting';
    return ice;
  }

  /**
   * The newcomer's side: send our media (or receive-only slots) and offer.
   */
  start() {
    const local = this.hooks.local();
    this.audioTx = this.pc.addTransceiver(local.audio || 'audio', {
      direction: local.audio ? 'sendrecv' : 'recvonly',
      streams: [local.stream],
    });
    this.videoTx = this.pc.addTransceiver(local.video || 'video', {
      direction: local.video ? 'sendrecv' : 'recvonly',
      streams: [local.stream],
    });
    this.attached = true;
    this.openChannels();
    if (local.screen) this.setScreen(local.screen);
    // negotiationneeded fires and sends the offer.
  }

  /**
   * The answering side, on the first offer: send our media on the transceivers the
   * offer created.
   */
  attachLocal() {
    if (this.attached) return;
    this.attached = true;
    this.openChannels();
    const local = this.hooks.local();
    const txs = this.pc.getTransceivers();
    const audioTx = txs.find((t) => t.receiver.track.kind === 'audio' && !isStopped(t)) || null;
    const videoTx = txs.find((t) => t.receiver.track.kind === 'video' && !isStopped(t)) || null;
    if (local.audio && audioTx) {
      const s = this.pc.addTrack(local.audio, local.stream);
      this.audioTx = this.pc.getTransceivers().find((t) => t.sender === s) || null;
    } else this.audioTx = audioTx;
    if (local.video && videoTx) {
      const s = this.pc.addTrack(local.video, local.stream);
      this.videoTx = this.pc.getTransceivers().find((t) => t.sender === s) || null;
    } else this.videoTx = videoTx;
    if (local.screen) queueMicrotask(() => local.screen && this.setScreen(local.screen));
  }

  /**
   * Starts (stream) or stops (null) sending a screen share; renegotiates.
   * @param {MediaStream|null} stream
   */
  setScreen(stream) {
    if (this.closed) return;
    const track = stream ? stream.getVideoTracks()[0] || null : null;
    if (track && stream) {
      if (this.screenTx && !isStopped(this.screenTx)) {
        this.screenTx.sender.replaceTrack(track);
        if (this.screenTx.sender.setStreams) this.screenTx.sender.setStreams(stream);
        this.screenTx.direction = 'sendonly';
      } else {
        this.screenTx = this.pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
      }
      this.applyLimits();
    } else if (this.screenTx && !isStopped(this.screenTx)) {
      this.screenTx.sender.replaceTrack(null);
      this.screenTx.direction = 'inactive';
    }
  }

  /**
   * Puts a camera or microphone track on this connection: a device switched, a
   * camera turned back on, or devices that opened only after the connection was set
   * up. A slot that was receive-only starts sending, which renegotiates.
   * @param {'audio'|'video'} kind
   * @param {MediaStreamTrack|null} track
   */
  replaceTrack(kind, track) {
    if (this.closed) return;
    const tx = kind === 'audio' ? this.audioTx : this.videoTx;
    // Not attached yet (the answering side before the first offer): attachLocal
    // picks up the current tracks then.
    if (!tx || isStopped(tx)) return;
    const sender = tx.sender;
    if (sender.track !== track) {
      sender.replaceTrack(track).then(() => this.applyLimits()).catch((e) => console.warn('replaceTrack', e));
    }
    if (track) {
      // Without setStreams (not in every browser) the remote side still maps the
      // track by its transceiver.
      if (typeof sender.setStreams === 'function') {
        try { sender.setStreams(this.hooks.local().stream); } catch { /* kept as it was */ }
      }
      if (tx.direction === 'recvonly') tx.direction = 'sendrecv';
      else if (tx.direction === 'inactive') tx.direction = 'sendonly';
    }
  }

  /** Brings this connection's camera and microphone up to the current local tracks. */
  syncLocal() {
    const local = this.hooks.local();
    this.replaceTrack('audio', local.audio);
    this.replaceTrack('video', local.video);
  }

  /** @param {RTCTrackEvent} ev */
  onTrack(ev) {
    const track = ev.track;
    const tx = ev.transceiver;
    // Camera and microphone travel on the first audio and first video transceiver of
    // the pair (the same ones both ways); any other video transceiver is a screen share.
    const firstOfKind = this.pc.getTransceivers().find((t) => t.receiver.track.kind === track.kind);
    const isMain = tx === this.audioTx || tx === this.videoTx || (!this.attached && tx === firstOfKind) ||
      track.kind === 'audio';
    if (isMain) {
      if (!this.mainStream) this.mainStream = new MediaStream();
      for (const old of this.mainStream.getTracks()) {
        if (old.kind === track.kind && old !== track) this.mainStream.removeTrack(old);
      }
      if (!this.mainStream.getTracks().includes(track)) this.mainStream.addTrack(track);
    } else {
      this.screenStream = new MediaStream([track]);
    }
    const onChange = () => this.hooks.onTracks(this);
    track.addEventListener('unmute', onChange);
    track.addEventListener('mute', onChange);
    track.addEventListener('ended', onChange);
    this.hooks.onTracks(this);
  }

  /**
   * A description from the remote peer (perfect negotiation), applied after the
   * steps before it.
   * @param {RTCSessionDescriptionInit} description
   */
  onDescription(description) {
    if (this.closed) return Promise.resolve();
    return this.run(() => this.applyDescription(description));
  }

  /** @param {RTCSessionDescriptionInit} description */
  async applyDescription(description) {
    let pc = this.pc;
    const sdp = description.sdp || '';
    const session = sessionOf(sdp);
    if (session && this.retired.includes(session)) {
      this.note(`${description.type} of a replaced session dropped`);
      return;
    }
    if (description.type === 'answer') {
      // An answer to no offer of ours, one applied already (sent again by the other
      // side when our offer came twice), or one that names another offer than ours
      // (late, to an offer sent before, maybe on a connection replaced since).
      const names = answersOf(sdp);
      const why = pc.signalingState !== 'have-local-offer' ? 'no offer pending'
        : sdp === this.lastAnswerIn ? 'applied already'
          : names !== null && names !== offerName(this.sentOffer) ? 'answers another offer' : '';
      if (why) {
        this.note(`answer in (ufrag ${ufragOf(sdp)}), ignored: ${why}`);
        return;
      }
    }
    if (session && session !== this.remoteSession) {
      // The other side made a new connection (its old one failed): the old session
      // is over, and ours, if it was negotiated with that one, is replaced too.
      if (this.remoteSession) {
        this.retired.push(this.remoteSession);
        if (this.retired.length > 8) this.retired.shift();
      }
      this.remoteSession = session;
      const ours = sessionOf(pc.remoteDescription?.sdp);
      if (description.type === 'offer' && ours && ours !== session) {
        this.renew('the other side made a new one', false);
        pc = this.pc;
      }
    }
    if (description.type === 'offer' && sdp === this.lastOfferIn && this.lastAnswerOut &&
        pc.signalingState === 'stable') {
      // Our answer to this very offer went missing (or is slow): the same answer again.
      this.hooks.send({ type: 'answer', to: this.id, sdp: this.lastAnswerOut });
      this.note(`offer in (ufrag ${ufragOf(sdp)}) again: answer sent again`);
      return;
    }
    const offerCollision = description.type === 'offer' && pc.signalingState !== 'stable';
    this.ignoreOffer = !this.polite && offerCollision;
    this.note(`${description.type} in (ufrag ${ufragOf(sdp)})${offerCollision ? ' colliding' : ''}${this.ignoreOffer ? ', ignored' : ''}`);
    if (this.ignoreOffer) return;
    let sent = '';
    try {
      if (description.type === 'answer' && sdp) {
        const plain = sdp.replace(/^a=x-meshmeet-answers:.*\r?\n/m, '');
        await pc.setRemoteDescription({ type: 'answer', sdp: this.keepDtlsRole(plain) });
        this.lastAnswerIn = sdp;
      } else {
        await pc.setRemoteDescription(description);
      }
      await this.flushCandidates();
      if (description.type !== 'offer') return;
      this.attachLocal();
      this.held = [];
      const before = ufragOf(pc.currentLocalDescription?.sdp);
      await pc.setLocalDescription();
      const d = pc.localDescription;
      if (!d || d.type !== 'answer') return;
      await this.gathered(before);
      // Sent naming the offer it answers (ANSWERS_ATTR), before the first m= line.
      sent = (pc.localDescription?.sdp || d.sdp).replace(/\r\nm=/, `\r\n${ANSWERS_ATTR}${offerName(sdp)}\r\nm=`);
      this.lastOfferIn = sdp;
      this.lastAnswerOut = sent;
      this.hooks.send({ type: 'answer', to: this.id, sdp: sent });
      this.note(`answer sent (ufrag ${ufragOf(sent)}, ${candidates(sent)} candidates)`);
    } catch (e) {
      this.note(`negotiation failed: ${e}`);
      console.warn('negotiation failed', e);
      if (description.type === 'answer' && pc === this.pc) await this.answerRefused();
      if (description.type === 'offer' && pc === this.pc) this.offerRefused();
    } finally {
      if (this.held) this.releaseCandidates(sent);
    }
  }

  /**
   * The browser refused an offer of the other side. Seen in Chromium on a new
   * connection whose first offers collided: the side that rolled its offer back
   * offered next with its media sections in another order than the answer had
   * ("The order of m-lines in subsequent offer doesn't match order from previous
   * offer/answer"). Each copy of that offer sent again is refused the same way, and
   * the other side would wait in `have-local-offer` for good. So this side starts
   * over: a new connection and its own offer (the other side replaces its connection
   * when that offer comes, and its old offers are dropped); at most
   * OFFER_REFUSALS_MAX times until a connection connects.
   */
  offerRefused() {
    if (this.closed || this.offerRefusals >= OFFER_REFUSALS_MAX) return;
    this.offerRefusals += 1;
    this.renew('an offer was refused', true);
  }

  /**
   * The browser refused the answer to our offer. Seen between Chromium and Firefox:
   * the other side answers with new ICE credentials an offer that asked for none
   * (it had rolled back an ICE restart offer of its own in a collision), and the
   * browser refuses an answer that restarts ICE unasked. Sent again, the same offer
   * would get the same answer, and the connection would wait in `have-local-offer`
   * for good. So the offer is rolled back and made again with an ICE restart, which
   * lets the other side's credentials change; at most ANSWER_REFUSALS_MAX times
   * until the connection is next connected (then failure handling takes over).
   */
  async answerRefused() {
    const pc = this.pc;
    if (this.closed || pc.signalingState !== 'have-local-offer' || this.answerRefusals >= ANSWER_REFUSALS_MAX) return;
    this.answerRefusals += 1;
    clearTimeout(this.answerWatch);
    this.answerWatch = undefined;
    this.sentOffer = '';
    try {
      await pc.setLocalDescription({ type: 'rollback' });
    } catch (e) {
      this.note(`rollback failed: ${e}`);
      return;
    }
    this.note('answer refused: offer rolled back, offering again with an ICE restart');
    if (!this.restartIce()) pc.restartIce();
  }

  /**
   * Our DTLS role on the established connection ('active' = DTLS client), from the
   * last completed negotiation; null before the first.
   * @returns {'active'|'passive'|null}
   */
  dtlsRole() {
    const l = this.pc.currentLocalDescription;
    const r = this.pc.currentRemoteDescription;
    if (!l || !r) return null;
    const setup = (/** @type {string} */ sdp) => (sdp.match(/a=setup:(\w+)/) || [])[1];
    if (l.type === 'answer') {
      const s = setup(l.sdp);
      return s === 'active' || s === 'passive' ? s : null;
    }
    const s = setup(r.sdp);
    return s === 'active' ? 'passive' : s === 'passive' ? 'active' : null;
  }

  /**
   * A renegotiation keeps the DTLS association, and with it the roles (RFC 8842). An
   * answer that names the other role (Firefox does so when answering an ICE-restart
   * offer from the side that answered first) makes Chromium reject it ("Failed to
   * set SSL role"), which leaves the connection stuck in have-local-offer. The role
   * the answerer really keeps is the established one: say so in its answer.
   * @param {string} sdp a remote answer
   */
  keepDtlsRole(sdp) {
    const ours = this.dtlsRole();
    if (!ours) return sdp;
    const theirs = ours === 'active' ? 'passive' : 'active';
    const fixed = sdp.replace(/a=setup:(active|passive)/g, `a=setup:${theirs}`);
    if (fixed !== sdp) this.roleFixes += 1;
    return fixed;
  }

  /**
   * A remote candidate (null: the end of candidates), added after the steps before it.
   * @param {RTCIceCandidateInit|null} candidate
   */
  onCandidate(candidate) {
    if (this.closed) return Promise.resolve();
    return this.run(() => this.addCandidate(candidate || { candidate: '' }));
  }

  /** @param {RTCIceCandidateInit} c */
  async addCandidate(c) {
    if (!this.pc.remoteDescription) {
      this.pendingCandidates.push(c);
      return;
    }
    try {
      await this.pc.addIceCandidate(c.candidate === '' ? undefined : c);
    } catch (e) {
      if (this.ignoreOffer) return;
      // A candidate of an ICE generation whose description has not come yet (its
      // offer or answer was lost and comes again): kept for then.
      if (c.usernameFragment && c.usernameFragment !== ufragOf(this.pc.remoteDescription?.sdp)) {
        this.early.push(c);
        if (this.early.length > EARLY_CANDIDATES_MAX) this.early.shift();
        this.note(`candidate of ufrag ${c.usernameFragment} kept for later`);
        return;
      }
      this.note(`addIceCandidate failed (ufrag ${c.usernameFragment}): ${e}`);
      console.warn('addIceCandidate failed', e);
    }
  }

  /** Adds the candidates that came before the remote description they belong to. */
  async flushCandidates() {
    const ufrag = ufragOf(this.pc.remoteDescription?.sdp);
    const list = this.pendingCandidates.concat(this.early.filter((c) => c.usernameFragment === ufrag));
    this.pendingCandidates = [];
    this.early = this.early.filter((c) => c.usernameFragment !== ufrag);
    for (const c of list) {
      try {
        await this.pc.addIceCandidate(c.candidate === '' ? undefined : c);
      } catch (e) {
        if (!this.ignoreOffer) console.warn('addIceCandidate failed', e);
      }
    }
  }

  /** @param {PeerState} next */
  setState(next) {
    if (next !== this.state) {
      this.state = next;
      this.hooks.onState(this);
    }
  }

  /** The tile state for a connected connection, from what is known of its path. */
  connectedState() {
    if (this.path) return this.path.local === 'relay' || this.path.remote === 'relay' ? 'relay' : 'direct';
    return this.pathKnowable ? 'connecting' : 'connected';
  }

  /**
   * Follows the connection state: the tile state, and ICE restarts (calmly: only
   * when `failed`, or `disconnected` longer than DISCONNECTED_RESTART_MS; one at a
   * time; backing off while restarts keep failing).
   */
  updateState() {
    if (this.closed) return;
    const cs = this.connState();
    const changed = cs !== this.lastCs;
    this.lastCs = cs;
    if (cs !== 'disconnected' && this.disconnectedSince) {
      this.blips.push(Date.now() - this.disconnectedSince);
      if (this.blips.length > 50) this.blips.shift();
      this.disconnectedSince = 0;
    }
    if (cs === 'connected') {
      this.marks.connected ||= performance.now();
      this.everConnected = true;
      this.answerRefusals = 0;
      this.offerRefusals = 0;
      if (changed) {
        clearTimeout(this.restartTimer);
        this.restartTimer = undefined;
        this.failedRestarts = 0;
        if (this.restarting) this.restartDone();
      }
      this.hookPairEvent();
      if (!this.pathTimer) this.pathTimer = setInterval(() => this.detectPath(true), PATH_POLL_MS);
      this.setState(this.connectedState());
      this.detectPath();
      return;
    }
    // Off the path it was on: the path is claimed again only once re-read.
    this.path = null;
    clearInterval(this.pathTimer);
    this.pathTimer = undefined;
    clearTimeout(this.noPathTimer);
    this.noPathTimer = undefined;
    if (cs === 'disconnected') {
      if (changed) this.disconnectedSince = Date.now();
      this.setState('reconnecting');
      if (changed) this.scheduleRestart(Math.max(DISCONNECTED_RESTART_MS, this.backoff()) + this.defer());
    } else if (cs === 'failed') {
      this.setState('failed');
      if (changed) {
        // A restart under way that ends in `failed` has failed.
        if (this.restarting) this.restartDone();
        this.scheduleRestart(this.backoff() + this.defer());
      }
    } else if (cs === 'new' || cs === 'connecting') {
      this.setState(this.everConnected ? 'reconnecting' : 'connecting');
      // Back to `connecting` after having been connected: an ICE restart (ours or the
      // other side's) that has not completed. One that never does (see
      // docs/CLIENT.md, "A restart that never completes") is restarted like a
      // connection that stays disconnected.
      if (changed && this.everConnected) {
        this.scheduleRestart(Math.max(DISCONNECTED_RESTART_MS, this.backoff()) + this.defer());
      }
    }
  }

  /**
   * Whether the connection needs a restart: `failed`, `disconnected`, or back to
   * `connecting` (or `new`) after having been connected.
   * @param {string} cs
   */
  stuck(cs) {
    return cs === 'disconnected' || cs === 'failed' || (this.everConnected && (cs === 'connecting' || cs === 'new'));
  }

  /** The extra wait of the ICE-controlling side before a restart (none where unknown). */
  defer() {
    return this.iceRole === 'controlling' ? CONTROLLING_DEFER_MS : 0;
  }

  /** The wait before the next restart: none at first, then doubling. */
  backoff() {
    if (this.failedRestarts === 0) return 0;
    return Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (this.failedRestarts - 1));
  }

  /** @param {number} ms */
  scheduleRestart(ms) {
    if (this.closed || this.restartTimer || this.restarting) return;
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      const cs = this.connState();
      if (!this.stuck(cs)) return;
      // A failed connection is replaced, not restarted (see renew).
      if (cs === 'failed') this.run(async () => { if (this.connState() === 'failed') this.renew('failed', true); });
      else this.restartIce();
    }, ms);
  }

  /**
   * Replaces the RTCPeerConnection with a new one. Firefox does not send media again
   * on a connection whose ICE transport has failed, whatever ICE restarts follow
   * (docs/CLIENT.md), so a `failed` connection is replaced rather than restarted, in
   * every browser. With `offer`, the new connection offers (the side that saw the
   * failure); the other side sees an offer from a new session (another `o=` session
   * id) and replaces its own connection to answer it. Descriptions of the sessions
   * replaced are dropped from then on. Counts as a restart under way (one at a time,
   * with the same back-off).
   * @param {string} why
   * @param {boolean} offer
   */
  renew(why, offer) {
    if (this.closed) return;
    const old = this.pc;
    this.detach(old);
    old.close();
    this.dropChannels();
    clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    clearTimeout(this.answerWatch);
    this.answerWatch = undefined;
    clearInterval(this.pathTimer);
    this.pathTimer = undefined;
    clearTimeout(this.noPathTimer);
    this.noPathTimer = undefined;
    this.restartDone();
    this.renewals += 1;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.pendingCandidates = [];
    this.early = [];
    this.held = null;
    this.sentOffer = '';
    this.lastOfferIn = '';
    this.lastAnswerOut = '';
    this.lastAnswerIn = '';
    this.answerRefusals = 0;
    this.audioTx = null;
    this.videoTx = null;
    this.screenTx = null;
    this.attached = false;
    this.path = null;
    this.pathKnowable = true;
    this.pairEventHooked = false;
    this.iceRole = '';
    this.lastCs = '';
    if (this.disconnectedSince) {
      this.blips.push(Date.now() - this.disconnectedSince);
      if (this.blips.length > 50) this.blips.shift();
      this.disconnectedSince = 0;
    }
    // Replacing on our own (our connection failed): the other side's session, which
    // our old connection was negotiated with, is over for us too. Its offers still on
    // the way (a renegotiation the other side started before it saw our new offer)
    // are dropped: applied to the new connection, they would tie it to the other
    // side's old connection and its DTLS certificate, and the DTLS handshake would
    // fail on both sides. The other side replaces its own connection when our new
    // offer reaches it.
    if (offer && this.remoteSession) {
      this.retired.push(this.remoteSession);
      if (this.retired.length > 8) this.retired.shift();
      this.remoteSession = '';
    }
    this.pc = new RTCPeerConnection(this.config);
    this.wire();
    this.note(`new connection (${why})`);
    // Under way like a restart: no other one until it connects, fails or 30 s pass.
    this.restarting = true;
    this.restarts += 1;
    this.failedRestarts += 1;
    this.restartUfrag = '';
    this.restartWatch = setTimeout(() => {
      this.restartWatch = undefined;
      if (!this.restarting) return;
      this.restartDone();
      if (this.stuck(this.connState())) this.scheduleRestart(this.backoff() + this.defer());
    }, RESTART_TIMEOUT_MS);
    this.setState(this.everConnected ? 'reconnecting' : 'connecting');
    if (offer) this.start();
  }

  /** Unhooks a connection's handlers. @param {RTCPeerConnection} pc */
  detach(pc) {
    pc.onnegotiationneeded = null;
    pc.onicecandidate = null;
    pc.ontrack = null;
    pc.onconnectionstatechange = null;
    pc.oniceconnectionstatechange = null;
    pc.onsignalingstatechange = null;
  }

  /**
   * Restarts ICE now, unless a restart is already under way. Returns whether one
   * was started.
   */
  restartIce() {
    if (this.closed || this.restarting || typeof this.pc.restartIce !== 'function') return false;
    clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    this.restarting = true;
    this.restarts += 1;
    this.restartUfrag = ufragOf(this.pc.currentLocalDescription?.sdp);
    this.note(`ICE restart ${this.restarts}`);
    this.failedRestarts += 1;
    this.pc.restartIce();
    this.restartWatch = setTimeout(() => {
      this.restartWatch = undefined;
      if (!this.restarting) return;
      this.restartDone();
      if (this.stuck(this.connState())) this.scheduleRestart(this.backoff() + this.defer());
    }, RESTART_TIMEOUT_MS);
    return true;
  }

  restartDone() {
    if (this.restarting) this.note('restart done');
    this.restarting = false;
    clearTimeout(this.restartWatch);
    this.restartWatch = undefined;
  }

  /** Where the browser tells when the selected pair changes (not Firefox), listens. */
  hookPairEvent() {
    if (this.pairEventHooked) return;
    const sender = this.pc.getSenders()[0] || this.pc.getReceivers()[0];
    /** @type {any} */
    const ice = sender && sender.transport && /** @type {any} */ (sender.transport).iceTransport;
    if (ice && 'onselectedcandidatepairchange' in ice) {
      ice.addEventListener('selectedcandidatepairchange', () => this.detectPath());
      this.pairEventHooked = true;
    }
  }

  /**
   * Re-reads the selected candidate pair; the tile follows it. One read at a time:
   * on a starved machine one stats read can take seconds, and reads that pile up
   * (a poll every PATH_POLL_MS) back up the browser's WebRTC thread, which the page
   * then waits for in its calls to the connection. A read asked for while one is
   * under way (not by the poll) makes that one's answer stale: it is read again.
   * @param {boolean} [poll] asked for by the periodic poll
   */
  async detectPath(poll = false) {
    if (this.pathReading) {
      if (!poll) this.pathAgain = true;
      return;
    }
    this.pathReading = true;
    /** @type {Path|null|undefined} */
    let path;
    let read = true;
    try {
      path = await this.selectedPath();
    } catch {
      read = false; /* stats unavailable this time */
    } finally {
      this.pathReading = false;
    }
    if (this.pathAgain) {
      this.pathAgain = false;
      this.detectPath();
      return;
    }
    // A state change overtook this read.
    if (!read || this.closed || this.connState() !== 'connected') return;
    this.pathKnowable = path !== undefined;
    const moved = JSON.stringify(path || null) !== JSON.stringify(this.path);
    this.path = path || null;
    if (moved) this.note(`path ${path ? `${path.local}/${path.remote} ${path.protocol}` : String(path)} (${this.iceRole})`);
    const before = this.state;
    this.setState(this.connectedState());
    // Another pair on the same kind of path (e.g. a relay over TCP instead of UDP).
    if (moved && before === this.state) this.hooks.onState(this);
    this.watchNoPath();
  }

  /**
   * Connected, yet no candidate pair selected: normal for a moment after connecting,
   * but a connection that stays so carries no media (after an ICE restart the other
   * side offered and never completed, Firefox stays `connected` on the old ICE
   * generation while the new one gets no pair; docs/CLIENT.md). It is restarted
   * after DISCONNECTED_RESTART_MS, like one that stays disconnected.
   */
  watchNoPath() {
    const stuck = this.path === null && this.pathKnowable && this.connState() === 'connected';
    if (!stuck) {
      clearTimeout(this.noPathTimer);
      this.noPathTimer = undefined;
      return;
    }
    if (this.noPathTimer || this.restarting) return;
    this.noPathTimer = setTimeout(() => {
      this.noPathTimer = undefined;
      if (this.closed || this.path || !this.pathKnowable || this.connState() !== 'connected') return;
      this.noPathRestarts += 1;
      this.note('no selected pair: restart');
      this.restartIce();
    }, Math.max(DISCONNECTED_RESTART_MS, this.backoff()) + this.defer());
  }

  /**
   * The selected candidate pair: null while none is selected, undefined when the
   * browser's stats do not say which one is (neither `transport.selectedCandidatePairId`,
   * as in Chromium and Safari, nor `candidate-pair.selected`, as in Firefox).
   * @returns {Promise<Path|null|undefined>}
   */
  async selectedPath() {
    return this.pathFrom(await this.pc.getStats());
  }

  /**
   * The selected candidate pair in a stats report (see selectedPath).
   * @param {RTCStatsReport} stats
   * @returns {Path|null|undefined}
   */
  pathFrom(stats) {
    /** @type {any} */
    let pair = null;
    let told = false;
    stats.forEach((/** @type {any} */ s) => {
      // Our ICE role, where the browser reports it (both do); it can change when a
      // restart resolves a role conflict.
      if (s.type === 'transport' && typeof s.iceRole === 'string' && s.iceRole !== 'unknown') this.iceRole = s.iceRole;
      if (s.type === 'transport' && 'selectedCandidatePairId' in s) {
        told = true;
        if (s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId) || pair;
      }
    });
    if (!pair) {
      stats.forEach((/** @type {any} */ s) => {
        if (s.type !== 'candidate-pair' || !('selected' in s)) return;
        told = true;
        if (s.selected) pair = s;
      });
    }
    if (!pair) return told ? null : undefined;
    const l = stats.get(pair.localCandidateId);
    const r = stats.get(pair.remoteCandidateId);
    if (!l || !r) return null;
    const relayProtocol = l.candidateType === 'relay' ? String(l.relayProtocol || '') : '';
    return {
      local: l.candidateType, remote: r.candidateType, protocol: l.protocol, relayProtocol,
      localAddress: l.address || l.ip, remoteAddress: r.address || r.ip,
    };
  }

  /**
   * The DTLS certificate fingerprints the connection was last negotiated with
   * ('' where a side has none yet), normalized as safety.js reads them.
   */
  fingerprints() {
    return {
      local: fingerprintOf(this.pc.currentLocalDescription?.sdp),
      remote: fingerprintOf(this.pc.currentRemoteDescription?.sdp),
    };
  }

  /** New ICE servers and credentials. @param {RTCConfiguration} config */
  setConfiguration(config) {
    if (this.closed) return;
    this.config = config;
    try {
      this.pc.setConfiguration(config);
    } catch (e) {
      console.warn('setConfiguration failed', e);
    }
  }

  /** Caps bitrate and resolution of what we send, from the room size. */
  async applyLimits() {
    if (this.closed) return;
    const limits = this.hooks.limits();
    /** @type {[RTCRtpTransceiver|null, {maxBitrate: number, scale?: number}][]} */
    const plan = [
      [this.videoTx, { maxBitrate: limits.video.maxBitrate, scale: limits.video.scale }],
      [this.screenTx, { maxBitrate: limits.screen.maxBitrate }],
    ];
    for (const [tx, lim] of plan) {
      if (!tx || isStopped(tx) || !tx.sender.track) continue;
      const sender = tx.sender;
      const params = sender.getParameters();
      if (!params.encodings || params.encodings.length === 0) continue;
      const enc = params.encodings[0];
      if (enc.maxBitrate === lim.maxBitrate && (lim.scale === undefined || enc.scaleResolutionDownBy === lim.scale)) continue;
      enc.maxBitrate = lim.maxBitrate;
      if (lim.scale !== undefined) enc.scaleResolutionDownBy = lim.scale;
      try {
        await sender.setParameters(params);
      } catch (e) {
        console.warn('setParameters failed', e);
      }
    }
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.restartTimer);
    clearTimeout(this.restartWatch);
    clearInterval(this.pathTimer);
    clearTimeout(this.noPathTimer);
    clearTimeout(this.answerWatch);
    this.detach(this.pc);
    this.pc.close();
    this.dropChannels();
  }
}
