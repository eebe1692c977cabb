// Four participants with ice.force_relay = true, in an all-Chromium, an all-Firefox
// and a mixed room: every selected candidate pair is relayed through meshmeet's own
// TURN server, media flows, and the tiles say so.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, Browsers, rooms, participant, waitForMedia, waitFor, HOST_IP } from '../lib/harness.js';

/** @type {Server} */ let server;
/** @type {Browsers} */ let browsers;

before(async () => {
  server = await new Server({ forceRelay: true }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

for (const room of rooms()) {
  test(`forced relay, ${room.label} room (${room.kinds.join(', ')}): all media through the embedded TURN server`, { timeout: 240_000 }, async () => {
    /** @type {import('../lib/harness.js').Participant[]} */
    const people = [];
    try {
      for (const [i, kind] of room.kinds.entries()) {
        people.push(await participant(browsers, kind, `${server.url}/relayed-${room.label}`, `Relay ${i + 1}`));
      }
      const pages = people.map((p) => p.page);
      await waitForMedia(pages, 4, 120_000);
      for (const page of pages) {
        const ice = await page.evaluate(() => {
          const pc = /** @type {any} */ (window).meshmeet.peers.values().next().value.pc;
          return /** @type {RTCConfiguration} */ (pc.getConfiguration());
        });
        assert.equal(ice.iceTransportPolicy, 'relay');
        for (const s of ice.iceServers || []) {
          for (const u of [s.urls].flat()) assert.ok(String(u).includes(HOST_IP), `only meshmeet's own servers: ${u}`);
        }
        const stats = await page.evaluate(() => /** @type {Promise<Record<string, any>>} */ (/** @type {any} */ (window).meshmeet.stats()));
        assert.equal(Object.keys(stats).length, 3);
        for (const peer of Object.values(stats)) {
          assert.equal(peer.path?.local, 'relay', JSON.stringify(peer.path));
          assert.equal(peer.path.remote, 'relay', JSON.stringify(peer.path));
          assert.equal(peer.path.localAddress, HOST_IP);
        }
        // The tile follows the selected pair (read every few seconds).
        await waitFor(page, async () => {
          const st = await /** @type {any} */ (window).meshmeet.stats();
          return Object.values(st).every((/** @type {any} */ p) => p.state === 'relay') &&
            Array.from(document.querySelectorAll('.tile:not(.self)')).every((t) => t.getAttribute('data-state') === 'relay');
        }, null, { timeout: 30_000, interval: 250, what: 'every tile saying "via relay"' });
      }
    } finally {
      for (const p of people) {
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
    }
  });
}
