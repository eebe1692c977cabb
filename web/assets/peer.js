// One RTCPeerConnection to one other participant: perfect negotiation, buffered ICE
// candidates, ICE restart, connection state, mesh-aware sender limits. No DOM and no
// socket: messages for the other side go out through `hooks.send`.

/**
 * @typedef {'connecting'|'direct'|'relay'|'reconnecting'|'failed'} PeerState
 * @typedef {import('./signaling.js').MediaState} MediaState
 * @typedef {{
 *   send: (msg: import('./signaling.js').ClientMsg) => void,
 *   onState: (peer: Peer) => void,
 *   onTracks: (peer: Peer) => void,
 *   local: () => {stream: MediaStream, audio: MediaStreamTrack|null, video: MediaStreamTrack|null,
 *                  screen: MediaStream|null},
 *   limits: () => {video: {maxBitrate: number, scale: number}, screen: {maxBitrate: number}},
 * }} PeerHooks
 */

/** How long a connection may stay `disconnected` before an ICE restart. */
const DISCONNECTED_RESTART_MS = 4000;

let serial = 0;

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
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.restartTimer = undefined;
    /** re-reads the selected candidate pair now and then (it can change) */
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this.pathTimer = undefined;
    this.pc = new RTCPeerConnection(config);
    this.wire();
  }

  wire() {
    const pc = this.pc;
    pc.onnegotiationneeded = async () => {
      if (this.closed) return;
      try {
        this.makingOffer = true;
        await pc.setLocalDescription();
        const d = pc.localDescription;
        if (d && d.type === 'offer') this.hooks.send({ type: 'offer', to: this.id, sdp: d.sdp });
      } catch (e) {
        console.warn('offer failed', e);
      } finally {
        this.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (this.closed) return;
      this.hooks.send({ type: 'candidate', to: this.id, candidate: candidate ? candidate.toJSON() : null });
    };
    pc.ontrack = (ev) => this.onTrack(ev);
    pc.onconnectionstatechange = () => this.updateState();
    pc.oniceconnectionstatechange = () => this.updateState();
    pc.onsignalingstatechange = () => {
      if (pc.signalingState === 'stable') this.applyLimits();
    };
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
   * Replaces an outgoing camera or microphone track (device change).
   * @param {'audio'|'video'} kind
   * @param {MediaStreamTrack|null} track
   */
  replaceTrack(kind, track) {
    const tx = kind === 'audio' ? this.audioTx : this.videoTx;
    if (!tx || isStopped(tx)) return;
    tx.sender.replaceTrack(track).then(() => this.applyLimits()).catch((e) => console.warn('replaceTrack', e));
    if (track && tx.direction === 'recvonly') tx.direction = 'sendrecv';
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
   * A description from the remote peer (perfect negotiation).
   * @param {RTCSessionDescriptionInit} description
   */
  async onDescription(description) {
    if (this.closed) return;
    const pc = this.pc;
    const offerCollision =
      description.type === 'offer' && (this.makingOffer || pc.signalingState !== 'stable');
    this.ignoreOffer = !this.polite && offerCollision;
    if (this.ignoreOffer) return;
    try {
      await pc.setRemoteDescription(description);
      await this.flushCandidates();
      if (description.type === 'offer') {
        this.attachLocal();
        await pc.setLocalDescription();
        const d = pc.localDescription;
        if (d) this.hooks.send({ type: 'answer', to: this.id, sdp: d.sdp });
      }
    } catch (e) {
      console.warn('negotiation failed', e);
    }
  }

  /** @param {RTCIceCandidateInit|null} candidate */
  async onCandidate(candidate) {
    if (this.closed) return;
    if (!this.pc.remoteDescription) {
      this.pendingCandidates.push(candidate || { candidate: '' });
      return;
    }
    try {
      await this.pc.addIceCandidate(candidate || undefined);
    } catch (e) {
      if (!this.ignoreOffer) console.warn('addIceCandidate failed', e);
    }
  }

  async flushCandidates() {
    const list = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const c of list) {
      try {
        await this.pc.addIceCandidate(c.candidate === '' ? undefined : c);
      } catch (e) {
        if (!this.ignoreOffer) console.warn('addIceCandidate failed', e);
      }
    }
  }

  /** Tracks the connection state; restarts ICE when it fails or stays disconnected. */
  updateState() {
    if (this.closed) return;
    const pc = this.pc;
    // iceConnectionState stands in where a browser lacks connectionState.
    const cs = /** @type {RTCPeerConnectionState|RTCIceConnectionState} */ (pc.connectionState || pc.iceConnectionState);
    /** @type {PeerState} */
    let next = this.state;
    if (cs === 'connected' || cs === 'completed') {
      clearTimeout(this.restartTimer);
      this.restartTimer = undefined;
      next = this.state === 'relay' || this.state === 'direct' ? this.state : 'direct';
      this.detectPath();
      if (!this.pathTimer) this.pathTimer = setInterval(() => this.detectPath(), 3000);
    } else if (cs === 'disconnected') {
      next = 'reconnecting';
      if (!this.restartTimer) {
        this.restartTimer = setTimeout(() => {
          this.restartTimer = undefined;
          if (!this.closed && pc.connectionState !== 'connected') this.restartIce();
        }, DISCONNECTED_RESTART_MS);
      }
    } else if (cs === 'failed') {
      next = 'failed';
      this.restartIce();
    } else if (cs === 'new' || cs === 'connecting' || cs === 'checking') {
      next = this.state === 'failed' || this.state === 'reconnecting' ? 'reconnecting' : 'connecting';
    }
    if (next !== this.state) {
      this.state = next;
      this.hooks.onState(this);
    }
  }

  restartIce() {
    if (this.closed) return;
    if (typeof this.pc.restartIce === 'function') this.pc.restartIce();
  }

  /** Finds whether the selected candidate pair is relayed. */
  async detectPath() {
    try {
      const path = await this.selectedPath();
      if (!path || this.closed) return;
      const cs = this.pc.connectionState;
      if (cs !== 'connected') return;
      const next = path.local === 'relay' || path.remote === 'relay' ? 'relay' : 'direct';
      if (next !== this.state) {
        this.state = next;
        this.hooks.onState(this);
      }
    } catch {
      /* stats unavailable */
    }
  }

  /** @returns {Promise<{local: string, remote: string, protocol: string, localAddress: string, remoteAddress: string}|null>} */
  async selectedPath() {
    const stats = await this.pc.getStats();
    /** @type {any} */
    let pair = null;
    stats.forEach((/** @type {any} */ s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    if (!pair) {
      stats.forEach((/** @type {any} */ s) => {
        if (s.type === 'candidate-pair' && (s.selected || (s.nominated && s.state === 'succeeded'))) pair = s;
      });
    }
    if (!pair) return null;
    const l = stats.get(pair.localCandidateId);
    const r = stats.get(pair.remoteCandidateId);
    if (!l || !r) return null;
    return {
      local: l.candidateType, remote: r.candidateType, protocol: l.relayProtocol || l.protocol,
      localAddress: l.address || l.ip, remoteAddress: r.address || r.ip,
    };
  }

  /** New ICE servers and credentials. @param {RTCConfiguration} config */
  setConfiguration(config) {
    if (this.closed) return;
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
    clearInterval(this.pathTimer);
    this.pc.onnegotiationneeded = null;
    this.pc.onicecandidate = null;
    this.pc.ontrack = null;
    this.pc.onconnectionstatechange = null;
    this.pc.oniceconnectionstatechange = null;
    this.pc.onsignalingstatechange = null;
    this.pc.close();
  }
}
