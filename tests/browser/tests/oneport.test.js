// A network that lets out only HTTPS: three participants in a second network namespace
// whose firewall (nftables) drops everything leaving it except TCP to the server's
// HTTPS port, and one participant outside it, all in one call. Everyone decodes
// everyone's video; the three behind the firewall are relayed by the embedded TURN
// server over TLS or TCP on the HTTPS port, which the server's per-connection counts
// confirm. Then the same with UDP to the HTTPS port number let through as well (the
// server listens for TURN over UDP there, `turn.extra_udp_listen`): relayed over UDP
// on that port. The /check page, run behind the same firewall, says so line by line.
// See lib/restricted.js for the namespace.
//
// The calls run in the rooms of the call tests (MESHMEET_ROOMS; the CI run takes the
// Chromium one): the room's first three browsers behind the firewall, the fourth
// outside. The server is named by its IP address here, and Firefox uses no `turns:`
// URL with an address for a host: behind the firewall it gets through on TURN over
// plain TCP on the HTTPS port.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  Server, Browsers, rooms, participant, newPage, waitForMedia, waitFor, describeCall, text, HOST_IP,
} from '../lib/harness.js';
import { RestrictedNet, RestrictedBrowsers } from '../lib/restricted.js';

/** @typedef {import('../lib/harness.js').Page} Page */
/** @typedef {import('../lib/harness.js').Participant} Participant */
/** @typedef {import('../lib/harness.js').Kind} Kind */

const HTTPS_PORT = 8443;
const SHARED = 'meshmeet_https_port_connections_total';
const CREATED = 'meshmeet_turn_allocations_created_total';
/** Each test's own limit; waits end as soon as their state is reached. */
const T = { timeout: 420_000 };

/**
 * The call rooms here: those of the call tests, but the mixed room only when
 * MESHMEET_ROOMS names it. This test is about the server's port and the firewall;
 * the Chromium and the Firefox room cover both browsers' relay candidates, and
 * Firefox-Chromium negotiation has its own tests in the mixed call room.
 */
const firewallRooms = () => rooms().filter((r) => r.label !== 'mixed' ||
  (process.env.MESHMEET_ROOMS || '').split(',').map((x) => x.trim()).includes('mixed'));

/** @type {RestrictedNet} */ let net;
/** @type {Server} */ let server;
/** @type {RestrictedBrowsers} */ let inside;
/** @type {Browsers} */ let outside;

before(async () => {
  net = RestrictedNet.create();
  server = await new Server({ turn: [`extra_udp_listen = ["${HOST_IP}:${HTTPS_PORT}"]`] }).start();
  inside = new RestrictedBrowsers(net);
  outside = new Browsers();
});

after(async () => {
  await inside?.close();
  await outside?.close();
  await server?.stop();
  net?.destroy();
});

/**
 * Each connection's selected candidate pair, from the local side: candidate type,
 * relay protocol and (Chromium) the ICE server URL the candidate came from.
 * @param {Page} page
 * @returns {Promise<Record<string, {type: string, relayProtocol: string, url: string, remote: string}|null>>}
 */
const selected = (page) => page.evaluate(async () => {
  /** @type {Record<string, any>} */
  const out = {};
  for (const p of /** @type {any} */ (window).meshmeet.peers.values()) {
    const st = await p.pc.getStats();
    /** @type {any} */
    let pair = null;
    st.forEach((/** @type {any} */ s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = st.get(s.selectedCandidatePairId) || pair;
    });
    // Firefox flags the pair instead.
    if (!pair) st.forEach((/** @type {any} */ s) => { if (s.type === 'candidate-pair' && s.selected) pair = s; });
    const l = pair && st.get(pair.localCandidateId);
    const r = pair && st.get(pair.remoteCandidateId);
    out[p.id] = l && r ? {
      type: l.candidateType, relayProtocol: String(l.relayProtocol || ''), url: String(l.url || ''), remote: r.candidateType,
    } : null;
  }
  return out;
});

/**
 * Every candidate pair of every connection (for failure reports): local and remote
 * candidate, state, nomination, priority, checks and responses.
 * @param {Page} page
 */
