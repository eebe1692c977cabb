// The diagnostics page at /check reports STUN and TURN over UDP and TCP on the TURN
// port, and TURN over TCP and TLS on the HTTPS port, as working against the embedded
// server (Chromium), in English and in Korean. (The same page behind a firewall that
// lets out only HTTPS: tests/oneport.test.js.)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Server, Browsers, newPage, waitFor, ensureArtifacts, text } from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */

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

/**
 * Runs the check in `page`; returns each line's status and text.
 * @param {Page} page
 * @returns {Promise<Record<string, {status: string, text: string}>>}
 */
async function runCheck(page) {
  await page.goto(`${server.url}/check`);
  await waitFor(page, () => document.body.dataset.done === 'true', null, { timeout: 40000, what: 'every check to finish' });
  return page.$$eval('[data-check]', (els) => Object.fromEntries(els.map((e) => [
    e.getAttribute('data-check'), { status: e.getAttribute('data-status') || '', text: e.textContent || '' }])));
}

test('check page: camera, microphone, signaling, STUN, and TURN over UDP, TCP, and TCP and TLS on the HTTPS port all work', T, async () => {
  const { context, page } = await newPage(browsers, 'chromium', { viewport: { width: 900, height: 1100 } });
  const lines = await runCheck(page);
  await page.screenshot({ path: join(ensureArtifacts(), 'check.png') });
  assert.deepEqual(Object.fromEntries(Object.entries(lines).map(([k, v]) => [k, v.status])), {
    media: 'ok', signaling: 'ok', stun: 'ok', turnUdp: 'ok', turnTcp: 'ok', turnTcpHttps: 'ok', turnTlsHttps: 'ok',
  });
  // Each relay line names the relay address it got and the server port it used.
  for (const [key, port] of [['turnUdp', 3478], ['turnTcp', 3478], ['turnTcpHttps', 8443], ['turnTlsHttps', 8443]]) {
    assert.match(lines[key].text, new RegExp(`Relay address 10\\.213\\.0\\.1:\\d+ \\(server port ${port}\\)`), key);
  }
  assert.match(lines.turnTcpHttps.text, /^Relay over TCP on the HTTPS port \(TURN\): Works.*Works even where only HTTPS is allowed\./);
  assert.match(lines.turnTlsHttps.text, /^Relay over TLS on the HTTPS port \(TURNS\): Works.*Works even where only HTTPS is allowed\./);
  assert.doesNotMatch(lines.turnUdp.text, /only HTTPS/);
  assert.match(await text(page, '#summary') || '', /Everything works/);
  await context.close();
});

test('check page in Korean: the lines for the HTTPS port', T, async () => {
  const { context, page } = await newPage(browsers, 'chromium');
  const cdp = await page.createCDPSession();
  const userAgent = await (await browsers.get('chromium')).userAgent();
  await cdp.send('Network.setUserAgentOverride', { userAgent, acceptLanguage: 'ko-KR' });
  await cdp.send('Emulation.setLocaleOverride', { locale: 'ko-KR' });
  const lines = await runCheck(page);
  assert.match(lines.turnTcpHttps.text, /^HTTPS 포트의 TCP 릴레이 \(TURN\): 정상.*HTTPS만 허용되는 곳에서도 동작합니다\./);
  assert.match(lines.turnTlsHttps.text, /^HTTPS 포트의 TLS 릴레이 \(TURNS\): 정상.*HTTPS만 허용되는 곳에서도 동작합니다\./);
  assert.match(await text(page, '#summary') || '', /모두 정상입니다/);
  await context.close();
});
