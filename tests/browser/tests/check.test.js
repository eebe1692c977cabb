// The diagnostics page at /check reports STUN, TURN/UDP, TURN/TCP and TURN/TLS as
// working against the embedded server.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Netns, Server, launchBrowser, ensureArtifacts } from '../lib/harness.js';

/** @type {Netns} */ let ns;
/** @type {Server} */ let server;
/** @type {Awaited<ReturnType<typeof launchBrowser>>} */ let chrome;

before(async () => {
  ns = new Netns();
  server = await new Server(ns).start();
  chrome = await launchBrowser(ns);
});

after(async () => {
  await chrome?.close();
  await server?.stop();
  ns?.destroy();
});

test('check page: camera, microphone, signaling, STUN and TURN over UDP, TCP and TLS all work', async () => {
  const context = await chrome.browser.newContext({ ignoreHTTPSErrors: true, locale: 'en-US', viewport: { width: 900, height: 900 } });
  const page = await context.newPage();
  await page.goto(`${server.url}/check`);
  await page.waitForFunction(() => document.body.dataset.done === 'true', null, { timeout: 40000 });
  const status = await page.$$eval('[data-check]', (els) => Object.fromEntries(els.map((e) => [e.getAttribute('data-check'), e.getAttribute('data-status')])));
  await page.screenshot({ path: join(ensureArtifacts(), 'check.png') });
  assert.deepEqual(status, { media: 'ok', signaling: 'ok', stun: 'ok', turnUdp: 'ok', turnTcp: 'ok', turnTls: 'ok' });
  const details = await page.$$eval('[data-check^="turn"]', (els) => els.map((e) => e.textContent));
  for (const d of details) assert.match(d || '', /10\.213\.0\.1/);
  assert.match(await page.textContent('#summary') || '', /Everything works/);
  await context.close();
});
