// Test harness: the real meshmeet server, Xvfb, and real browsers (Chromium and
// Firefox, both driven by puppeteer-core: Chromium over CDP, Firefox over WebDriver
// BiDi), all inside the private network namespace that lib/netns.js creates and
// runs the test runner in (`npm test` does that).
//
// One browser process per kind and test file; one isolated browser context (a BiDi
// user context in Firefox) per participant, each with its own storage and its own
// fake camera and microphone.

import { spawn } from 'node:child_process';
import { request } from 'node:https';
import { mkdtempSync, writeFileSync, rmSync, mkdirSync } from 'node:fs';
import { networkInterfaces, tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import { HOST_IP } from './netns.js';

export { HOST_IP };

/** @typedef {import('puppeteer-core').Browser} Browser */
/** @typedef {import('puppeteer-core').BrowserContext} BrowserContext */
/** @typedef {import('puppeteer-core').Page} Page */
/** @typedef {'chromium'|'firefox'} Kind */

const here = dirname(fileURLToPath(import.meta.url));
export const ARTIFACTS = join(here, '..', 'artifacts');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const FIREFOX = process.env.FIREFOX_BIN || '/usr/bin/firefox-esr';

/** Throws unless this process runs in the test namespace (see lib/netns.js). */
export function requireNetns() {
  const mine = Object.values(networkInterfaces()).flat().some((a) => a?.address === HOST_IP);
  if (!process.env.MESHMEET_NETNS || !mine) {
    throw new Error('the browser tests run inside their own network namespace: start them with ' +
      '`npm test` (or `node lib/netns.js node --test tests/FILE.test.js`), as root');
  }
}

/**
 * The rooms the call tests run in: every participant's browser, in joining order.
 * MESHMEET_ROOMS (e.g. "firefox,mixed") picks some of them.
 */
const ALL_ROOMS = /** @type {{label: string, kinds: Kind[]}[]} */ ([
  { label: 'chromium', kinds: ['chromium', 'chromium', 'chromium', 'chromium'] },
  { label: 'firefox', kinds: ['firefox', 'firefox', 'firefox', 'firefox'] },
  // Joining order F, C, F, C: newcomers offer to everyone present, so this room has
  // offers from Chromium to Firefox, Firefox to Chromium, and each to its own kind.
  { label: 'mixed', kinds: ['firefox', 'chromium', 'firefox', 'chromium'] },
]);

export function rooms(variable = 'MESHMEET_ROOMS') {
  const want = (process.env[variable] || '').split(',').map((s) => s.trim()).filter(Boolean);
  for (const w of want) {
    if (!ALL_ROOMS.some((r) => r.label === w)) throw new Error(`${variable}: unknown room kind ${w}`);
  }
  return want.length ? ALL_ROOMS.filter((r) => want.includes(r.label)) : ALL_ROOMS;
}

/**
 * The rooms of the feature tests (recording, file sharing): MESHMEET_FEATURE_ROOMS
 * when set (CI runs them in the mixed room alone, which has both browsers), else the
 * rooms of `rooms()`.
 */
export function featureRooms() {
  return process.env.MESHMEET_FEATURE_ROOMS ? rooms('MESHMEET_FEATURE_ROOMS') : rooms();
}

/**
 * @typedef {{capacity?: number, forceRelay?: boolean, password?: string, label?: string, turn?: string[], tls?: {cert: string, key: string}, ports?: {https: number, turn: number, turnTls: number, relay: string}, cluster?: string[]}} ServerOpts
 * `turn`: more lines for the config's [turn] section (e.g. `extra_udp_listen = [...]`);
 * `tls`: a certificate and key (PEM files) instead of the self-signed pair;
 * `ports`: other ports than 8443, 3478, 5349 and relay ports 50000-50999 (for a
 * second server beside the first); `cluster`: lines for a [cluster] section.
 */

/** The real meshmeet binary with a temporary config. */
export class Server {
  /** @param {ServerOpts} [opts] */
  constructor(opts = {}) {
    this.opts = opts;
    this.dir = mkdtempSync(join(tmpdir(), 'meshmeet-web-'));
    this.stderr = '';
    /** the log of the processes before a restart */
    this.earlier = '';
    /** @type {import('node:child_process').ChildProcess|null} */
    this.proc = null;
    this.url = '';
  }

  async start() {
    requireNetns();
    const bin = process.env.MESHMEET_BIN;
    if (!bin) throw new Error('MESHMEET_BIN is not set (path to target/debug/meshmeet)');
    const o = this.opts;
    const ports = o.ports || { https: 8443, turn: 3478, turnTls: 5349, relay: '50000-50999' };
    const cfg = `data_dir = "${join(this.dir, 'data')}"
[http]
listen = "${HOST_IP}:${ports.https}"
public_host = "${HOST_IP}"
metrics_allow = ["10.213.0.0/24"]
[log]
level = "info"
[rooms]
capacity = ${o.capacity ?? 6}
password = "${o.password ?? ''}"
[turn]
listen = "${HOST_IP}:${ports.turn}"
tls_listen = "${HOST_IP}:${ports.turnTls}"
relay_ips = ["${HOST_IP}"]
relay_ports = "${ports.relay}"
secret = "browser-test-secret-0123456789"
allowed_peer_ranges = ["10.213.0.0/24"]
${(o.turn || []).join('\n')}
[ice]
force_relay = ${o.forceRelay ? 'true' : 'false'}
${o.tls ? `[tls]\ncert = "${o.tls.cert}"\nkey = "${o.tls.key}"\n` : ''}
${o.cluster ? `[cluster]\n${o.cluster.join('\n')}\n` : ''}`;
    const cfgPath = join(this.dir, 'meshmeet.toml');
    writeFileSync(cfgPath, cfg);
    const proc = spawn(bin, ['--config', cfgPath], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.MESHMEET_LOG || 'info', NO_COLOR: '1' },
    });
    this.proc = proc;
    // If the test process dies first, the server goes with it.
    const reap = () => { if (proc.exitCode === null) proc.kill('SIGKILL'); };
    process.once('exit', reap);
    proc.once('exit', () => process.off('exit', reap));
    const ready = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`server not ready:\n${this.stderr}`)), 60000);
      /** @param {Buffer} chunk */
      const onData = (chunk) => {
        this.stderr += chunk.toString();
        const m = this.stderr.match(/open (https:\/\/[^\s/]+)\//);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      };
      proc.stderr?.on('data', onData);
      proc.stdout?.on('data', onData);
      proc.on('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`server exited with ${code}:\n${this.stderr}`));
      });
    });
    this.url = /** @type {string} */ (await ready);
    return this;
  }

  /**
   * Restarts the server as an upgrade or `systemctl restart` would: SIGTERM, wait for
   * the exit, start again with the same config and data directory (same ports).
   */
  async restart() {
    const p = this.proc;
    if (p && p.exitCode === null && p.signalCode === null) {
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGTERM');
      await exited;
    }
    this.earlier += `${this.stderr}\n---- restarted ----\n`;
    this.stderr = '';
    return this.start();
  }

  /**
   * The server's /metrics, as a map from series (name and labels, as printed) to value.
   * @returns {Promise<Map<string, number>>}
   */
  metrics() {
    return new Promise((resolve, reject) => {
      const req = request(`${this.url}/metrics`, { rejectUnauthorized: false, timeout: 10000 }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c) => { body += c; });
        res.on('end', () => {
          if (res.statusCode !== 200) return reject(new Error(`/metrics: ${res.statusCode}`));
          /** @type {Map<string, number>} */
          const out = new Map();
          for (const line of body.split('\n')) {
            const m = line.match(/^([a-z_]+(?:\{[^}]*\})?) (\S+)$/);
            if (m) out.set(m[1], Number(m[2]));
          }
          resolve(out);
        });
      });
      req.on('timeout', () => req.destroy(new Error('/metrics: no answer')));
      req.on('error', reject);
      req.end();
    });
  }

  /**
   * The sum of every series of a metric (all label values).
   * @param {Map<string, number>} metrics @param {string} name
   */
  static total(metrics, name) {
    let sum = 0;
    for (const [k, v] of metrics) if (k === name || k.startsWith(`${name}{`)) sum += v;
    return sum;
  }

  async stop() {
    // The server's log, for a look after a failure (MESHMEET_LOG sets its filter).
    try {
      writeFileSync(join(ensureArtifacts(), `server-${this.opts.label || 'log'}.log`), this.earlier + this.stderr);
    } catch { /* artifacts unwritable: nothing to keep */ }
    const p = this.proc;
    if (p && p.exitCode === null && p.signalCode === null) {
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGTERM');
      const t = setTimeout(() => p.kill('SIGKILL'), 8000);
      await exited;
      clearTimeout(t);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * An X server without a screen, for a browser that must not be headless: Firefox
 * captures a screen (getDisplayMedia) only from a real display, and headless
 * Firefox has none. Xvfb picks a free display number itself (-displayfd).
 */
export async function startXvfb() {
  const proc = spawn('Xvfb', ['-displayfd', '3', '-screen', '0', '1280x720x24', '-nolisten', 'tcp'], {
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr?.on('data', (c) => { err += c.toString(); });
  const reap = () => { if (proc.exitCode === null) proc.kill('SIGKILL'); };
  process.once('exit', reap);
  proc.once('exit', () => process.off('exit', reap));
  const display = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`Xvfb did not start:\n${err}`)), 20000);
    const fd3 = /** @type {import('node:stream').Readable} */ (proc.stdio[3]);
    fd3.on('data', (c) => {
      out += c.toString();
      const m = out.match(/^(\d+)\n/);
      if (m) {
        clearTimeout(timer);
        resolve(`:${m[1]}`);
      }
    });
    proc.on('error', (e) => { clearTimeout(timer); reject(e); });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`Xvfb exited with ${code}:\n${err}`)); });
  });
  return {
    /** @type {string} */
    display,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await exited;
    },
  };
}