const pairs = (page) => page.evaluate(async () => {
  const lines = [];
  for (const p of /** @type {any} */ (window).meshmeet.peers.values()) {
    const st = await p.pc.getStats();
    lines.push(`  peer ${p.id}:`);
    st.forEach((/** @type {any} */ s) => {
      if (s.type === 'local-candidate') lines.push(`    local ${s.candidateType}/${s.relayProtocol || s.protocol}:${s.port} ${s.url || ''}`);
      if (s.type !== 'candidate-pair') return;
      const l = st.get(s.localCandidateId) || {};
      const r = st.get(s.remoteCandidateId) || {};
      lines.push(`    ${l.candidateType}/${l.relayProtocol || l.protocol}:${l.port} -> ${r.candidateType}/${r.protocol} ${r.address}:${r.port}` +
        ` ${s.state}${s.nominated ? ' nominated' : ''}${s.selected ? ' selected' : ''} prio ${s.priority}` +
        ` req ${s.requestsSent ?? '?'}/${s.requestsReceived ?? '?'} resp ${s.responsesReceived ?? '?'}/${s.responsesSent ?? '?'} rtt ${s.currentRoundTripTime ?? '?'}`);
    });
  }
  return lines.join('\n');
});

/**
 * Whether a selected pair is relayed by one of `protocols` through the HTTPS port. The
 * candidate's URL names the port where the browser reports it (Chromium); where it
 * does not (Firefox), the firewall leaves no other port.
 * @param {{type: string, relayProtocol: string, url: string}|null} s
 * @param {string[]} protocols
 */
function onHttpsPort(s, protocols) {
  if (!s || s.type !== 'relay' || !protocols.includes(s.relayProtocol)) return false;
  return !s.url || new RegExp(`^turns?:${HOST_IP.replace(/\./g, '\\.')}:${HTTPS_PORT}\\b`).test(s.url);
}

/**
 * The first three of `kinds` join `room` from behind the firewall, the fourth from
 * outside; returns their pages once everyone decodes everyone and the three behind
 * the firewall are relayed by one of `protocols` on the HTTPS port.
 * @param {string} room @param {Kind[]} kinds @param {string[]} protocols
 * @param {Participant[]} people filled as they join (closed by the caller)
 */
async function call(room, kinds, protocols, people) {
  const url = `${server.url}/${room}`;
  for (const [i, kind] of kinds.slice(0, 3).entries()) people.push(await participant(inside, kind, url, `Behind ${i + 1}`));
  people.push(await participant(outside, kinds[3], url, 'Outside'));
  const pages = people.map((p) => p.page);
  try {
    await waitForMedia(pages, 4, 180_000);
  } catch (e) {
    const all = [];
    for (const p of people) all.push(`${p.name}:\n${await describeCall(p.page)}\nselected: ${JSON.stringify(await selected(p.page).catch(() => null))}`);
    throw new Error(`${/** @type {Error} */ (e).message}\n--- every page:\n${all.join('\n')}`);
  }
  for (const [i, p] of people.slice(0, 3).entries()) {
    try {
      await waitFor(p.page, async ([protos, host, port]) => {
        const mm = /** @type {any} */ (window).meshmeet;
        for (const peer of mm.peers.values()) {
          const st = await peer.pc.getStats();
          /** @type {any} */
          let pair = null;
          st.forEach((/** @type {any} */ s) => {
            if (s.type === 'transport' && s.selectedCandidatePairId) pair = st.get(s.selectedCandidatePairId) || pair;
          });
          if (!pair) st.forEach((/** @type {any} */ s) => { if (s.type === 'candidate-pair' && s.selected) pair = s; });
          const l = pair && st.get(pair.localCandidateId);
          if (!l || l.candidateType !== 'relay' || !protos.includes(l.relayProtocol)) return false;
          if (l.url && !String(l.url).startsWith(`turn:${host}:${port}?`) && !String(l.url).startsWith(`turns:${host}:${port}?`)) return false;
        }
        return mm.peers.size === 3;
      }, [protocols, HOST_IP, HTTPS_PORT], { timeout: 60_000, interval: 500, what: `participant ${i + 1} relayed by ${protocols.join('/')} on port ${HTTPS_PORT}` });
    } catch (e) {
      throw new Error(`${/** @type {Error} */ (e).message}\nselected pairs: ${JSON.stringify(await selected(p.page))}\n` +
        `candidate pairs:\n${await pairs(p.page).catch((err) => String(err))}\n` +
        `outside's candidate pairs:\n${await pairs(people[3].page).catch((err) => String(err))}`);
    }
  }
  return pages;
}

