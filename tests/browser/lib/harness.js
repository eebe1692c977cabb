// Test harness: a private network namespace, the real meshmeet server inside it, and
// one headless Chromium (also inside it) with one browser context per participant.
//
// Chromium gathers no host candidates on loopback, and the tests must not use the
// machine's real interfaces, so everything runs in a namespace with its own
// interface (10.213.0.1/24) that nothing outside can reach.

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, chmodSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const ARTIFACTS = join(here, '..', 'artifacts');
export const HOST_IP = '10.213.0.1';
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

/** @param {string[]} args */
function ip(...args) {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

let nsCounter = 0;

/** Removes namespaces left behind by test runs that were killed. */
function removeStaleNamespaces() {
  let list = '';
  try { list = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }); } catch { return; }
  for (const line of list.split('\n')) {
    const m = line.match(/^(mmtest-(\d+)-\d+)/);
    if (!m || Number(m[2]) === process.pid) continue;
    try { process.kill(Number(m[2]), 0); continue; } catch { /* owner is gone */ }
    try { ip('netns', 'del', m[1]); } catch { /* raced */ }
  }
}

/** A network namespace with lo and one interface holding HOST_IP. */
export class Netns {
  constructor() {
    removeStaleNamespaces();
    this.name = `mmtest-${process.pid}-${++nsCounter}`;
    ip('netns', 'add', this.name);
    try {
      const ex = (/** @type {string[]} */ ...a) => ip('netns', 'exec', this.name, ...a);
      ex('ip', 'link', 'set', 'lo', 'up');
      // A veth pair with both ends inside the namespace: a real, non-loopback
      // interface whose traffic never leaves the namespace.
      ex('ip', 'link', 'add', 'mm0', 'type', 'veth', 'peer', 'name', 'mm1');
      ex('ip', 'addr', 'add', `${HOST_IP}/24`, 'dev', 'mm0');
      ex('ip', 'link', 'set', 'mm1', 'up');
      ex('ip', 'link', 'set', 'mm0', 'up');
      // IPv4 only: keeps the candidate set small and predictable.
      try { ex('sysctl', '-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1'); } catch { /* no IPv6 */ }
    } catch (e) {
      this.destroy();
      throw e;
    }
  }

  /** argv prefix that runs a command inside the namespace */
  prefix() { return ['ip', 'netns', 'exec', this.name]; }

  destroy() {
    try { ip('netns', 'del', this.name); } catch { /* already gone */ }
  }
}

/**
 * @typedef {{capacity?: number, forceRelay?: boolean, password?: string}} ServerOpts
 */

/** The real meshmeet binary, in the namespace, with a temporary config. */
export class Server {
  /** @param {Netns} ns @param {ServerOpts} [opts] */
  constructor(ns, opts = {}) {
    this.ns = ns;
    this.opts = opts;
    this.dir = mkdtempSync(join(tmpdir(), 'meshmeet-web-'));
    this.stderr = '';
    /** @type {import('node:child_process').ChildProcess|null} */
    this.proc = null;
    this.url = '';
  }