/**
 * Chromium's fake cameras: `fake_device_N`. Three or more pages of one browser on the
 * same camera stall every one of its consumers for 2-3 s whenever a connection is
 * added (each new encoder, in every page, got its first frame at the same moment,
 * about 2.5 s later; measured with `bench:firstframe`), which no real participant,
 * who has a camera of their own, sees. Every fourth one from index 1 is a depth
 * camera (Y16) that gives no picture to send, so those are skipped.
 */
const FAKE_CAMERAS = 8;
const CAMERA_PICKS = Array.from({ length: FAKE_CAMERAS }, (_, i) => i).filter((i) => i % 4 !== 1);

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // Several fake cameras, so that each participant has its own (ownCamera below).
  `--use-fake-device-for-media-stream=fps=10,device-count=${FAKE_CAMERAS}`,
  '--use-fake-ui-for-media-stream',
  '--auto-select-desktop-capture-source=Entire screen',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--ignore-certificate-errors',
  '--autoplay-policy=no-user-gesture-required',
  '--lang=en-US',
];

/** Firefox preferences: fake devices without prompts, autoplay, plain host candidates. */
export const FIREFOX_PREFS = {
  // A fake camera (a moving pattern) and microphone (a tone), no permission prompt.
  'media.navigator.streams.fake': true,
  'media.navigator.permission.disabled': true,
  'media.navigator.video.default_fps': 10,
  // Screen sharing picks the screen without a picker (the prompt is off above).
  'media.getdisplaymedia.enabled': true,
  // Autoplay with sound, in every window, without a user gesture.
  'media.autoplay.default': 0,
  'media.autoplay.blocking_policy': 0,
  'media.block-autoplay-until-in-foreground': false,
  // Host candidates carry the address, not an mDNS name (as Chromium is told, too).
  'media.peerconnection.ice.obfuscate_host_addresses': false,
  // No sharing indicator window on the (virtual) screen.
  'privacy.webrtc.legacyGlobalIndicator': false,
  'privacy.webrtc.hideGlobalIndicator': true,
  'intl.accept_languages': 'en-US',
  'intl.locale.requested': 'en-US',
};