/** The count of one label value of a metric. @param {Map<string, number>} m @param {string} name @param {string} label @param {string} value */
const series = (m, name, label, value) => m.get(`${name}{${label}="${value}"}`) ?? 0;

/** @param {Participant[]} people */
async function leave(people) {
  for (const p of people) {
    if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
    await p.context.close().catch(() => {});
  }
}

/**
 * Runs /check behind the firewall; returns each line's status, and the summary.
 * @returns {Promise<{status: Record<string, string>, summary: string}>}
 */
async function checkPage() {
  const { page, context } = await newPage(inside, 'chromium', { viewport: { width: 900, height: 1100 } });
  try {
    await page.goto(`${server.url}/check`);
    await waitFor(page, () => document.body.dataset.done === 'true', null, { timeout: 60_000, what: 'every check to finish' });
    const status = await page.$$eval('[data-check]', (els) => Object.fromEntries(els.map((e) => [e.getAttribute('data-check'), e.getAttribute('data-status')])));
    return { status: /** @type {Record<string, string>} */ (status), summary: (await text(page, '#summary')) || '' };
  } finally {
    await context.close();
  }
}

test('check page where only HTTPS gets through: the HTTPS-port lines work, the others are blocked, and the summary says so', T, async () => {
  net.firewall({ server: HOST_IP, httpsPort: HTTPS_PORT });
  const { status, summary } = await checkPage();
  assert.deepEqual(status, {
    media: 'ok', signaling: 'ok', stun: 'bad', turnUdp: 'bad', turnUdpHttps: 'bad', turnTcp: 'bad', turnTcpHttps: 'ok', turnTlsHttps: 'ok',
  });
  assert.match(summary, /Only the HTTPS port gets through your network/);
  assert.match(summary, /over TCP \/ TLS on the HTTPS port/);
});

for (const room of firewallRooms()) {
  test(`only HTTPS gets through, ${room.label} room (${room.kinds.join(', ')}): three behind the firewall and one outside decode each other, relayed over TLS or TCP on the HTTPS port`, T, async (t) => {
    net.firewall({ server: HOST_IP, httpsPort: HTTPS_PORT });
    const m0 = await server.metrics();
    /** @type {Participant[]} */
    const people = [];
    try {
      const pages = await call(`only-https-${room.label}`, room.kinds, ['tls', 'tcp'], people);
      const m1 = await server.metrics();
      /** @type {Record<string, number>} */
      const used = { tls: 0, tcp: 0 };
      for (const page of pages.slice(0, 3)) {
        const sel = await selected(page);
        t.diagnostic(`behind the firewall: ${JSON.stringify(Object.values(sel))}`);
        for (const s of Object.values(sel)) {
          assert.ok(onHttpsPort(s, ['tls', 'tcp']), JSON.stringify(s));
          used[/** @type {{relayProtocol: string}} */ (s).relayProtocol] += 1;
        }
      }
      const rose = (/** @type {string} */ kind) => series(m1, SHARED, 'kind', kind) - series(m0, SHARED, 'kind', kind);
      const drops = net.dropped();
      t.diagnostic(`HTTPS port connections: turn-tls +${rose('turn-tls')}, turn-tcp +${rose('turn-tcp')}, http +${rose('http')}; ` +
        `firewall dropped ${JSON.stringify(drops)}`);
      // Each participant's connections ride its own TURN connections on the HTTPS port:
      // the selected kinds must have been counted there.
      for (const proto of ['tls', 'tcp']) {
        if (used[proto]) assert.ok(rose(`turn-${proto}`) >= 1, `${used[proto]} pairs relayed over ${proto}, but no turn-${proto} connection on the HTTPS port`);
      }
      // The browsers tried the other ways in (UDP to 3478 and to the HTTPS port) and the
      // firewall stopped them.
      assert.ok(drops.udp > 0, `no UDP dropped: ${JSON.stringify(drops)}`);
    } finally {
      await leave(people);
    }
  });
}

