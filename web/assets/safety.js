// Safety codes: a short number that both ends of a connection show, equal only when
// nobody sits in the middle of it. The media of a connection is encrypted with keys
// from a DTLS handshake that each side checks against the certificate fingerprint in
// the other's description; the server relays those descriptions, so a server that
// swapped fingerprints could sit in the middle. Read aloud and compared, the code
// shows it (docs/CLIENT.md, "Safety codes").
//
// The code comes from the connection's two fingerprints and one secret number
// (nonce) from each end, exchanged over the connection's own data channel with a
// commitment first, as ZRTP does for its short authentication string: each end
// sends the SHA-256 of its nonce, and shows the nonce only once it holds the other's
// commitment. Someone in the middle has to fix its own nonces before it learns the
// ends' ones, so it gets one guess in 10^6 at making the two codes equal; without
// the commitment, knowing both ends' fingerprints ahead (they are kept for the
// page's life), it could search for a match offline.
//
// The derivation, for any other client:
//   1. From each side's description in force, the first `a=fingerprint:` line with
//      hash function `sha-256` (RFC 8122): `sha-256`, one space, the fingerprint as
//      upper-case hexadecimal pairs joined by `:`.
//   2. Each side's nonce: 16 bytes, as 32 lower-case hexadecimal digits.
//   3. The two (fingerprint, nonce) pairs sorted by fingerprint (ASCII order), then
//      the text `meshmeet-safety-1` LF fingerprint1 LF fingerprint2 LF nonce1 LF
//      nonce2, in UTF-8.
//   4. SHA-256 of that; its first 8 bytes as an unsigned big-endian integer, modulo
//      10^6, as 6 decimal digits (zeros in front) in two groups of three.
//
// The exchange, on the negotiated data channel SAFETY_CHANNEL (ordered, reliable):
// each side sends `{"t":"commit","h":HEX64}` when the channel opens (h: SHA-256 of
// the 16 nonce bytes), and `{"t":"reveal","n":HEX32}` once it has both sent its
// commitment and received the other's. A reveal that does not match its commitment,
// or anything else, ends the exchange without a code.
//
// A side's nonce is an HMAC of the other side's fingerprint under a secret the page
// keeps in memory: the same pair of certificates gives the same code on every
// connection between the two pages (a replaced connection, an ICE restart), and any
// other certificate, one in the middle too, gets a nonce nobody could know.

/** The id and label of the negotiated data channel the exchange runs on. */
export const SAFETY_CHANNEL = { id: 100, label: 'meshmeet-safety' };
/** Digits in a code, and the text before the fingerprints. */
const DIGITS = 6;
const LABEL = 'meshmeet-safety-1';
/** The longest message the exchange accepts (both kinds are well under it). */
const MAX_MESSAGE = 256;

const enc = new TextEncoder();

/** @param {ArrayBuffer|Uint8Array} b */
function toHex(b) {
  return Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, '0')).join('');
}