/** One browser process per kind, launched when first needed. */
export class Browsers {
  /** @param {{display?: string}} [opts] with a display, Firefox runs on it (not headless) */
  constructor(opts = {}) {
    this.display = opts.display || '';
    /** @type {Map<Kind, Promise<Browser>>} */
    this.launched = new Map();
    /** Chromium pages given a camera so far (ownCamera). */
    this.cameras = 0;
  }

  /** @param {Kind} kind @returns {Promise<Browser>} */
  get(kind) {
    let b = this.launched.get(kind);
    if (!b) {
      b = kind === 'firefox' ? this.launchFirefox() : this.launchChromium();
      this.launched.set(kind, b);
    }
    return b;
  }

  launchChromium() {
    requireNetns();
    return puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      pipe: true,
      acceptInsecureCerts: true,
      args: CHROMIUM_ARGS,
      timeout: 60000,
      protocolTimeout: 120000,
    });
  }

  launchFirefox() {
    requireNetns();
    /** @type {Record<string, string|undefined>} */
    const env = { ...process.env, MOZ_CRASHREPORTER_DISABLE: '1' };
    if (this.display) env.DISPLAY = this.display;
    else delete env.DISPLAY;
    return puppeteer.launch({
      browser: 'firefox',
      executablePath: FIREFOX,
      headless: !this.display,
      acceptInsecureCerts: true,
      extraPrefsFirefox: FIREFOX_PREFS,
      env,
      timeout: 60000,
      protocolTimeout: 120000,
    });
  }

  async close() {
    const all = Array.from(this.launched.values());
    this.launched.clear();
    await Promise.all(all.map(async (p) => {
      try { await (await p).close(); } catch { /* never started, or gone */ }
    }));
  }
}