test('check page where UDP to the HTTPS port gets through too: that line works as well', T, async () => {
  net.firewall({ server: HOST_IP, httpsPort: HTTPS_PORT, udp: true });
  const { status, summary } = await checkPage();
  assert.deepEqual(status, {
    media: 'ok', signaling: 'ok', stun: 'bad', turnUdp: 'bad', turnUdpHttps: 'ok', turnTcp: 'bad', turnTcpHttps: 'ok', turnTlsHttps: 'ok',
  });
  assert.match(summary, /UDP gets through your network only to the HTTPS port number/);
});

// Each participant behind the firewall relays over UDP on the HTTPS port, and every
// pair of theirs is relayed on that port. A pair may still end on TCP there: Chromium
// sometimes nominates the pair of its TCP relay candidate when that one was gathered
// first and keeps it (seen in about half the runs of the Chromium room, for the pair to
// the participant outside); which pair the browser selects is its choice, so the test
// counts such pairs and prints them rather than failing on them.
for (const room of firewallRooms()) {
  test(`UDP to the HTTPS port gets through too, ${room.label} room (${room.kinds.join(', ')}): relayed over UDP on that port`, T, async (t) => {
    net.firewall({ server: HOST_IP, httpsPort: HTTPS_PORT, udp: true });
    const m0 = await server.metrics();
    /** @type {Participant[]} */
    const people = [];
    try {
      const pages = await call(`https-and-udp-${room.label}`, room.kinds, ['udp', 'tcp', 'tls'], people);
      // Each one relays over UDP on the HTTPS port (its pairs settle in the meantime).
      for (const [i, page] of pages.slice(0, 3).entries()) {
        // The client's own reading of each selected pair (`path` in meshmeet.stats()).
        // (And every connection with a selected pair: one that a busy machine made
        // restart has none for a moment.)
        await waitFor(page, async () => {
          const all = Object.values(await /** @type {any} */ (window).meshmeet.stats());
          return all.length === 3 && all.every((/** @type {any} */ p) => p.path) &&
            all.some((/** @type {any} */ p) => p.path.local === 'relay' && p.path.relayProtocol === 'udp');
        }, null, { timeout: 60_000, interval: 500, what: `participant ${i + 1} relayed over UDP` }).catch(async (e) => {
          throw new Error(`${e.message}\ncandidate pairs:\n${await pairs(page).catch((err) => String(err))}`);
        });
      }
      const m1 = await server.metrics();
      let onUdp = 0;
      for (const page of pages.slice(0, 3)) {
        const sel = await selected(page);
        t.diagnostic(`behind the firewall: ${JSON.stringify(Object.values(sel))}`);
        for (const s of Object.values(sel)) {
          assert.ok(onHttpsPort(s, ['udp', 'tcp', 'tls']), JSON.stringify(s));
          if (/** @type {{relayProtocol: string}} */ (s).relayProtocol === 'udp') onUdp += 1;
        }
      }
      const udp = series(m1, CREATED, 'transport', 'udp') - series(m0, CREATED, 'transport', 'udp');
      const drops = net.dropped();
      const relay = [...m1].filter(([k, v]) => /^meshmeet_turn_(allocations_refused|dropped_packets|peer_denied|auth_failures)/.test(k) && v !== (m0.get(k) ?? 0))
        .map(([k, v]) => `${k} +${v - (m0.get(k) ?? 0)}`);
      t.diagnostic(`pairs on UDP ${onUdp} of 9; UDP allocations +${udp}; firewall dropped ${JSON.stringify(drops)}; relay: ${relay.join(', ') || 'no refusals or drops'}`);
      // At least one UDP allocation per connection behind the firewall.
      assert.ok(udp >= 9, `UDP allocations created: ${udp}`);
      // UDP to 3478 (the main TURN URL) stayed blocked.
      assert.ok(drops.udp > 0, `no UDP dropped: ${JSON.stringify(drops)}`);
    } finally {
      await leave(people);
    }
  });
}
