// Calm recovery: a four-way mixed call (Firefox, Chromium, Firefox, Chromium) with a
// CPU hog (stress-ng, two workers) beside it for 60 s. Blips (a connection briefly
// `disconnected` when a consent check is answered late) recover by themselves; the
// call ends with every connection connected and no tile left on "failed". How long
// the blips lasted and how many ICE restarts were made is reported.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { Server, Browsers, participant, waitForMedia, waitFor, dishonestTiles } from '../lib/harness.js';

/** @type {Server} */ let server;
/** @type {Browsers} */ let browsers;
const KINDS = /** @type {const} */ (['firefox', 'chromium', 'firefox', 'chromium']);
const LOAD_S = 60;

before(async () => {
  server = await new Server({ capacity: 4, label: 'load' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

/** Runs stress-ng for `seconds` with two CPU workers; resolves when it has ended. */
function cpuHog(seconds) {
  const proc = spawn('stress-ng', ['--cpu', '2', '--timeout', `${seconds}s`, '--quiet'], { stdio: 'ignore' });
  const reap = () => { if (proc.exitCode === null) proc.kill('SIGKILL'); };
  process.once('exit', reap);
  return new Promise((resolve, reject) => {
    proc.on('error', reject);
    proc.on('exit', (code) => {
      process.off('exit', reap);
      if (code === 0) resolve(undefined);
      else reject(new Error(`stress-ng exited with ${code}`));
    });
  });
}

test(`a mixed four-way call under ${LOAD_S} s of CPU load ends with every connection connected`, { timeout: 400_000 }, async (t) => {
  /** @type {import('../lib/harness.js').Participant[]} */
  const people = [];
  try {
    for (const [i, kind] of KINDS.entries()) {
      people.push(await participant(browsers, kind, `${server.url}/under-load`, `Load ${i + 1}`));
    }
    const pages = people.map((p) => p.page);
    await waitForMedia(pages, 4, 120_000);
    const started = Date.now();
    await cpuHog(LOAD_S);
    t.diagnostic(`load ran ${Math.round((Date.now() - started) / 1000)} s`);
    // Afterwards: every connection connected again, media flowing, no tile on "failed".
    for (const page of pages) {
      await waitFor(page, () => {
        const mm = /** @type {any} */ (window).meshmeet;
        return mm.peers.size === 3 && Array.from(mm.peers.values()).every((/** @type {any} */ p) =>
          p.pc.connectionState === 'connected' &&
          document.querySelector(`.tile[data-key="${p.id}"]`)?.getAttribute('data-state') !== 'failed');
      }, null, { timeout: 60_000, interval: 250, what: 'every connection connected, no failed tile' });
    }
    await waitForMedia(pages, 4, 120_000);
    for (const [i, page] of pages.entries()) {
      const st = await page.evaluate(() => /** @type {Promise<Record<string, any>>} */ (/** @type {any} */ (window).meshmeet.stats()));
      const blips = Object.values(st).flatMap((p) => p.blips);
      const restarts = Object.values(st).reduce((a, p) => a + p.restarts, 0);
      t.diagnostic(`${people[i].name} (${KINDS[i]}): ${blips.length} disconnected spells ` +
        `[${blips.map((ms) => (ms / 1000).toFixed(1)).join(', ')}] s, ${restarts} ICE restarts`);
      for (const p of Object.values(st)) {
        assert.equal(p.connectionState, 'connected');
        assert.notEqual(p.state, 'failed');
      }
      assert.deepEqual(await dishonestTiles(page), []);
    }
  } finally {
    for (const p of people) {
      if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
      await p.context.close().catch(() => {});
    }
  }
});