/**
 * @typedef {{page: Page, context: BrowserContext, name: string, kind: Kind, errors: string[]}} Participant
 */

/**
 * A page in a fresh context of the given browser kind. Firefox gets a window rather
 * than a tab, so every participant's page is visible (a background tab is hidden,
 * and its timers are throttled).
 * @param {Browsers} browsers
 * @param {Kind} kind
 * @param {{viewport?: {width: number, height: number}}} [opts]
 */
export async function newPage(browsers, kind, opts = {}) {
  const browser = await browsers.get(kind);
  const context = await browser.createBrowserContext();
  const page = await context.newPage(kind === 'firefox' ? { type: 'window' } : undefined);
  await page.setViewport(opts.viewport || { width: 960, height: 600 });
  // A loaded machine starts pages slowly; these bounds only say when to give up.
  page.setDefaultNavigationTimeout(90_000);
  page.setDefaultTimeout(60_000);
  /** @type {string[]} */
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    const type = m.type();
    if (type === 'error' || type === 'warn') errors.push(`${type}: ${m.text()}`);
  });
  return { page, context, errors };
}

/**
 * Runs in every room page before its scripts: records each change of a tile's
 * connection state with the connection's own state at that moment, in
 * `window.__tileLog` ({key, state, cs}), for {@link tileLog}.
 */
function recordTileStates() {
  const w = /** @type {any} */ (window);
  w.__tileLog = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const el = /** @type {HTMLElement} */ (r.target);
      if (!el.classList || !el.classList.contains('tile')) continue;
      const key = el.dataset.key || '';
      const peer = w.meshmeet && w.meshmeet.peers.get(key);
      const st = el.dataset.state || '';
      // Skip repeats (the attribute is rewritten on every render).
      const last = w.__tileLog.findLast((/** @type {any} */ x) => x.key === key);
      if (last && last.state === st) continue;
      if (w.__tileLog.length < 2000) {
        w.__tileLog.push({ key, state: st, cs: peer ? peer.pc.connectionState : '', at: Date.now() });
      }
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
}

/**
 * Opens a room page in a fresh context and joins as `name`. With `early`, Join is
 * pressed as soon as the page has loaded, before the camera and microphone have
 * opened; `holdDevices` keeps getUserMedia from answering until
 * `window.__releaseDevices()` is called (a slow device, made certain).
 * @param {Browsers} browsers
 * @param {Kind} kind
 * @param {string} url room URL
 * @param {string} name
 * @param {{join?: boolean, early?: boolean, holdDevices?: boolean, viewport?: {width: number, height: number}}} [opts]
 * @returns {Promise<Participant>}
 */
