// Landing page, preview, language, password prompt, receive-only join when the
// camera and microphone are denied, and the unreachable-server screen.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Netns, Server, launchBrowser, pollPage, ensureArtifacts } from '../lib/harness.js';

/** @type {Netns} */ let ns;
/** @type {Server} */ let server;
/** @type {Awaited<ReturnType<typeof launchBrowser>>} */ let chrome;
const PASSWORD = 'open sesame 42';

before(async () => {
  ns = new Netns();
  server = await new Server(ns, { password: PASSWORD }).start();
  chrome = await launchBrowser(ns);
});

after(async () => {
  await chrome?.close();
  await server?.stop();
  ns?.destroy();
});

/** @param {string} [locale] */
async function newPage(locale = 'en-US') {
  const context = await chrome.browser.newContext({ ignoreHTTPSErrors: true, locale, viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  return { context, page };
}

test('landing page starts a new room with a readable name, and joins one by name', async () => {
  const { context, page } = await newPage();
  await page.goto(`${server.url}/`);
  await page.screenshot({ path: join(ensureArtifacts(), 'landing.png') });
  await page.click('#new-room');
  await page.waitForURL(/\/[a-z]+-[a-z]+-\d{3}$/);
  await page.waitForSelector('#join-btn');
  await page.goto(`${server.url}/`);
  await page.fill('#room', 'bad name!');
  await page.click('.join-row button');
  assert.equal(await page.isVisible('#room-error'), true);
  await page.fill('#room', 'Design-Review');
  await page.click('.join-row button');
  await page.waitForURL(/\/Design-Review$/);
  await context.close();
});

test('preview: Join button, device pickers, remembered name, Korean text', async () => {
  const { context, page } = await newPage();
  await page.goto(`${server.url}/preview-room`);
  await page.waitForFunction(() => document.body.dataset.ready === 'true');
  assert.equal((await page.textContent('#join-btn'))?.trim(), 'Join');
  assert.ok((await page.$$('#cam-select option')).length >= 1);
  assert.equal(await page.isDisabled('#cam-select'), false);
  assert.equal(await page.getAttribute('#pv-mic', 'aria-label'), 'Mute microphone (M)');
  await page.fill('#name', 'Remembered Name');
  await page.screenshot({ path: join(ensureArtifacts(), 'preview.png') });
  // Camera off in the preview stays off after joining (password prompt on the way).
  await page.click('#pv-cam');
  await page.click('#join-btn');
  await page.waitForSelector('#pw-form:not([hidden])');
  assert.equal(await page.textContent('#screen-title'), 'This room needs a password');
  await page.fill('#pw-input', 'wrong');
  await page.click('#pw-form button');
  await page.waitForFunction(() => document.getElementById('screen-text')?.textContent === 'Wrong password. Try again.');
  await page.fill('#pw-input', PASSWORD);
  await page.click('#pw-form button');
  await page.waitForFunction(() => /** @type {any} */ (window).meshmeet.inCall);
  assert.equal(await page.getAttribute('#btn-cam', 'aria-pressed'), 'true');
  assert.equal(await page.getAttribute('#btn-mic', 'aria-pressed'), 'false');
  await page.click('#btn-leave');
  await page.goto(`${server.url}/preview-room`);
  assert.equal(await page.inputValue('#name'), 'Remembered Name');
  await context.close();

  const ko = await newPage('ko-KR');
  await ko.page.goto(`${server.url}/preview-room`);
  await ko.page.waitForFunction(() => document.body.dataset.ready === 'true');
  assert.equal((await ko.page.textContent('#join-btn'))?.trim(), '참가');
  assert.equal(await ko.page.getAttribute('html', 'lang'), 'ko');
  await ko.context.close();
});

test('camera and microphone denied: join receive-only and still see the others', async () => {
  const room = `${server.url}/receive-only`;
  const sender = await newPage();
  await sender.page.goto(room);
  await sender.page.waitForFunction(() => document.body.dataset.ready === 'true');
  await sender.page.fill('#name', 'Sender');
  await sender.page.click('#join-btn');
  await sender.page.fill('#pw-input', PASSWORD);
  await sender.page.click('#pw-form button');

  const viewer = await newPage();
  await viewer.page.addInitScript(() => {
    navigator.mediaDevices.getUserMedia = async () => { throw new DOMException('Permission denied', 'NotAllowedError'); };
  });
  await viewer.page.goto(room);
  await viewer.page.waitForFunction(() => document.body.dataset.ready === 'true');
  assert.match(await viewer.page.textContent('#device-note') || '', /blocked/);
  assert.equal(await viewer.page.isDisabled('#pv-cam'), true);
  await viewer.page.fill('#name', 'Viewer');
  await viewer.page.click('#join-btn');
  await viewer.page.fill('#pw-input', PASSWORD);
  await viewer.page.click('#pw-form button');
  // The viewer decodes the sender's video and audio.
  await pollPage(viewer.page, async () => {
    const mm = /** @type {any} */ (window).meshmeet;
    if (!mm.inCall || mm.peers.size !== 1) return false;
    const a = Object.values(await mm.stats())[0];
    await new Promise((r) => setTimeout(r, 500));
    const b = Object.values(await mm.stats())[0];
    return b.framesDecoded > a.framesDecoded && b.audioPackets > a.audioPackets;
  }, null, { timeout: 30000, what: 'media from the sender' });
  // The sender sees the viewer as connected, with no camera and no microphone.
  await sender.page.waitForFunction(() => {
    const el = document.querySelector('.tile:not(.self)');
    return !!el && el.classList.contains('no-video') && el.classList.contains('is-muted') &&
      (el.getAttribute('data-state') === 'direct');
  }, null, { timeout: 15000 });
  await viewer.context.close();
  await sender.context.close();
});

test('server unreachable: a clear screen with a retry button', async () => {
  const { context, page } = await newPage();
  await page.addInitScript(() => {
    const Real = WebSocket;
    // A path where the server speaks no WebSocket: every attempt fails.
    /** @type {any} */ (window).WebSocket = class extends Real {
      constructor(/** @type {string} */ url, /** @type {any} */ p) { super(url.replace(/\/ws$/, '/no-signaling-here'), p); }
    };
  });
  await page.goto(`${server.url}/lonely-room`);
  await page.waitForSelector('#screen:not([hidden])', { timeout: 15000 });
  assert.equal(await page.textContent('#screen-title'), 'Cannot reach the server');
  assert.equal(await page.isVisible('#screen-actions button'), true);
  await context.close();
});
