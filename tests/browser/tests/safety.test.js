// The safety-code derivation and exchange of web/assets/safety.js (docs/CLIENT.md,
// "Safety codes"): codes for fixed fingerprints and nonces, computed independently
// from the documented steps; the fingerprint a description yields; and the exchange
// between two ends over a pair of in-memory channels, with what it refuses. No
// browser needed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { safetyCode, fingerprintOf, parseSafetyMessage, SafetyExchange, nonceFor } from '../../../web/assets/safety.js';

const hex = (/** @type {(i: number) => number} */ f) =>
  `sha-256 ${Array.from({ length: 32 }, (_, i) => f(i).toString(16).toUpperCase().padStart(2, '0')).join(':')}`;
const A = hex((i) => i);
const B = hex((i) => 255 - i);
const NA = '00112233445566778899aabbccddeeff';
const NB = 'ffeeddccbbaa99887766554433221100';

test('fixed fingerprints and nonces give the documented code, from either end', async () => {
  assert.equal(await safetyCode({ fp: A, nonce: NA }, { fp: B, nonce: NB }), '083 362');
  assert.equal(await safetyCode({ fp: B, nonce: NB }, { fp: A, nonce: NA }), '083 362');
  // The nonces belong to their fingerprints: swapped, another code.
  assert.equal(await safetyCode({ fp: A, nonce: NB }, { fp: B, nonce: NA }), '591 954');
});

test('the sha-256 fingerprint of a description, normalized', () => {
  const lower = A.slice('sha-256 '.length).toLowerCase();
  const sdp = [
    'v=0', 'o=- 1 2 IN IP4 127.0.0.1', 's=-', 't=0 0',
    `a=fingerprint:sha-1 ${'AB:'.repeat(19)}AB`,
    `a=fingerprint:SHA-256 ${lower}`,
    'm=audio 9 UDP/TLS/RTP/SAVPF 111', '',
  ].join('\r\n');
  assert.equal(fingerprintOf(sdp), A);
  assert.equal(fingerprintOf(''), '');
  assert.equal(fingerprintOf(undefined), '');
  // A fingerprint of the wrong length is not taken.
  assert.equal(fingerprintOf(`a=fingerprint:sha-256 ${'AB:'.repeat(30)}AB\r\n`), '');
});

test('the exchange refuses what is not one of its two messages', () => {
  for (const bad of [
    42, 'x'.repeat(257), 'not json', 'null', '[]', '{"t":"commit"}', '{"t":"commit","h":"AB"}',
    `{"t":"commit","h":"${'A'.repeat(64)}"}`, `{"t":"reveal","n":"${'0'.repeat(31)}"}`, '{"t":"hello"}',
  ]) assert.ok('error' in parseSafetyMessage(bad), String(bad));
  assert.deepEqual(parseSafetyMessage(`{"t":"reveal","n":"${NA}"}`), { t: 'reveal', n: NA });
});

/** Two in-memory channel ends, open, delivering in order (a test's own stand-in for an RTCDataChannel). */
function channels() {
  /** @type {any[]} */
  const ends = [0, 1].map(() => ({ readyState: 'open', onopen: null, onmessage: null, sent: [], peer: null,
    send(/** @type {string} */ d) { this.sent.push(d); queueMicrotask(() => this.peer.onmessage?.({ data: d })); } }));
  ends[0].peer = ends[1];
  ends[1].peer = ends[0];
  return ends;
}

/** Runs an exchange on a channel end; resolves with the code or the error. @param {any} ch @param {string} local @param {string} remote */
function exchange(ch, local, remote) {
  return new Promise((resolve) => {
    new SafetyExchange(ch, () => ({ local, remote }), (r) => resolve({ code: r.code }), (why) => resolve({ error: why }));
  });
}

test('two ends agree on a code; the commitment comes first and binds the nonce', async () => {
  const [x, y] = channels();
  const [rx, ry] = await Promise.all([exchange(x, A, B), exchange(y, B, A)]);
  assert.ok('code' in rx && 'code' in ry, JSON.stringify([rx, ry]));
  assert.equal(rx.code, ry.code);
  // Commitment, then nonce, from each end; the nonce is the page's for that peer.
  const [c, r] = x.sent.map((/** @type {string} */ s) => JSON.parse(s));
  assert.equal(c.t, 'commit');
  assert.equal(r.t, 'reveal');
  assert.equal(r.n, await nonceFor(B));
  assert.equal(c.h, createHash('sha256').update(Buffer.from(r.n, 'hex')).digest('hex'));
  // The same certificates again (a replaced connection): the same code.
  const [x2, y2] = channels();
  const again = await Promise.all([exchange(x2, A, B), exchange(y2, B, A)]);
  assert.deepEqual(again, [rx, ry]);
});

test('a nonce that does not match its commitment, or comes first, ends the exchange without a code', async () => {
  const [x, y] = channels();
  y.onmessage = null;
  const got = exchange(x, A, B);
  // The far end (hand-written) commits to one nonce and reveals another.
  x.onmessage({ data: JSON.stringify({ t: 'commit', h: createHash('sha256').update(Buffer.from(NA, 'hex')).digest('hex') }) });
  x.onmessage({ data: JSON.stringify({ t: 'reveal', n: NB }) });
  assert.match(/** @type {any} */ (await got).error, /does not match its commitment/);
  const [p] = channels();
  const early = exchange(p, A, B);
  p.onmessage({ data: JSON.stringify({ t: 'reveal', n: NA }) });
  assert.match(/** @type {any} */ (await early).error, /before the commitments/);
});
