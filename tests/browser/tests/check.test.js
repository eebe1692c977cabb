// The diagnostics page at /check reports STUN, TURN/UDP, TURN/TCP and TURN/TLS as
// working against the embedded server (Chromium).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Server, Browsers, newPage, waitFor, ensureArtifacts, text } from '../lib/harness.js';

/** @type {Server} */ let server;
const T = { timeout: 120_000 };
/** @type {Browsers} */ let browsers;

before(async () => {
  server = await new Server({ label: 'check' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

test('check page: camera, microphone, signaling, STUN and TURN over UDP, TCP and TLS all work', T, async () => {
  const { context, page } = await newPage(browsers, 'chromium', { viewport: { width: 900, height: 900 } });
  await page.goto(`${server.url}/check`);
  await waitFor(page, () => document.body.dataset.done === 'true', null, { timeout: 40000, what: 'every check to finish' });
  const status = await page.$$eval('[data-check]', (els) => Object.fromEntries(els.map((e) => [e.getAttribute('data-check'), e.getAttribute('data-status')])));
  await page.screenshot({ path: join(ensureArtifacts(), 'check.png') });
  assert.deepEqual(status, { media: 'ok', signaling: 'ok', stun: 'ok', turnUdp: 'ok', turnTcp: 'ok', turnTls: 'ok' });
  const details = await page.$$eval('[data-check^="turn"]', (els) => els.map((e) => e.textContent));
  for (const d of details) assert.match(d || '', /10\.213\.0\.1/);
  assert.match(await text(page, '#summary') || '', /Everything works/);
  await context.close();
});