export async function participant(browsers, kind, url, name, opts = {}) {
  const { page, context, errors } = await newPage(browsers, kind, opts);
  await page.evaluateOnNewDocument(recordTileStates);
  if (opts.holdDevices) await page.evaluateOnNewDocument(holdDevices);
  await page.goto(url);
  if (!opts.early) await page.waitForFunction(() => document.body.dataset.ready === 'true', { timeout: 60000 });
  if (kind === 'chromium' && !opts.early && !opts.holdDevices) {
    await ownCamera(page, `fake_device_${CAMERA_PICKS[browsers.cameras++ % CAMERA_PICKS.length]}`);
  }
  await fill(page, '#name', name);
  if (opts.join !== false) await page.click('#join-btn');
  return { page, context, name, kind, errors };
}

/**
 * Picks a camera in the preview's device list, as a participant would, and waits
 * until the preview shows it (see FAKE_CAMERAS).
 * @param {Page} page
 * @param {string} label
 */
async function ownCamera(page, label) {
  await page.waitForFunction((label) => Array.from(document.querySelectorAll('#cam-select option')).some((o) => o.textContent === label), { timeout: 60_000 }, label);
  await page.evaluate((label) => {
    const sel = /** @type {HTMLSelectElement} */ (document.getElementById('cam-select'));
    const opt = /** @type {HTMLOptionElement} */ (Array.from(sel.options).find((o) => o.textContent === label));
    if (sel.value === opt.value) return;
    sel.value = opt.value;
    sel.dispatchEvent(new Event('change'));
  }, label);
  await page.waitForFunction((label) => {
    const v = /** @type {HTMLVideoElement|null} */ (document.getElementById('preview-video'));
    const src = /** @type {MediaStream|null} */ (v && v.srcObject);
    const track = src ? src.getVideoTracks()[0] : null;
    return !!track && track.readyState === 'live' && track.label === label;
  }, { timeout: 60_000 }, label);
}

/**
 * Opens one room page per kind at once (loading and opening devices in parallel),
 * then joins them one after another in the given order, each once the previous one
 * is in the call: each newcomer offers to those already there, as when people
 * arrive one by one.
 * @param {Browsers} browsers
 * @param {Kind[]} kinds
 * @param {string} url
 * @param {string[]} names
 * @param {(i: number) => {viewport?: {width: number, height: number}}} [optsFor]
 * @returns {Promise<Participant[]>}
 */
export async function joinAll(browsers, kinds, url, names, optsFor = () => ({})) {
  // Firefox was seen to answer getUserMedia only in the window that has the focus (a
  // new window takes it), so its pages open one after another; Chromium's all at once.
  /** @type {Promise<unknown>} */
  let firefoxChain = Promise.resolve();
  const people = await Promise.all(kinds.map((kind, i) => {
    const open = () => participant(browsers, kind, url, names[i], { ...optsFor(i), join: false });
    if (kind !== 'firefox') return open();
    const p = firefoxChain.then(open);
    firefoxChain = p.catch(() => {});
    return p;
  }));
  for (const [i, p] of people.entries()) {
    await p.page.click('#join-btn');
    await waitFor(p.page, (n) => {
      const mm = /** @type {any} */ (window).meshmeet;
      return mm && mm.inCall && mm.peers.size === n;
    }, i, { timeout: 60_000, interval: 50, what: `${names[i]} in the call` });
  }
  return people;
}

/** Holds every getUserMedia answer until `window.__releaseDevices()`. */
function holdDevices() {
  const w = /** @type {any} */ (window);
  const md = navigator.mediaDevices;
  // Also runs in documents that have no devices (the first about:blank).
  if (!md || !md.getUserMedia) return;
  const real = md.getUserMedia.bind(md);
  /** @type {(v?: unknown) => void} */
  let release = () => {};
  const gate = new Promise((r) => { release = r; });
  w.__devicesAsked = 0;
  w.__releaseDevices = () => release();
  md.getUserMedia = async (/** @type {MediaStreamConstraints} */ c) => {
    w.__devicesAsked += 1;
    await gate;
    return real(c);
  };
}

/**
 * The tile state changes a page recorded, each with the connection's state then.
 * @param {Page} page
 * @returns {Promise<{key: string, state: string, cs: string, at: number}[]>}
 */
export function tileLog(page) {
  return page.evaluate(() => /** @type {any} */ (window).__tileLog || []);
}

