// File sharing: a file goes from one participant to every other one over the data
// channel negotiated in each peer connection (peer.js), directly between the
// browsers, never through the server. The wire format, the limits and the
// backpressure are described in docs/CLIENT.md, "File sharing". `Link` is the
// protocol on one connection (no DOM); `FileSharing` is the page's part (offers,
// progress, accept, decline, cancel and save in the chat panel).

import { t } from './i18n.js';

/** The largest file sent or accepted unless overridden (FileSharing.maxBytes). */
export const DEFAULT_MAX_BYTES = 200 * 1024 * 1024;
/** Where a page keeps its own override of the limit (bytes, a positive integer). */
export const MAX_BYTES_KEY = 'meshmeet.maxFileBytes';
/** Payload bytes per binary frame sent; the largest payload accepted. */
export const CHUNK_BYTES = 16 * 1024;
export const MAX_CHUNK_BYTES = 64 * 1024;
/** Bounds on what a peer sends: file name and type length, a text frame's length. */
export const MAX_NAME = 255;
export const MAX_TYPE = 127;
export const MAX_TEXT = 2048;
/** Transfers a peer may have offered to us at once (offered or being received). */
export const MAX_INCOMING = 4;
/** Backpressure: stop sending above HIGH_WATER buffered, go on at LOW_WATER. */
export const HIGH_WATER = 1024 * 1024;
export const LOW_WATER = 256 * 1024;
/** The receiver reports its progress every ACK_BYTES. */
export const ACK_BYTES = 256 * 1024;
/** Bytes read from the file at once (then sent as CHUNK_BYTES frames). */
const READ_BYTES = 256 * 1024;
/** Transfer ids are 32-bit, non-zero. */
const MAX_ID = 0xffffffff;

/**
 * Why a transfer ended without the file: on the sender's side per receiver, on the
 * receiver's side for the one transfer.
 * @typedef {'declined'|'cancelled'|'aborted'|'too_big'|'busy'|'invalid'|'connection'|'unavailable'} EndReason
 * @typedef {'offered'|'receiving'|'done'|'failed'} InState
 * @typedef {{id: number, name: string, size: number, type: string, state: InState,
 *   received: number, acked: number, chunks: Uint8Array[], reason: EndReason|'',
 *   blob: Blob|null}} Incoming
 * @typedef {'offered'|'sending'|'sent'|'done'|'failed'} LegState
 * @typedef {{out: Outgoing, peerId: string, state: LegState, acked: number, reason: EndReason|''}} Leg
 * @typedef {{id: number, file: Blob, name: string, size: number, type: string,
 *   legs: Map<string, Leg>}} Outgoing
 * @typedef {{type: 'incoming'|'incoming-progress'|'incoming-end', link: Link, inc: Incoming}
 *   | {type: 'leg', link: Link, leg: Leg}} LinkEvent
 * @typedef {{readyState: string, bufferedAmount: number, bufferedAmountLowThreshold: number,
 *   send: (data: any) => void,
 *   addEventListener: (type: string, fn: (ev: any) => void) => void,
 *   removeEventListener: (type: string, fn: (ev: any) => void) => void,
 *   binaryType?: string}} ChannelLike
 */

/**
 * One frame from a peer, checked: a binary chunk, a control message, or why it was
 * refused (with the transfer id when it could be read, so that transfer can end).
 * @typedef {{kind: 'chunk', id: number, bytes: Uint8Array}
 *   | {kind: 'msg', msg: Record<string, unknown> & {t: string, id: number}}
 *   | {kind: 'bad', id: number, why: string}} Frame
 */

/** @param {unknown} v */
function isId(v) {
  return typeof v === 'number' && Number.isInteger(v) && v >= 1 && v <= MAX_ID;
}

/**
 * Parses one data channel message: a string is a JSON control message
 * `{"t": TYPE, "id": N, ...}`; binary is a chunk, a 4-byte big-endian transfer id
 * then 1..MAX_CHUNK_BYTES payload bytes.
 * @param {unknown} data
 * @returns {Frame}
 */
