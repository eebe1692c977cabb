// A server restart in the middle of a four-way call goes unnoticed: every participant
// resumes with the same id within a few seconds, no peer connection is recreated,
// nobody sees anyone leave, and video is decoded throughout. One room per kind in
// MESHMEET_ROOMS (default: all); run one with
// `MESHMEET_ROOMS=chromium node lib/netns.js node --test tests/restart.test.js`.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, Browsers, startXvfb, rooms, participant, waitForMedia, waitFor, describeCall } from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Participant} Participant */

/** @type {Server} */ let server;
/** @type {Awaited<ReturnType<typeof startXvfb>>} */ let xvfb;
/** @type {Browsers} */ let browsers;
const NAMES = ['Ada Lovelace', 'Grace Hopper', 'Alan Turing', 'Katherine Johnson'];
const T = { timeout: 240_000 };
/** How long a resume after the restart may take (the client retries after 0.3, 0.7,
 * 1.5 s ...; the server needs about a second to stop and start). */
const RESUME = 15_000;

before(async () => {
  server = await new Server({ capacity: 4, label: 'restart' }).start();
  xvfb = await startXvfb();
  browsers = new Browsers({ display: xvfb.display });
});

after(async () => {
  await browsers?.close();
  await xvfb?.stop();
  await server?.stop();
});

for (const room of rooms()) {
  describe(`${room.label} room (${room.kinds.join(', ')})`, () => {
    /** @type {Participant[]} */
    const people = [];

    after(async () => {
      for (const p of people) {
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
    });

    test('server restarted mid-call: same ids, same connections, media throughout', T, async () => {
      const url = `${server.url}/restart-${room.label}`;
      for (const [i, kind] of room.kinds.entries()) {
        people.push(await participant(browsers, kind, url, NAMES[i]));
      }
      const all = people.map((p) => p.page);
      await waitForMedia(all, 4, 120_000);
      // Each page: its id, the ids it sees, its peer connections (kept for comparison)
      // and its media counters.
      const before = await Promise.all(all.map((page) => page.evaluate(async () => {
        const mm = /** @type {any} */ (window).meshmeet;
        /** @type {any} */ (window).__pcs = Array.from(mm.peers.values()).map((p) => p.pc);
        /** @type {any} */ (window).__left = [];
        mm.signaling.handlers.onMessage = ((orig) => (/** @type {any} */ m) => {
          if (m.type === 'peer_left') /** @type {any} */ (window).__left.push(m.id);
          return orig(m);
        })(mm.signaling.handlers.onMessage);
        return { id: /** @type {string} */ (mm.id), peers: Array.from(mm.peers.keys()).sort(), stats: await mm.stats() };
      })));

      const t0 = Date.now();
      await server.restart();
      assert.match(server.stderr, /rooms restored/, 'the new process restored the rooms');

      // Every page resumes: joined again, same id, banner gone.
      await Promise.all(all.map((page, i) => waitFor(page, (id) => {
        const mm = /** @type {any} */ (window).meshmeet;
        return mm.signaling.joined && mm.id === id && document.getElementById('banner')?.hidden;
      }, before[i].id, { timeout: RESUME, interval: 100, what: `page ${i} to resume` })));
      const resumedIn = Date.now() - t0;
      console.log(`${room.label}: all four resumed ${resumedIn} ms after the restart began`);

      for (const [i, page] of all.entries()) {
        const now = await page.evaluate(() => {
          const w = /** @type {any} */ (window);
          const mm = w.meshmeet;
          const pcs = Array.from(mm.peers.values()).map((p) => p.pc);
          return {
            id: /** @type {string} */ (mm.id),
            peers: Array.from(mm.peers.keys()).sort(),
            samePcs: pcs.length === w.__pcs.length && pcs.every((pc, k) => pc === w.__pcs[k]),
            left: /** @type {string[]} */ (w.__left),
          };
        });
        assert.equal(now.id, before[i].id, `page ${i} kept its id`);
        assert.deepEqual(now.peers, before[i].peers, `page ${i} sees the same peers`);
        assert.ok(now.samePcs, `page ${i}: no peer connection recreated\n${await describeCall(page)}`);
        assert.deepEqual(now.left, [], `page ${i} saw nobody leave`);
      }
      // Media was decoded across the restart on the same connections, and still is.
      await Promise.all(all.map((page, i) => waitFor(page, async (base) => {
        const st = await /** @type {any} */ (window).meshmeet.stats();
        return Object.keys(base).every((id) => st[id] && st[id].serial === base[id].serial &&
          st[id].framesDecoded > base[id].framesDecoded);
      }, before[i].stats, { timeout: 30_000, interval: 250, what: `media on page ${i} across the restart` })));
      await waitForMedia(all, 4, 60_000);
    });
  });
}