/**
 * Tile states that claimed what the connection was not: a path (direct, relay,
 * connected) while the connection was not connected, "reconnecting" while it was,
 * or one of `forbidden` (e.g. "direct" in a relay-forced call).
 * @param {Page} page @param {string[]} [forbidden]
 */
export async function dishonestTiles(page, forbidden = []) {
  return (await tileLog(page)).filter((x) =>
    (['direct', 'relay', 'connected'].includes(x.state) && x.cs !== 'connected') ||
    (x.state === 'reconnecting' && x.cs === 'connected') ||
    forbidden.includes(x.state));
}

/**
 * Replaces an input's text, as typing would (input events included).
 * @param {Page} page @param {string} selector @param {string} value
 */
export async function fill(page, selector, value) {
  await page.locator(selector).fill(value);
}

/** @param {Page} page @param {string} selector */
export function text(page, selector) {
  return page.$eval(selector, (el) => el.textContent);
}

/** @param {Page} page @param {string} selector @param {string} name */
export function attr(page, selector, name) {
  return page.$eval(selector, (el, n) => el.getAttribute(n), name);
}

const started = Date.now();
/** Progress with the time since the test file started, for reading a slow run. @param {string} what */
export const step = (what) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${what}`);

/** A room page's own peer id. @param {Page} page */
export const myId = (page) => page.evaluate(() => /** @type {string} */ (/** @type {any} */ (window).meshmeet.id));

/** Numbers each wait's check (see waitFor). */
let checks = 0;

/**
 * Waits until a (possibly async) check in the page returns true; the check gets
 * `arg`. A timeout says what was awaited.
 * @template A
 * @param {Page} page
 * @param {(arg: A) => unknown} fn a check; a truthy result (or promise of one) ends the wait
 * @param {A} [arg]
 * @param {{timeout?: number, interval?: number, what?: string}} [opts]
 */
export async function waitFor(page, fn, arg, opts = {}) {
  const timeout = opts.timeout ?? 30000;
  // One check at a time: puppeteer runs the check on a timer without waiting for the
  // last one, and slow async checks (getStats on a starved machine) that pile up
  // back up Chromium's WebRTC thread, which the page then waits for.
  const key = JSON.stringify(`check-${++checks}`);
  const once = new Function('arg', `const busy = (window.__checks ||= {});
    if (busy[${key}]) return false;
    busy[${key}] = true;
    return Promise.resolve().then(() => (${fn.toString()})(arg)).finally(() => { delete busy[${key}]; });`);
  try {
    // @ts-ignore: puppeteer's typing of generic page functions
    await page.waitForFunction(once, { timeout, polling: opts.interval ?? 100 }, arg);
  } catch (e) {
    throw new Error(`waiting for ${opts.what || 'a page condition'}: ${/** @type {Error} */ (e).message}\n` +
      `${await describeCall(page)}`);
  }
}

/**
 * Join to first frame: for every page, the time from pressing Join to the first
 * frame shown of each peer that was in the room already, and from the arrival of
 * each later peer to its first frame (the client's `firstFrameMs`, docs/CLIENT.md).
 * Waits until every connection has one (their media is flowing when this is called).
 * @param {Page[]} pages
 * @returns {Promise<{joined: number[], arrived: number[], text: string}>}
 */
export async function firstFrames(pages) {
  /** @type {number[]} */ const joined = [];
  /** @type {number[]} */ const arrived = [];
  for (const [i, page] of pages.entries()) {
    await waitFor(page, async () => Object.values(await /** @type {any} */ (window).meshmeet.stats())
      .every((/** @type {any} */ p) => typeof p.firstFrameMs === 'number'), null,
    { timeout: 30_000, interval: 250, what: `a first-frame time for every peer on page ${i}` });
    const st = await page.evaluate(async () => Object.values(await /** @type {any} */ (window).meshmeet.stats())
      .map((/** @type {any} */ p) => ({ ms: /** @type {number} */ (p.firstFrameMs), sinceJoin: !!p.sinceJoin })));
    for (const p of st) (p.sinceJoin ? joined : arrived).push(p.ms);
  }
  const sum = (/** @type {number[]} */ xs) => {
    if (!xs.length) return 'none';
    const v = xs.slice().sort((a, b) => a - b);
    const median = v.length % 2 ? v[(v.length - 1) / 2] : Math.round((v[v.length / 2 - 1] + v[v.length / 2]) / 2);
    return `median ${median} ms, worst ${v[v.length - 1]} ms (${v.length})`;
  };
  return {
    joined, arrived,
    text: `join to first frame: from Join, of peers already there: ${sum(joined)}; from a later peer's arrival: ${sum(arrived)}`,
  };
}