export function parseFrame(data) {
  if (typeof data === 'string') {
    if (data.length > MAX_TEXT) return { kind: 'bad', id: 0, why: 'text frame too long' };
    /** @type {unknown} */
    let v;
    try { v = JSON.parse(data); } catch { return { kind: 'bad', id: 0, why: 'not JSON' }; }
    if (!v || typeof v !== 'object' || Array.isArray(v)) return { kind: 'bad', id: 0, why: 'not an object' };
    const o = /** @type {Record<string, unknown>} */ (v);
    const id = isId(o.id) ? /** @type {number} */ (o.id) : 0;
    if (typeof o.t !== 'string' || !id) return { kind: 'bad', id, why: 'no type or id' };
    return { kind: 'msg', msg: /** @type {any} */ (o) };
  }
  /** @type {Uint8Array|null} */
  let bytes = null;
  if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
  else if (ArrayBuffer.isView(data)) bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (!bytes) return { kind: 'bad', id: 0, why: 'unknown frame' };
  if (bytes.length < 5) return { kind: 'bad', id: 0, why: 'chunk too short' };
  const id = new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0);
  if (!id) return { kind: 'bad', id: 0, why: 'chunk without id' };
  if (bytes.length - 4 > MAX_CHUNK_BYTES) return { kind: 'bad', id, why: 'chunk too big' };
  return { kind: 'chunk', id, bytes: bytes.subarray(4) };
}

/** A MIME type kept only when it looks like one. @param {unknown} v */
function cleanType(v) {
  return typeof v === 'string' && v.length <= MAX_TYPE && /^[\w.+-]+\/[\w.+-]+$/.test(v) ? v : '';
}

/**
 * The file sharing protocol on one peer connection's data channel: our transfers
 * to that peer (legs) and the peer's to us. Every frame from the peer goes through
 * `receive`; a frame that breaks a rule ends the transfer it names (with `refuse`
 * or `abort` to the other side) or, naming none, is dropped. Nothing a peer sends
 * can end the call.
 */
export class Link {
  /**
   * @param {string} peerId
   * @param {ChannelLike} channel
   * @param {{maxBytes: () => number, event: (ev: LinkEvent) => void}} ctx
   */
  constructor(peerId, channel, ctx) {
    this.peerId = peerId;
    this.channel = channel;
    this.ctx = ctx;
    /** @type {Map<number, Incoming>} the peer's transfers to us */
    this.incoming = new Map();
    /** @type {Map<number, Leg>} our transfers to the peer */
    this.legs = new Map();
    /** frames dropped as malformed (diagnostics) */
    this.dropped = 0;
    this.closed = false;
    /** @type {(() => void)[]} senders waiting for the buffer to drain */
    this.waiters = [];
    this.onLow = () => this.wake();
    channel.bufferedAmountLowThreshold = LOW_WATER;
    channel.addEventListener('bufferedamountlow', this.onLow);
  }