  async start() {
    const bin = process.env.MESHMEET_BIN;
    if (!bin) throw new Error('MESHMEET_BIN is not set (path to target/debug/meshmeet)');
    const o = this.opts;
    const cfg = `data_dir = "${join(this.dir, 'data')}"
[http]
listen = "${HOST_IP}:8443"
public_host = "${HOST_IP}"
[log]
level = "info"
[rooms]
capacity = ${o.capacity ?? 6}
password = "${o.password ?? ''}"
[turn]
listen = "${HOST_IP}:3478"
tls_listen = "${HOST_IP}:5349"
relay_ips = ["${HOST_IP}"]
relay_ports = "50000-50999"
secret = "browser-test-secret-0123456789"
allowed_peer_ranges = ["10.213.0.0/24"]
[ice]
force_relay = ${o.forceRelay ? 'true' : 'false'}
`;
    const cfgPath = join(this.dir, 'meshmeet.toml');
    writeFileSync(cfgPath, cfg);
    const proc = spawn(this.ns.prefix()[0], [...this.ns.prefix().slice(1), bin, '--config', cfgPath], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.MESHMEET_LOG || 'info', NO_COLOR: '1' },
    });
    this.proc = proc;
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

  async stop() {
    const p = this.proc;
    if (p && p.exitCode === null) {
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGTERM');
      const t = setTimeout(() => p.kill('SIGKILL'), 8000);
      await exited;
      clearTimeout(t);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** One headless Chromium inside the namespace. */
export async function launchBrowser(/** @type {Netns} */ ns) {
  const dir = mkdtempSync(join(tmpdir(), 'meshmeet-chromium-'));
  const wrapper = join(dir, 'chromium-in-netns.sh');
  writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${ns.name} ${CHROMIUM} "$@"\n`);
  chmodSync(wrapper, 0o755);
  const browser = await chromium.launch({
    executablePath: wrapper,
    headless: true,
    args: [
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream',
      '--auto-select-desktop-capture-source=Entire screen',
      '--disable-features=WebRtcHideLocalIpsWithMdns',
      '--ignore-certificate-errors',
      '--autoplay-policy=no-user-gesture-required',
      // playwright itself passes a fresh temporary --user-data-dir.
    ],
  });
  return {
    browser,
    async close() {
      await browser.close().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Opens a room page in a fresh context and joins as `name`.
 * @param {import('playwright-core').Browser} browser
 * @param {string} url room URL
 * @param {string} name
 * @param {{join?: boolean, viewport?: {width: number, height: number}}} [opts]
 */
export async function participant(browser, url, name, opts = {}) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: opts.viewport || { width: 960, height: 600 },
    permissions: ['camera', 'microphone'],
    locale: 'en-US',
  });
  const page = await context.newPage();
  /** @type {string[]} */
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.ready === 'true', null, { timeout: 40000 });
  await page.fill('#name', name);
  if (opts.join !== false) await page.click('#join-btn');
  return { page, context, name, errors };
}

/**
 * Polls an async check in the page until it returns true. (Playwright's
 * waitForFunction does not await a predicate's promise, so async checks such as
 * getStats() go through here.)
 * @template A
 * @param {import('playwright-core').Page} page
 * @param {(arg: A) => Promise<boolean>} fn
 * @param {A} arg
 * @param {{timeout?: number, interval?: number, what?: string}} [opts]
 */
export async function pollPage(page, fn, arg, opts = {}) {
  const timeout = opts.timeout ?? 30000;
  const interval = opts.interval ?? 250;
  const deadline = Date.now() + timeout;
  /** @type {any} */
  let last = null;
  for (;;) {
    try {
      // @ts-ignore: playwright's evaluate typing of generic functions
      if (await page.evaluate(fn, arg)) return;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${opts.what || 'page condition'}${last ? `: ${last}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/**
 * Waits until every page is in the call with `n - 1` peers whose video frames and
 * audio packets are rising (getStats), then returns each page's stats.
 * @param {import('playwright-core').Page[]} pages
 * @param {number} n
 */
export async function waitForMedia(pages, n, timeout = 60000) {
  await Promise.all(pages.map((p) => pollPage(p, async (want) => {
    const mm = /** @type {any} */ (window).meshmeet;
    if (!mm || !mm.inCall || mm.peers.size !== want) return false;
    const a = await mm.stats();
    await new Promise((r) => setTimeout(r, 500));
    const b = await mm.stats();
    return Object.keys(b).length === want && Object.keys(b).every((id) => a[id] &&
      b[id].framesDecoded > a[id].framesDecoded && b[id].audioPackets > a[id].audioPackets);
  }, n - 1, { timeout, what: `media flowing from ${n - 1} peers` })));
}

export function ensureArtifacts() {
  mkdirSync(ARTIFACTS, { recursive: true });
  return ARTIFACTS;
}
