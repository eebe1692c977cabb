// Four participants with ice.force_relay = true, in an all-Chromium, an all-Firefox
// and a mixed room: every selected candidate pair is relayed through meshmeet's own
// TURN server, media flows, and the tiles say so (never "direct"). The rooms hold four
// (rooms.capacity = 4), so the derived per-user allocation quota is the tightest the
// default gives: (4 - 1) connections x 3 TURN URLs x 3 = 27. A newcomer to the full
// room makes one allocation per TURN URL per connection (max-bundle), none is refused
// (no 486), not even when it restarts ICE on all three connections at once.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  Server, Browsers, rooms, participant, joinAll, waitForMedia, waitFor, dishonestTiles, firstFrames, HOST_IP,
} from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */

/** @type {Server} */ let server;
/** @type {Browsers} */ let browsers;
/** TURN URLs the server hands out: UDP, TCP, TLS. */
const TURN_URLS = 3;
const CREATED = 'meshmeet_turn_allocations_created_total';
const REFUSED = 'meshmeet_turn_allocations_refused_total';

before(async () => {
  server = await new Server({ forceRelay: true, capacity: 4, label: 'relay' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

/**
 * The relay candidates a page's connections gathered (one per allocation it made):
 * distinct relayed addresses, per connection.
 * @param {Page} page
 * @returns {Promise<Record<string, string[]>>}
 */
const relayCandidates = (page) => page.evaluate(async () => {
  const mm = /** @type {any} */ (window).meshmeet;
  /** @type {Record<string, string[]>} */
  const out = {};
  for (const p of mm.peers.values()) {
    const seen = /** @type {any} */ (p).__relaySeen ||= new Set();
    (await p.pc.getStats()).forEach((/** @type {any} */ s) => {
      if (s.type === 'local-candidate' && s.candidateType === 'relay') {
        seen.add(`${s.relayProtocol}:${s.address || s.ip}:${s.port}`);
      }
    });
    out[p.id] = Array.from(seen);
  }
  return out;
});

/** Every connection of the page has finished gathering. @param {Page} page */
const gathered = (page) => waitFor(page, () => Array.from(/** @type {any} */ (window).meshmeet.peers.values())
  .every((/** @type {any} */ p) => p.pc.iceGatheringState === 'complete'), null,
{ timeout: 60_000, interval: 250, what: 'ICE gathering complete on every connection' });

for (const room of rooms()) {
  test(`forced relay, ${room.label} room (${room.kinds.join(', ')}): all media through the embedded TURN server, no allocation refused`, { timeout: 300_000 }, async (t) => {
    /** @type {import('../lib/harness.js').Participant[]} */
    const people = [];
    const url = `${server.url}/relayed-${room.label}`;
    try {
      // Three join one by one; then the newcomer's page loads and waits (a page that
      // has not joined has no peer connection, so it allocates nothing yet). It is
      // opened after the others: Firefox answers getUserMedia only in the window that
      // has the focus, so a Firefox page loading beside another may never get its
      // devices.
      const three = await joinAll(browsers, room.kinds.slice(0, 3), url, ['Relay 1', 'Relay 2', 'Relay 3']);
      const newcomer4 = await participant(browsers, room.kinds[3], url, 'Relay 4', { join: false });
      people.push(...three);
      await waitForMedia(people.map((p) => p.page), 3, 120_000);
      await Promise.all(people.map((p) => gathered(p.page)));
      // The newcomer to the (then full) room: what the server allocated for it and for
      // the three connections the others open to it.
      const m0 = await server.metrics();
      const refused0 = Server.total(m0, REFUSED);
      people.push(newcomer4);
      await newcomer4.page.click('#join-btn');
      const pages = people.map((p) => p.page);
      await waitForMedia(pages, 4, 120_000);
      t.diagnostic(`relay forced, ${(await firstFrames(pages)).text}`);
      await Promise.all(pages.map(gathered));
      const m1 = await server.metrics();
      const created = Server.total(m1, CREATED) - Server.total(m0, CREATED);
      const mine = await relayCandidates(pages[3]);
      const perConnection = Object.values(mine).map((l) => l.length);
      const newcomer = perConnection.reduce((a, b) => a + b, 0);
      const newcomerId = await pages[3].evaluate(() => /** @type {string} */ (/** @type {any} */ (window).meshmeet.id));
      let others = 0;
      for (const page of pages.slice(0, 3)) others += ((await relayCandidates(page))[newcomerId] || []).length;
      // ICE restarts during the join (a starved machine can fail a connection) gather
      // anew at both ends of a connection.
      let restarts = 0;
      for (const page of pages) {
        const st = await page.evaluate(() => /** @type {Promise<Record<string, any>>} */ (/** @type {any} */ (window).meshmeet.stats()));
        for (const [id, p] of Object.entries(st)) if (page === pages[3] || id === newcomerId) restarts += p.restarts;
      }
      t.diagnostic(`newcomer (${room.kinds[3]}): ${newcomer} relay candidates (${perConnection.join(' + ')}); ` +
        `the three others: ${others} for their connections to it; server: ${created} allocations created; ` +
        `${restarts} ICE restarts on the newcomer's connections`);
      // One allocation per TURN URL per connection: a transport per connection, not
      // one per media line. (Chromium lists every gathered candidate in getStats;
      // Firefox may list fewer, so the server's count bounds the whole.)
      assert.equal(perConnection.length, 3);
      // (An ICE restart gathers again: the candidates seen on a connection then span
      // its generations.)
      for (const n of perConnection) {
        assert.ok(n >= 1 && n <= TURN_URLS * (1 + restarts), `relay candidates per connection: ${perConnection}, ${restarts} restarts`);
      }
      if (room.kinds[3] === 'chromium' && restarts === 0) assert.deepEqual(perConnection, [3, 3, 3]);
      assert.ok(created >= newcomer + others, `server ${created} >= gathered ${newcomer + others}`);
      assert.ok(created <= TURN_URLS * (6 + 2 * restarts), `${created} allocations for six new connections and ${restarts} restarts`);
      assert.equal(Server.total(m1, REFUSED) - refused0, 0, 'no Allocate refused');

      // An ICE restart on all of the newcomer's connections at once allocates anew
      // while the old allocations are still held: still within the quota.
      await pages[3].evaluate(() => {
        for (const p of /** @type {any} */ (window).meshmeet.peers.values()) p.restartIce();
      });
      await waitFor(pages[3], () => Array.from(/** @type {any} */ (window).meshmeet.peers.values())
        .every((/** @type {any} */ p) => !p.restarting && p.pc.connectionState === 'connected' && p.pc.signalingState === 'stable'),
      null, { timeout: 60_000, interval: 250, what: 'the three restarts to complete' });
      await waitForMedia(pages, 4, 120_000);
      await Promise.all(pages.map(gathered));
      const m2 = await server.metrics();
      t.diagnostic(`after the restarts: ${Server.total(m2, CREATED) - Server.total(m1, CREATED)} more allocations`);
      assert.equal(Server.total(m2, REFUSED) - refused0, 0, 'no Allocate refused after the restarts');

      for (const page of pages) {
        const ice = await page.evaluate(() => {
          const pc = /** @type {any} */ (window).meshmeet.peers.values().next().value.pc;
          return /** @type {RTCConfiguration} */ (pc.getConfiguration());
        });
        assert.equal(ice.iceTransportPolicy, 'relay');
        assert.equal(ice.bundlePolicy, 'max-bundle');
        assert.equal(ice.rtcpMuxPolicy, 'require');
        for (const s of ice.iceServers || []) {
          for (const u of [s.urls].flat()) assert.ok(String(u).includes(HOST_IP), `only meshmeet's own servers: ${u}`);
        }
        const stats = await page.evaluate(() => /** @type {Promise<Record<string, any>>} */ (/** @type {any} */ (window).meshmeet.stats()));
        assert.equal(Object.keys(stats).length, 3);
        for (const peer of Object.values(stats)) {
          assert.equal(peer.path?.local, 'relay', JSON.stringify(peer.path));
          // The other side's relay candidate, or its relay address learned from a check
          // that came before the candidate did (peer-reflexive): with relay forced on
          // both sides there is no other address to come from.
          assert.ok(peer.path.remote === 'relay' || (peer.path.remote === 'prflx' && peer.path.remoteAddress === HOST_IP),
            JSON.stringify(peer.path));
          assert.equal(peer.path.localAddress, HOST_IP);
          assert.ok(['udp', 'tcp', 'tls'].includes(peer.path.relayProtocol), JSON.stringify(peer.path));
        }
        // The tile follows the selected pair, with the relay protocol.
        await waitFor(page, async () => {
          const st = await /** @type {any} */ (window).meshmeet.stats();
          return Object.values(st).every((/** @type {any} */ p) => p.state === 'relay' &&
            document.querySelector(`.tile[data-key="${p.id}"]`)?.getAttribute('data-relay-protocol') === p.path?.relayProtocol &&
            (document.querySelector(`.tile[data-key="${p.id}"] .tile-state`)?.textContent || '')
              .includes(`(${String(p.path?.relayProtocol).toUpperCase()})`));
        }, null, { timeout: 30_000, interval: 250, what: 'every tile saying "via relay (PROTOCOL)"' });
        // No tile ever said "direct" (or claimed a path while not connected).
        assert.deepEqual(await dishonestTiles(page, ['direct']), []);
      }
    } finally {
      for (const p of people) {
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
    }
  });
}