let mediaWaits = 0;

/**
 * Waits until every page is in the call with `n - 1` peers and has decoded video
 * frames and received audio packets from each of them since the wait began
 * (getStats). A sender that a starved machine slows to a frame a second still
 * counts; one that sends nothing does not.
 * @param {Page[]} pages
 * @param {number} n
 */
export async function waitForMedia(pages, n, timeout = 60000) {
  const token = `media-${++mediaWaits}`;
  try {
    await Promise.all(pages.map((p, i) => mediaOn(p, i, n, token, timeout)));
  } catch (e) {
    // The other ends of a stalled stream say why (what they send, what they decode).
    const all = await Promise.all(pages.map(async (p, i) => `page ${i}: ${await describeCall(p)}`));
    throw new Error(`${/** @type {Error} */ (e).message}\nevery page:\n${all.join('\n')}`);
  }
}

/**
 * @param {Page} p @param {number} i @param {number} n @param {string} token
 * @param {number} timeout
 */
function mediaOn(p, i, n, token, timeout) {
  return waitFor(p, async ([want, key]) => {
    const w = /** @type {any} */ (window);
    const mm = w.meshmeet;
    if (!mm || !mm.inCall || mm.peers.size !== want) return false;
    const st = await mm.stats();
    /** @type {Record<string, {serial: number, frames: number, audio: number}>} */
    const base = ((w.__mediaBase ||= {})[key] ||= {});
    let flowing = Object.keys(st).length === want;
    for (const [id, s] of Object.entries(st)) {
      const b = base[id];
      // A new connection, or counters that went back (a new stream): count from here.
      if (!b || b.serial !== s.serial || s.framesDecoded < b.frames || s.audioPackets < b.audio) {
        base[id] = { serial: s.serial, frames: s.framesDecoded, audio: s.audioPackets };
        flowing = false;
      } else if (!(s.framesDecoded > b.frames && s.audioPackets > b.audio)) {
        flowing = false;
      }
    }
    if (flowing) delete w.__mediaBase[key];
    return flowing;
  }, [n - 1, token], { timeout, interval: 1000, what: `media flowing from ${n - 1} peers on page ${i}` });
}

/**
 * Waits until every connection between `pages` has settled: connected, signaling
 * stable, no restart under way or scheduled, a selected candidate pair (read afresh
 * from the browser's stats), and both ends on the same ICE credentials (each side's
 * local ufrag is the other's remote one). A test that injects a fault starts from
 * here, so that the recovery of the test before it cannot overlap it.
 * @param {Page[]} pages
 * @param {number} [timeout]
 */