  wake() {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Sends a control message; false if the channel cannot take it. @param {object} msg */
  sendMsg(msg) {
    if (this.closed || this.channel.readyState !== 'open') return false;
    try {
      this.channel.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * The channel's message handler: one frame from the peer.
   * @param {unknown} data
   */
  receive(data) {
    if (this.closed) return;
    const f = parseFrame(data);
    if (f.kind === 'bad') return this.bad(f.id, f.why);
    if (f.kind === 'chunk') return this.onChunk(f.id, f.bytes);
    const m = f.msg;
    switch (m.t) {
      case 'offer': return this.onOffer(m);
      case 'end': return this.onEnd(m.id);
      case 'abort': return this.onAbort(m.id);
      case 'accept': case 'ack': case 'done': case 'refuse': return this.onLegMsg(m);
      default: return this.bad(m.id, `unknown type ${String(m.t).slice(0, 32)}`);
    }
  }

  /**
   * A frame that breaks the rules: it ends the incoming transfer it names, if any
   * (the sender is told), else it is dropped.
   * @param {number} id @param {string} why
   */
  bad(id, why) {
    this.dropped += 1;
    const inc = id ? this.incoming.get(id) : undefined;
    if (inc && (inc.state === 'offered' || inc.state === 'receiving')) {
      this.sendMsg({ t: 'refuse', id, reason: 'invalid' });
      this.endIncoming(inc, 'invalid');
    } else {
      console.warn(`file sharing: frame from ${this.peerId} dropped: ${why}`);
    }
  }

  /** @param {Record<string, unknown> & {id: number}} m */
  onOffer(m) {
    const id = m.id;
    if (this.incoming.has(id)) {
      const inc = /** @type {Incoming} */ (this.incoming.get(id));
      if (inc.state === 'offered' || inc.state === 'receiving') return this.bad(id, 'offer for a transfer under way');
      this.incoming.delete(id);
    }
    const name = typeof m.name === 'string' ? m.name.replace(/\p{Cc}/gu, '').trim() : '';
    const size = m.size;
    /** @type {Incoming} */
    const inc = {
      id, name: name.slice(0, MAX_NAME) || '?', size: typeof size === 'number' && size >= 0 ? size : 0,
      type: cleanType(m.type), state: 'offered', received: 0, acked: 0, chunks: [], reason: '', blob: null,
    };
    const live = Array.from(this.incoming.values()).filter((x) => x.state === 'offered' || x.state === 'receiving').length;
    /** @type {EndReason|''} */
    let refuse = '';
    if (!name || name.length > MAX_NAME || typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) refuse = 'invalid';
    else if (size > this.ctx.maxBytes()) refuse = 'too_big';
    else if (live >= MAX_INCOMING) refuse = 'busy';
    this.forgetEnded();
    this.incoming.set(id, inc);
    if (refuse) {
      this.sendMsg({ t: 'refuse', id, reason: refuse });
      inc.state = 'failed';
      inc.reason = refuse;
      // A refused offer is shown (too big, too many) unless it was malformed.
      if (refuse !== 'invalid') this.ctx.event({ type: 'incoming', link: this, inc });
      else this.dropped += 1;
      return;
    }
    this.ctx.event({ type: 'incoming', link: this, inc });
  }

  /** Keeps the record of ended incoming transfers bounded. */
  forgetEnded() {
    const ended = Array.from(this.incoming.values()).filter((x) => x.state === 'done' || x.state === 'failed');
    for (const x of ended.slice(0, Math.max(0, ended.length - 64))) this.incoming.delete(x.id);
  }

  /** We take an offered transfer. @param {number} id */
  accept(id) {
    const inc = this.incoming.get(id);
    if (!inc || inc.state !== 'offered') return;
    if (!this.sendMsg({ t: 'accept', id })) return this.endIncoming(inc, 'connection');
    inc.state = 'receiving';
    this.ctx.event({ type: 'incoming-progress', link: this, inc });
    if (inc.size === 0) this.complete(inc);
  }

  /** We decline an offer, or cancel a transfer being received. @param {number} id */
  decline(id) {
    const inc = this.incoming.get(id);
    if (!inc || (inc.state !== 'offered' && inc.state !== 'receiving')) return;
    const reason = inc.state === 'offered' ? 'declined' : 'cancelled';
    this.sendMsg({ t: 'refuse', id, reason });
    this.endIncoming(inc, reason);
  }

  /** @param {number} id @param {Uint8Array} bytes */
  onChunk(id, bytes) {
    const inc = this.incoming.get(id);
    // Chunks still on the way after we cancelled are dropped quietly.
    if (!inc || inc.state === 'failed') return;
    if (inc.state !== 'receiving') return this.bad(id, 'chunk for a transfer not accepted');
    if (inc.received + bytes.length > inc.size) return this.bad(id, 'more bytes than declared');
    inc.chunks.push(bytes.slice());
    inc.received += bytes.length;
    if (inc.received - inc.acked >= ACK_BYTES || inc.received === inc.size) {
      inc.acked = inc.received;
      this.sendMsg({ t: 'ack', id, bytes: inc.received });
    }
    this.ctx.event({ type: 'incoming-progress', link: this, inc });
  }

  /** @param {number} id */
  onEnd(id) {
    const inc = this.incoming.get(id);
    if (!inc || inc.state === 'failed') return;
    if (inc.state !== 'receiving') return this.bad(id, 'end of a transfer not accepted');
    if (inc.received !== inc.size) return this.bad(id, `ended at ${inc.received} of ${inc.size} bytes`);
    this.complete(inc);
  }

  /** @param {Incoming} inc */
  complete(inc) {
    if (inc.state === 'done') return;
    inc.blob = new Blob(/** @type {BlobPart[]} */ (inc.chunks), { type: inc.type || 'application/octet-stream' });
    inc.chunks = [];
    inc.state = 'done';
    this.sendMsg({ t: 'done', id: inc.id });
    this.ctx.event({ type: 'incoming-end', link: this, inc });
  }

  /** The sender cancelled. @param {number} id */
  onAbort(id) {
    const inc = this.incoming.get(id);
    if (!inc || (inc.state !== 'offered' && inc.state !== 'receiving')) return;
    this.endIncoming(inc, 'aborted');
  }

  /**
   * An incoming transfer ends without the file: its memory goes at once.
   * @param {Incoming} inc @param {EndReason} reason
   */
  endIncoming(inc, reason) {
    inc.state = 'failed';
    inc.reason = reason;
    inc.chunks = [];
    inc.blob = null;
    this.ctx.event({ type: 'incoming-end', link: this, inc });
  }

  // ------------------------------------------------------------ our transfers

  /** Offers one of our transfers to this peer. @param {Outgoing} out @returns {Leg} */
  offer(out) {
    /** @type {Leg} */
    const leg = { out, peerId: this.peerId, state: 'offered', acked: 0, reason: '' };
    this.legs.set(out.id, leg);
    if (!this.sendMsg({ t: 'offer', id: out.id, name: out.name, size: out.size, type: out.type })) {
      leg.state = 'failed';
      leg.reason = 'unavailable';
    }
    return leg;
  }

  /** @param {Record<string, unknown> & {t: string, id: number}} m */
  onLegMsg(m) {
    const leg = this.legs.get(m.id);
    // About a transfer we no longer send (cancelled, ended): nothing to do.
    if (!leg || leg.state === 'failed' || leg.state === 'done') return;
    if (m.t === 'accept') {
      if (leg.state !== 'offered') return;
      leg.state = 'sending';
      this.legEvent(leg);
      this.pump(leg);
    } else if (m.t === 'ack') {
      const n = m.bytes;
      if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < leg.acked || n > leg.out.size) return;
      leg.acked = n;
      this.legEvent(leg);
    } else if (m.t === 'done') {
      if (leg.state !== 'sent' && !(leg.state === 'sending' && leg.out.size === 0)) return;
      leg.acked = leg.out.size;
      leg.state = 'done';
      this.legEvent(leg);
    } else if (m.t === 'refuse') {
      const r = m.reason;
      /** @type {EndReason[]} */
      const known = ['declined', 'cancelled', 'too_big', 'busy', 'invalid'];
      this.endLeg(leg, known.includes(/** @type {EndReason} */ (r)) ? /** @type {EndReason} */ (r) : 'invalid');
    }
  }

  /** @param {Leg} leg */
  legEvent(leg) {
    this.ctx.event({ type: 'leg', link: this, leg });
  }

  /** @param {Leg} leg @param {EndReason} reason */
  endLeg(leg, reason) {
    if (leg.state === 'failed' || leg.state === 'done') return;
    leg.state = 'failed';
    leg.reason = reason;
    this.wake();
    this.legEvent(leg);
  }

  /** We cancel our transfer to this peer. @param {number} id */
  cancel(id) {
    const leg = this.legs.get(id);
    if (!leg || leg.state === 'failed' || leg.state === 'done') return;
    this.sendMsg({ t: 'abort', id });
    this.endLeg(leg, 'cancelled');
  }

  /** Resolves once the channel's buffer is below LOW_WATER, or the link is over. */
  drained() {
    if (this.closed || this.channel.bufferedAmount <= LOW_WATER) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(() => resolve(undefined)));
  }

  /**
   * Sends the file to this peer: READ_BYTES read at a time, CHUNK_BYTES per frame,
   * pausing while more than HIGH_WATER waits in this channel's buffer. Each peer has
   * its own channel and its own pump, so a slow peer holds back only its own.
   * @param {Leg} leg
   */
  async pump(leg) {
    const out = leg.out;
    const live = () => !this.closed && leg.state === 'sending';
    let off = 0;
    try {
      while (off < out.size) {
        const block = new Uint8Array(await out.file.slice(off, Math.min(off + READ_BYTES, out.size)).arrayBuffer());
        if (!block.length) throw new Error('file shorter than its size');
        for (let i = 0; i < block.length; i += CHUNK_BYTES) {
          if (this.channel.bufferedAmount > HIGH_WATER) await this.drained();
          if (!live()) return;
          const part = block.subarray(i, i + CHUNK_BYTES);
          const frame = new Uint8Array(4 + part.length);
          new DataView(frame.buffer).setUint32(0, out.id);
          frame.set(part, 4);
          this.channel.send(frame);
        }
        off += block.length;
      }
      if (!live()) return;
      this.channel.send(JSON.stringify({ t: 'end', id: out.id }));
      leg.state = 'sent';
      this.legEvent(leg);
    } catch (e) {
      if (!live()) return;
      console.warn('file sharing: send failed', e);
      this.sendMsg({ t: 'abort', id: out.id });
      this.endLeg(leg, this.channel.readyState === 'open' ? 'invalid' : 'connection');
    }
  }

  /**
   * The connection is gone (closed, or replaced by a new one): every transfer on it,
   * either way, has failed.
   */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.channel.removeEventListener('bufferedamountlow', this.onLow);
    this.wake();
    for (const inc of this.incoming.values()) {
      if (inc.state === 'offered' || inc.state === 'receiving') this.endIncoming(inc, 'connection');
    }
    for (const leg of this.legs.values()) this.endLeg(leg, 'connection');
  }
}