/** @param {string} h an even number of hexadecimal digits */
function fromHex(h) {
  const out = new Uint8Array(h.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(h.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** @param {BufferSource} b */
async function sha256Hex(b) {
  return toHex(await crypto.subtle.digest('SHA-256', b));
}

/**
 * The sha-256 fingerprint of a description, normalized ('' when it has none).
 * @param {string|undefined|null} sdp
 */
export function fingerprintOf(sdp) {
  if (!sdp) return '';
  const m = /^a=fingerprint:sha-256[ \t]+([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31})[ \t]*$/mi.exec(sdp);
  return m ? `sha-256 ${m[1].toUpperCase()}` : '';
}

/**
 * The safety code of a connection: each side's fingerprint with its nonce (the
 * arguments may come in either order).
 * @param {{fp: string, nonce: string}} a @param {{fp: string, nonce: string}} b
 * @returns {Promise<string>} e.g. "083 362"
 */
export async function safetyCode(a, b) {
  const [x, y] = a.fp < b.fp ? [a, b] : [b, a];
  const data = enc.encode(`${LABEL}\n${x.fp}\n${y.fp}\n${x.nonce}\n${y.nonce}`);
  const hash = new DataView(await crypto.subtle.digest('SHA-256', data));
  const n = hash.getBigUint64(0) % 10n ** BigInt(DIGITS);
  const s = n.toString().padStart(DIGITS, '0');
  return `${s.slice(0, 3)} ${s.slice(3)}`;
}

/** @type {Promise<CryptoKey>|null} the page's secret for nonces */
let secret = null;

/** This page's nonce for a connection with the other side's fingerprint. @param {string} remoteFp */
export async function nonceFor(remoteFp) {
  if (!secret) {
    secret = crypto.subtle.generateKey({ name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  }
  const mac = await crypto.subtle.sign('HMAC', await secret, enc.encode(`${LABEL}\n${remoteFp}`));
  return toHex(new Uint8Array(mac).slice(0, 16));
}

/**
 * What a received message is, or why it is refused.
 * @param {unknown} data
 * @returns {{t: 'commit', h: string} | {t: 'reveal', n: string} | {error: string}}
 */
export function parseSafetyMessage(data) {
  if (typeof data !== 'string') return { error: 'not text' };
  if (data.length > MAX_MESSAGE) return { error: 'too long' };
  let m;
  try {
    m = JSON.parse(data);
  } catch {
    return { error: 'not JSON' };
  }
  if (!m || typeof m !== 'object') return { error: 'not an object' };
  if (m.t === 'commit' && typeof m.h === 'string' && /^[0-9a-f]{64}$/.test(m.h)) return { t: 'commit', h: m.h };
  if (m.t === 'reveal' && typeof m.n === 'string' && /^[0-9a-f]{32}$/.test(m.n)) return { t: 'reveal', n: m.n };
  return { error: 'unknown message' };
}

/**
 * The exchange on one connection's safety channel. `onCode` gets the code and the
 * fingerprint pair it belongs to; `onError` why there is none.
 */
export class SafetyExchange {
  /**
   * @param {RTCDataChannel} channel
   * @param {() => {local: string, remote: string}} fingerprints
   * @param {(r: {code: string, local: string, remote: string}) => void} onCode
   * @param {(why: string) => void} onError
   */
  constructor(channel, fingerprints, onCode, onError) {
    this.channel = channel;
    this.fingerprints = fingerprints;
    this.onCode = onCode;
    this.onError = onError;
    /** the fingerprints and our nonce, fixed when the channel opened */
    this.local = '';
    this.remote = '';
    this.nonce = '';
    this.sentCommit = false;
    this.sentReveal = false;
    /** @type {string} the other side's commitment */
    this.theirCommit = '';
    this.done = false;
    /** the channel is open (the commitment goes once the descriptions are in force too) */
    this.opened = false;
    /** work done in order: a message is handled after the one before it */
    /** @type {Promise<void>} */
    this.queue = Promise.resolve();
    channel.onopen = () => this.run(() => this.open());
    channel.onmessage = (ev) => this.run(() => this.message(ev.data));
    if (channel.readyState === 'open') this.run(() => this.open());
  }

  /** @param {() => Promise<void>} step */
  run(step) {
    this.queue = this.queue.then(step).catch((e) => this.fail(`failed: ${e}`));
  }

  /** @param {string} why */
  fail(why) {
    if (this.done) return;
    this.done = true;
    this.onError(why);
  }

  /**
   * The connection's descriptions changed (its signaling state is stable again): a
   * channel that opened before the answer was in force can start now.
   */
  descriptions() {
    if (this.opened && !this.sentCommit && !this.done) this.run(() => this.open());
  }

  async open() {
    this.opened = true;
    if (this.done || this.sentCommit) return;
    const { local, remote } = this.fingerprints();
    // The channel may open while the answer that set it up is still being applied
    // (the DTLS and SCTP handshakes run ahead of it): wait for `descriptions()`.
    if (!local || !remote) return;
    this.local = local;
    this.remote = remote;
    this.nonce = await nonceFor(remote);
    const h = await sha256Hex(fromHex(this.nonce));
    this.send({ t: 'commit', h });
    this.sentCommit = true;
    this.maybeReveal();
  }

  maybeReveal() {
    if (this.done || this.sentReveal || !this.sentCommit || !this.theirCommit) return;
    this.send({ t: 'reveal', n: this.nonce });
    this.sentReveal = true;
  }

  /** @param {unknown} data */
  async message(data) {
    if (this.done) return;
    const m = parseSafetyMessage(data);
    if ('error' in m) return this.fail(`refused a message: ${m.error}`);
    if (m.t === 'commit') {
      if (this.theirCommit) return this.fail('refused a second commitment');
      this.theirCommit = m.h;
      this.maybeReveal();
      return;
    }
    // A reveal: only after their commitment and ours (ours first: their nonce must
    // not be known to us before we are bound to ours).
    if (!this.theirCommit || !this.sentCommit) return this.fail('refused a nonce before the commitments');
    if ((await sha256Hex(fromHex(m.n))) !== this.theirCommit) return this.fail('a nonce that does not match its commitment');
    const now = this.fingerprints();
    if (now.local !== this.local || now.remote !== this.remote) return this.fail('the fingerprints changed during the exchange');
    const code = await safetyCode({ fp: this.local, nonce: this.nonce }, { fp: this.remote, nonce: m.n });
    this.done = true;
    this.onCode({ code, local: this.local, remote: this.remote });
  }

  /** @param {object} m */
  send(m) {
    if (this.channel.readyState !== 'open') throw new Error('the safety channel closed');
    this.channel.send(JSON.stringify(m));
  }

  close() {
    this.done = true;
    this.channel.onopen = null;
    this.channel.onmessage = null;
  }
}

/** @type {Promise<RTCCertificate|null>|null} */
let cert = null;

/**
 * One DTLS certificate for every connection this page makes, so that the code of a
 * pair stays the same when a failed connection is replaced by a new one: a code that
 * changes then means that the other side's certificate really changed. Null where the
 * browser cannot generate one (each connection then gets its own).
 * @returns {Promise<RTCCertificate|null>}
 */
export function pageCertificate() {
  if (!cert) {
    cert = (async () => {
      try {
        return await RTCPeerConnection.generateCertificate(
          /** @type {any} */ ({ name: 'ECDSA', namedCurve: 'P-256' }));
      } catch (e) {
        console.warn('no page certificate', e);
        return null;
      }
    })();
  }
  return cert;
}

/**
 * Forgets the page certificate and makes another (the test handle uses it to show
 * what the other side sees when a certificate changes mid-call).
 * @returns {Promise<RTCCertificate|null>}
 */
export function newPageCertificate() {
  cert = null;
  return pageCertificate();
}