export async function settled(pages, timeout = 90_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const views = await Promise.all(pages.map((page) => page.evaluate(async () => {
      const mm = /** @type {any} */ (window).meshmeet;
      const u = (/** @type {string|undefined} */ sdp) => ((sdp || '').match(/a=ice-ufrag:(\S+)/) || [])[1] || '';
      /** @type {Record<string, {cs: string, ss: string, busy: boolean, path: boolean, local: string, remote: string}>} */
      const peers = {};
      for (const p of mm.peers.values()) {
        let path = false;
        try { path = !!(await p.selectedPath()); } catch { /* no stats this time */ }
        peers[p.id] = {
          cs: p.pc.connectionState, ss: p.pc.signalingState, busy: !!(p.restarting || p.restartTimer), path,
          local: u(p.pc.currentLocalDescription?.sdp), remote: u(p.pc.currentRemoteDescription?.sdp),
        };
      }
      return { id: /** @type {string} */ (mm.id), peers };
    })));
    const byId = new Map(views.map((v) => [v.id, v]));
    /** @type {string[]} */
    const open = [];
    for (const v of views) {
      for (const [id, p] of Object.entries(v.peers)) {
        const back = byId.get(id)?.peers[v.id];
        if (p.cs !== 'connected' || p.ss !== 'stable' || p.busy || !p.path) {
          open.push(`${v.id} to ${id}: ${p.cs}/${p.ss}${p.busy ? ', restart under way' : ''}${p.path ? '' : ', no selected pair'}`);
        } else if (back && (back.remote !== p.local || back.local !== p.remote)) {
          open.push(`${v.id} to ${id}: ICE credentials differ (${p.local}/${p.remote} against ${back.remote}/${back.local})`);
        }
      }
    }
    if (!open.length) return;
    if (Date.now() > deadline) {
      const all = await Promise.all(pages.map(async (p, i) => `page ${i}: ${await describeCall(p)}`));
      throw new Error(`waiting for every connection to settle: ${open.join('; ')}\nevery page:\n${all.join('\n')}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

/**
 * What a page's call looks like, for failure messages: each peer's connection,
 * signaling and tile state, media counters and selected path.
 * @param {Page} page
 */
export async function describeCall(page) {
  /** @type {ReturnType<typeof setTimeout>|undefined} */
  let timer;
  const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error('no answer in 10 s')), 10_000); });
  try {
    return await Promise.race([late, page.evaluate(async () => {
      const mm = /** @type {any} */ (window).meshmeet;
      if (!mm) return 'no meshmeet handle';
      const st = await mm.stats();
      const lines = [`in call: ${mm.inCall}, id ${mm.id}, signaling joined: ${mm.signaling?.joined}`];
      for (const p of mm.peers.values()) {
        const s = st[p.id] || {};
        lines.push(`  peer ${p.id} (${p.name}): ${p.pc.connectionState}/${p.pc.iceConnectionState}/` +
          `${p.pc.signalingState}, tile ${s.state}, frames ${s.framesDecoded}, audio packets ${s.audioPackets}, ` +
          `path ${JSON.stringify(s.path)}, offers sent ${s.offers} (${s.unanswered} sent again), ` +
          `restarts ${s.restarts} (${s.noPathRestarts} for no selected pair, ${s.renewals} new connections)`);
        const r = await p.pc.getStats();
        // What the selected candidate pair carried (a connection that is connected but
        // sends nothing shows here: Firefox's, after its ICE transport failed once).
        /** @type {any} */
        let pair = null;
        r.forEach((/** @type {any} */ x) => {
          if (x.type === 'transport' && x.selectedCandidatePairId) pair = r.get(x.selectedCandidatePairId) || pair;
        });
        r.forEach((/** @type {any} */ x) => { if (!pair && x.type === 'candidate-pair' && x.selected) pair = x; });
        if (pair) lines.push(`    selected pair: ${pair.bytesSent} bytes sent, ${pair.bytesReceived} received`);
        // The connection's last negotiation and connection events.
        for (const t of (p.trace || []).slice(-40)) lines.push(`    | ${t}`);
        // Incoming video per m-line: packets, frames received and decoded, key frames, PLIs.
        r.forEach((/** @type {any} */ x) => {
          if (x.type === 'inbound-rtp' && x.kind === 'video') {
            lines.push(`    video in mid ${x.mid}: packets ${x.packetsReceived}, lost ${x.packetsLost}, frames received ` +
              `${x.framesReceived}, decoded ${x.framesDecoded}, key ${x.keyFramesDecoded}, pli ${x.pliCount}`);
          }
          if (x.type === 'outbound-rtp' && x.kind === 'video') {
            lines.push(`    video out mid ${x.mid}: packets ${x.packetsSent}, frames encoded ${x.framesEncoded}, ` +
              `sent ${x.framesSent}, key ${x.keyFramesEncoded}, pli ${x.pliCount}, nack ${x.nackCount}, ` +
              `target ${x.targetBitrate}, limited by ${x.qualityLimitationReason}, ${x.frameWidth}x${x.frameHeight}`);
          }
        });
      }
      return lines.join('\n');
    })]);
  } catch (e) {
    return `(page state unavailable: ${/** @type {Error} */ (e).message})`;
  } finally {
    clearTimeout(timer);
  }
}

export function ensureArtifacts() {
  mkdirSync(ARTIFACTS, { recursive: true });
  return ARTIFACTS;
}