/** A size for people: B, KB, MB, GB. @param {number} n */
export function formatSize(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KB', 'MB', 'GB'];
  let v = n / 1024;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u += 1; }
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[u]}`;
}

/** A file name safe to save under (no path separators or control characters). @param {string} name */
function saveName(name) {
  return name.replace(/[\\/\p{Cc}]/gu, '_').replace(/^\.+/, '_') || 'file';
}

/** Status text for a transfer that ended without the file. @param {EndReason|''} r @param {boolean} sending */
function endText(r, sending) {
  switch (r) {
    case 'declined': return t('fsDeclined');
    case 'cancelled': return sending ? t('fsCancelledThere') : t('fsCancelled');
    case 'aborted': return t('fsAborted');
    case 'too_big': return sending ? t('fsTooBigThere') : t('fsTooBig');
    case 'busy': return sending ? t('fsBusyThere') : t('fsBusy');
    case 'connection': return t('fsConnection');
    case 'unavailable': return t('fsUnavailable');
    default: return t('fsInvalid');
  }
}

/**
 * @typedef {{
 *   peers: () => Iterable<{id: string, name: string}>,
 *   show: (el: HTMLElement, fromOther: boolean) => void,
 *   toast: (text: string) => void,
 * }} PageHooks
 */

/**
 * The page's file sharing: one Link per peer connection's channel, the Send file
 * button and the drop target, and one item per transfer in the chat panel.
 */
export class FileSharing {
  /** @param {PageHooks} page */
  constructor(page) {
    this.page = page;
    /** @type {Map<string, Link>} by peer id */
    this.links = new Map();
    /** @type {Map<string, string>} peer names, as last known */
    this.names = new Map();
    /** @type {Map<number, Outgoing>} */
    this.outgoing = new Map();
    this.nextId = 1 + Math.floor(Math.random() * 0xffff);
    let stored = 0;
    try { stored = Number(localStorage.getItem(MAX_BYTES_KEY) || 0); } catch { /* storage unavailable */ }
    /** the size limit for sending and receiving (bytes) */
    this.maxBytes = Number.isSafeInteger(stored) && stored > 0 ? stored : DEFAULT_MAX_BYTES;
    /** @type {Map<string, HTMLElement>} transfer items by key (`out:ID`, `in:PEER:ID`) */
    this.items = new Map();
    /** @type {Map<string, Blob>} the files behind the Save links, by object URL */
    this.saved = new Map();
    /** @type {Map<string, Set<number>>} progress values shown, per bar key (for tests) */
    this.seen = new Map();
  }

  /**
   * A peer connection's data channel (peer.js `hooks.onChannel`), or null when the
   * connection is closed or replaced: the transfers on the one before fail.
   * @param {{id: string, name: string}} peer
   * @param {RTCDataChannel|null} channel
   */
  onChannel(peer, channel) {
    this.names.set(peer.id, peer.name);
    const old = this.links.get(peer.id);
    if (old) {
      this.links.delete(peer.id);
      old.close();
    }
    if (!channel) return;
    channel.binaryType = 'arraybuffer';
    const link = new Link(peer.id, channel, { maxBytes: () => this.maxBytes, event: (ev) => this.onEvent(ev) });
    this.links.set(peer.id, link);
    channel.addEventListener('message', (ev) => link.receive(ev.data));
    channel.addEventListener('close', () => {
      if (this.links.get(peer.id) === link) this.links.delete(peer.id);
      link.close();
    });
  }

  /** Sends files to everyone connected. @param {Iterable<File>} files */
  sendFiles(files) {
    for (const f of files) this.send(f);
  }

  /**
   * Offers a file to every other participant whose channel is open.
   * @param {File|Blob} file
   * @param {string} [name]
   * @returns {number} the transfer id, 0 if nothing was sent
   */
  send(file, name = file instanceof File ? file.name : 'file') {
    name = name.replace(/\p{Cc}/gu, '').trim().slice(0, MAX_NAME) || 'file';
    if (file.size > this.maxBytes) {
      this.page.toast(t('fileTooBig', { name, size: formatSize(file.size), limit: formatSize(this.maxBytes) }));
      return 0;
    }
    const targets = Array.from(this.page.peers());
    if (!targets.length) {
      this.page.toast(t('fileNobody'));
      return 0;
    }
    const id = this.nextId;
    this.nextId = this.nextId >= MAX_ID ? 1 : this.nextId + 1;
    /** @type {Outgoing} */
    const out = { id, file, name, size: file.size, type: cleanType(file.type), legs: new Map() };
    this.outgoing.set(id, out);
    this.drawOut(out);
    for (const p of targets) {
      this.names.set(p.id, p.name);
      const link = this.links.get(p.id);
      /** @type {Leg} */
      const leg = link ? link.offer(out) : { out, peerId: p.id, state: 'failed', acked: 0, reason: 'unavailable' };
      out.legs.set(p.id, leg);
      this.drawLeg(leg);
    }
    this.drawOut(out);
    return id;
  }

  /** We cancel one of our transfers, for everyone. @param {number} id */
  cancel(id) {
    const out = this.outgoing.get(id);
    if (!out) return;
    for (const leg of out.legs.values()) {
      const link = this.links.get(leg.peerId);
      if (link && link.legs.get(id) === leg) link.cancel(id);
      else if (leg.state !== 'done' && leg.state !== 'failed') { leg.state = 'failed'; leg.reason = 'connection'; this.drawLeg(leg); }
    }
  }

  /** @param {LinkEvent} ev */
  onEvent(ev) {
    if (ev.type === 'leg') this.drawLeg(ev.leg);
    else this.drawIn(ev.link, ev.inc);
  }

  // ------------------------------------------------------------ the page

  /**
   * A progress bar (role progressbar), its value in percent.
   * @param {string} key @param {string} label
   */
  bar(key, label) {
    const p = document.createElement('progress');
    p.max = 100;
    p.value = 0;
    p.dataset.key = key;
    p.setAttribute('role', 'progressbar');
    p.setAttribute('aria-valuemin', '0');
    p.setAttribute('aria-valuemax', '100');
    p.setAttribute('aria-valuenow', '0');
    p.setAttribute('aria-label', label);
    return p;
  }

  /** @param {HTMLProgressElement} p @param {number} done @param {number} size */
  setBar(p, done, size) {
    const pct = size > 0 ? Math.floor((done / size) * 100) : 100;
    if (p.getAttribute('aria-valuenow') === String(pct)) return;
    p.value = pct;
    p.setAttribute('aria-valuenow', String(pct));
    const key = p.dataset.key || '';
    let s = this.seen.get(key);
    if (!s) { s = new Set(); this.seen.set(key, s); }
    s.add(pct);
  }

  /** @param {string} text @param {string} cls @param {() => void} fn */
  button(text, cls, fn) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = `small ${cls}`;
    b.textContent = text;
    b.addEventListener('click', fn);
    return b;
  }

  /**
   * The chat item of a transfer: who, the file's name and size.
   * @param {string} key @param {string} who @param {string} name @param {number} size @param {boolean} mine
   */
  item(key, who, name, size, mine) {
    const li = document.createElement('li');
    li.className = `file-item${mine ? ' mine' : ''}`;
    li.dataset.transfer = key;
    const head = document.createElement('div');
    head.className = 'chat-meta';
    const w = document.createElement('strong');
    w.textContent = who;
    const what = document.createElement('span');
    what.className = 'muted';
    what.textContent = t(mine ? 'fileSharedMine' : 'fileShared');
    head.append(w, what);
    const file = document.createElement('p');
    file.className = 'file-name';
    const n = document.createElement('span');
    n.textContent = name;
    const s = document.createElement('span');
    s.className = 'muted file-size';
    s.textContent = ` (${formatSize(size)})`;
    file.append(n, s);
    li.append(head, file);
    this.items.set(key, li);
    return li;
  }

  /** Our transfer's item: one row per receiver, and Cancel. @param {Outgoing} out */
  drawOut(out) {
    const key = `out:${out.id}`;
    let li = this.items.get(key);
    if (!li) {
      li = this.item(key, t('you'), out.name, out.size, true);
      const rows = document.createElement('ul');
      rows.className = 'file-legs';
      const actions = document.createElement('div');
      actions.className = 'file-actions';
      actions.append(this.button(t('cancel'), 'secondary file-cancel', () => this.cancel(out.id)));
      li.append(rows, actions);
      this.page.show(li, false);
    }
    const over = Array.from(out.legs.values()).every((l) => l.state === 'done' || l.state === 'failed');
    const cancel = /** @type {HTMLButtonElement} */ (li.querySelector('.file-cancel'));
    if (out.legs.size && over) {
      cancel.hidden = true;
      li.dataset.state = 'over';
      // Sent to everyone it could go to: the file is not needed any more.
      this.outgoing.delete(out.id);
    }
  }

  /** One receiver's row in our transfer's item. @param {Leg} leg */
  drawLeg(leg) {
    const li = this.items.get(`out:${leg.out.id}`);
    if (!li) return;
    const rows = /** @type {HTMLElement} */ (li.querySelector('.file-legs'));
    let row = /** @type {HTMLElement|null} */ (rows.querySelector(`[data-peer="${CSS.escape(leg.peerId)}"]`));
    const who = this.names.get(leg.peerId) || 'Guest';
    if (!row) {
      row = document.createElement('li');
      row.dataset.peer = leg.peerId;
      const n = document.createElement('span');
      n.className = 'file-peer';
      n.textContent = who;
      const st = document.createElement('span');
      st.className = 'file-status muted';
      st.setAttribute('role', 'status');
      row.append(n, this.bar(`out:${leg.out.id}:${leg.peerId}`, t('progressTo', { name: leg.out.name, who })), st);
      rows.append(row);
    }
    const bar = /** @type {HTMLProgressElement} */ (row.querySelector('progress'));
    this.setBar(bar, leg.acked, leg.out.size);
    if (row.dataset.state === leg.state) return;
    row.dataset.state = leg.state;
    bar.hidden = leg.state === 'failed';
    const st = /** @type {HTMLElement} */ (row.querySelector('.file-status'));
    const text = leg.state === 'offered' ? t('fsWaiting') : leg.state === 'sending' || leg.state === 'sent' ? t('fsSending')
      : leg.state === 'done' ? t('fsDelivered') : endText(leg.reason, true);
    if (st.textContent !== text) st.textContent = text;
    if (leg.state === 'done' || leg.state === 'failed') this.drawOut(leg.out);
  }

  /** An incoming transfer's item. @param {Link} link @param {Incoming} inc */
  drawIn(link, inc) {
    const key = `in:${link.peerId}:${inc.id}`;
    let li = this.items.get(key);
    if (!li) {
      const who = this.names.get(link.peerId) || 'Guest';
      li = this.item(key, who, inc.name, inc.size, false);
      const bar = this.bar(key, t('progressFrom', { name: inc.name, who }));
      bar.hidden = true;
      const st = document.createElement('p');
      st.className = 'file-status muted small';
      st.setAttribute('role', 'status');
      const actions = document.createElement('div');
      actions.className = 'file-actions';
      actions.append(
        this.button(t('fileAccept'), 'primary file-accept', () => link.accept(inc.id)),
        this.button(t('fileDecline'), 'secondary file-decline', () => link.decline(inc.id)),
        this.button(t('cancel'), 'secondary file-cancel', () => link.decline(inc.id)),
      );
      li.append(bar, st, actions);
      this.page.show(li, true);
    }
    const bar = /** @type {HTMLProgressElement} */ (li.querySelector('progress'));
    if (inc.state === 'receiving' || inc.state === 'done') this.setBar(bar, inc.received, inc.size);
    // The rest changes with the state only (progress comes once per chunk).
    if (li.dataset.state === inc.state) return;
    li.dataset.state = inc.state;
    const st = /** @type {HTMLElement} */ (li.querySelector('.file-status'));
    const q = (/** @type {string} */ s) => /** @type {HTMLElement} */ (li.querySelector(s));
    q('.file-accept').hidden = inc.state !== 'offered';
    q('.file-decline').hidden = inc.state !== 'offered';
    q('.file-cancel').hidden = inc.state !== 'receiving';
    bar.hidden = inc.state !== 'receiving' && inc.state !== 'done';
    st.textContent = inc.state === 'offered' ? t('fsOffered') : inc.state === 'receiving' ? t('fsReceiving')
      : inc.state === 'done' ? t('fsReceived') : endText(inc.reason, false);
    if (inc.state === 'done' && inc.blob && !li.querySelector('.file-save')) {
      const a = document.createElement('a');
      a.className = 'primary file-save';
      a.href = URL.createObjectURL(inc.blob);
      a.download = saveName(inc.name);
      a.textContent = t('fileSave');
      a.setAttribute('aria-label', t('fileSaveName', { name: inc.name }));
      this.saved.set(a.href, inc.blob);
      inc.blob = null;
      q('.file-actions').append(a);
    }
    if (inc.state === 'failed') {
      const a = /** @type {HTMLAnchorElement|null} */ (li.querySelector('.file-save'));
      if (a) { URL.revokeObjectURL(a.href); this.saved.delete(a.href); a.remove(); }
    }
  }

  /** Transfers as the page knows them (for the test handle). */
  summary() {
    /** @type {any[]} */
    const list = [];
    for (const link of this.links.values()) {
      for (const inc of link.incoming.values()) {
        list.push({
          dir: 'in', from: link.peerId, id: inc.id, name: inc.name, size: inc.size, state: inc.state,
          reason: inc.reason, received: inc.received, held: inc.chunks.reduce((n, c) => n + c.length, 0),
          seen: Array.from(this.seen.get(`in:${link.peerId}:${inc.id}`) || []),
        });
      }
      for (const leg of link.legs.values()) {
        list.push({
          dir: 'out', to: link.peerId, id: leg.out.id, name: leg.out.name, size: leg.out.size, state: leg.state,
          reason: leg.reason, acked: leg.acked, seen: Array.from(this.seen.get(`out:${leg.out.id}:${link.peerId}`) || []),
        });
      }
    }
    return list;
  }
}
