// Landing page, preview, language, password prompt, receive-only join when the
// camera and microphone are denied, and the unreachable-server screen (Chromium).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Server, Browsers, newPage, waitFor, waitForMedia, ensureArtifacts, text, attr, fill } from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */

/** @type {Server} */ let server;
const T = { timeout: 120_000 };
/** @type {Browsers} */ let browsers;
const PASSWORD = 'open sesame 42';

before(async () => {
  server = await new Server({ password: PASSWORD, label: 'pages' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

/** A fresh Chromium context; `locale` sets the browser's languages as a user's would. */
async function chromiumPage(locale = 'en-US') {
  const p = await newPage(browsers, 'chromium', { viewport: { width: 1100, height: 700 } });
  if (locale !== 'en-US') {
    const cdp = await p.page.createCDPSession();
    const userAgent = await (await browsers.get('chromium')).userAgent();
    await cdp.send('Network.setUserAgentOverride', { userAgent, acceptLanguage: locale });
    await cdp.send('Emulation.setLocaleOverride', { locale });
  }
  return p;
}

/** @param {Page} page @param {string} selector */
const visible = async (page, selector) => !!(await (await page.$(selector))?.isVisible());
/** @param {Page} page @param {string} selector */
const disabled = (page, selector) => page.$eval(selector, (el) => /** @type {HTMLInputElement} */ (el).disabled);
/** @param {Page} page */
const ready = (page) => waitFor(page, () => document.body.dataset.ready === 'true', null, { timeout: 40000, what: 'the preview' });
/** Clicks, and waits for the navigation the click starts. @param {Page} page @param {string} selector */
const clickAndNavigate = (page, selector) => Promise.all([page.waitForNavigation(), page.click(selector)]);

test('landing page starts a new room with a readable name, and joins one by name', T, async () => {
  const { context, page } = await chromiumPage();
  await page.goto(`${server.url}/`);
  await page.screenshot({ path: join(ensureArtifacts(), 'landing.png') });
  await clickAndNavigate(page, '#new-room');
  assert.match(new URL(page.url()).pathname, /^\/[a-z]+-[a-z]+-\d{3}$/);
  await page.waitForSelector('#join-btn');
  await page.goto(`${server.url}/`);
  await fill(page, '#room', 'bad name!');
  await page.click('.join-row button');
  assert.equal(await visible(page, '#room-error'), true);
  await fill(page, '#room', 'Design-Review');
  await clickAndNavigate(page, '.join-row button');
  assert.equal(new URL(page.url()).pathname, '/Design-Review');
  await context.close();
});

test('preview: Join button, device pickers, remembered name, Korean text', T, async () => {
  const { context, page } = await chromiumPage();
  await page.goto(`${server.url}/preview-room`);
  await ready(page);
  assert.equal((await text(page, '#join-btn'))?.trim(), 'Join');
  assert.ok((await page.$$('#cam-select option')).length >= 1);
  assert.equal(await disabled(page, '#cam-select'), false);
  assert.equal(await attr(page, '#pv-mic', 'aria-label'), 'Mute microphone (M)');
  await fill(page, '#name', 'Remembered Name');
  await page.screenshot({ path: join(ensureArtifacts(), 'preview.png') });
  // Camera off in the preview stays off after joining (password prompt on the way).
  await page.click('#pv-cam');
  await page.click('#join-btn');
  await page.waitForSelector('#pw-form:not([hidden])', { visible: true });
  assert.equal(await text(page, '#screen-title'), 'This room needs a password');
  await fill(page, '#pw-input', 'wrong');
  await page.click('#pw-form button');
  await waitFor(page, () => document.getElementById('screen-text')?.textContent === 'Wrong password. Try again.', null, { what: 'the wrong-password note' });
  await fill(page, '#pw-input', PASSWORD);
  await page.click('#pw-form button');
  await waitFor(page, () => /** @type {any} */ (window).meshmeet.inCall, null, { what: 'the call' });
  assert.equal(await attr(page, '#btn-cam', 'aria-pressed'), 'true');
  assert.equal(await attr(page, '#btn-mic', 'aria-pressed'), 'false');
  await page.click('#btn-leave');
  await page.goto(`${server.url}/preview-room`);
  assert.equal(await page.$eval('#name', (el) => /** @type {HTMLInputElement} */ (el).value), 'Remembered Name');
  await context.close();

  const ko = await chromiumPage('ko-KR');
  await ko.page.goto(`${server.url}/preview-room`);
  await ready(ko.page);
  assert.equal((await text(ko.page, '#join-btn'))?.trim(), '참가');
  assert.equal(await attr(ko.page, 'html', 'lang'), 'ko');
  await ko.context.close();
});

test('camera and microphone denied: join receive-only and still see the others', T, async () => {
  const room = `${server.url}/receive-only`;
  const sender = await chromiumPage();
  await sender.page.goto(room);
  await ready(sender.page);
  await fill(sender.page, '#name', 'Sender');
  await sender.page.click('#join-btn');
  await sender.page.waitForSelector('#pw-input', { visible: true });
  await fill(sender.page, '#pw-input', PASSWORD);
  await sender.page.click('#pw-form button');

  const viewer = await chromiumPage();
  await viewer.page.evaluateOnNewDocument(() => {
    navigator.mediaDevices.getUserMedia = async () => { throw new DOMException('Permission denied', 'NotAllowedError'); };
  });
  await viewer.page.goto(room);
  await ready(viewer.page);
  assert.match(await text(viewer.page, '#device-note') || '', /blocked/);
  assert.equal(await disabled(viewer.page, '#pv-cam'), true);
  await fill(viewer.page, '#name', 'Viewer');
  await viewer.page.click('#join-btn');
  await viewer.page.waitForSelector('#pw-input', { visible: true });
  await fill(viewer.page, '#pw-input', PASSWORD);
  await viewer.page.click('#pw-form button');
  // The viewer decodes the sender's video and audio.
  await waitForMedia([viewer.page], 2, 60_000);
  // The sender sees the viewer as connected, with no camera and no microphone.
  await waitFor(sender.page, () => {
    const el = document.querySelector('.tile:not(.self)');
    return !!el && el.classList.contains('no-video') && el.classList.contains('is-muted') &&
      (el.getAttribute('data-state') === 'direct');
  }, null, { timeout: 30_000, what: 'the viewer tile: connected, no camera, no microphone' });
  await viewer.context.close();
  await sender.context.close();
});

test('server unreachable: a clear screen with a retry button', T, async () => {
  const { context, page } = await chromiumPage();
  await page.evaluateOnNewDocument(() => {
    const Real = WebSocket;
    // A path where the server speaks no WebSocket: every attempt fails.
    /** @type {any} */ (window).WebSocket = class extends Real {
      constructor(/** @type {string} */ url, /** @type {any} */ p) { super(url.replace(/\/ws$/, '/no-signaling-here'), p); }
    };
  });
  await page.goto(`${server.url}/lonely-room`);
  await page.waitForSelector('#screen:not([hidden])', { visible: true, timeout: 15000 });
  assert.equal(await text(page, '#screen-title'), 'Cannot reach the server');
  assert.equal(await visible(page, '#screen-actions button'), true);
  await context.close();
});
