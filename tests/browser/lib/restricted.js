// A second network namespace for browsers behind a restrictive firewall, as on a hotel,
// school or office network that lets out only HTTPS.
//
// The test runner, the server and the "outside" browsers stay in the namespace that
// lib/netns.js created (the server on HOST_IP). This module adds another namespace
// joined to it by a veth pair:
//
//   test namespace: mmr0 10.214.0.1/24  <-- veth -->  mmr1 10.214.0.2/24 :restricted
//                                                       default route via 10.214.0.1
//
// so the restricted namespace reaches HOST_IP through the test namespace, and its
// nftables rules decide what gets there: only TCP to the server's HTTPS port (and,
// when asked, UDP to that port number), plus loopback. Everything else leaving it is
// dropped, and counted. Browsers started by {@link RestrictedBrowsers} run inside it
// (Chromium over its DevTools pipe, which crosses namespaces; Firefox over WebDriver
// BiDi, whose TCP endpoint is bridged through a Unix socket, which also does).

import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, chmodSync, rmSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import { Browsers, CHROMIUM_ARGS, FIREFOX_PREFS, requireNetns } from './harness.js';
import { destroyNetns } from './netns.js';

const here = dirname(fileURLToPath(import.meta.url));
const PREFIX = 'mmrestr';
/** The restricted namespace's address, and its gateway (in the test namespace). */
export const RESTRICTED_IP = '10.214.0.2';
export const GATEWAY_IP = '10.214.0.1';
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const FIREFOX = process.env.FIREFOX_BIN || '/usr/bin/firefox-esr';

/** @param {string[]} args */
function run(...args) {
  return execFileSync(args[0], args.slice(1), { encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
}

/** Removes restricted namespaces left behind by test processes that were killed. */
function removeStale() {
  let list = '';
  try { list = run('ip', 'netns', 'list'); } catch { return; }
  for (const line of list.split('\n')) {
    const m = line.match(new RegExp(`^(${PREFIX}-(\\d+))\\b`));
    if (!m || Number(m[2]) === process.pid) continue;
    try { process.kill(Number(m[2]), 0); continue; } catch { /* owner is gone */ }
    destroyNetns(m[1]);
  }
}

/**
 * What the restricted namespace lets out towards the server (`server`: its address):
 * TCP to `httpsPort`, and UDP to the same port number with `udp`.
 * @typedef {{server: string, httpsPort: number, udp?: boolean}} Allow
 */

export class RestrictedNet {
  constructor() {
    this.name = `${PREFIX}-${process.pid}`;
    this.destroyed = false;
    this.onExit = () => this.destroy();
  }

  /** Creates the namespace and the veth pair, with nothing let out yet. */
  static create() {
    requireNetns();
    removeStale();
    const net = new RestrictedNet();
    const name = net.name;
    run('ip', 'netns', 'add', name);
    process.once('exit', net.onExit);
    try {
      const ex = (/** @type {string[]} */ ...a) => run('ip', 'netns', 'exec', name, ...a);
      // Created here, in the test namespace; one end moves into the new one.
      run('ip', 'link', 'add', 'mmr0', 'type', 'veth', 'peer', 'name', 'mmr1', 'netns', name);
      run('ip', 'addr', 'add', `${GATEWAY_IP}/24`, 'dev', 'mmr0');
      run('ip', 'link', 'set', 'mmr0', 'up');
      try { ex('sysctl', '-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1'); } catch { /* no IPv6 */ }
      ex('ip', 'link', 'set', 'lo', 'up');
      ex('ip', 'addr', 'add', `${RESTRICTED_IP}/24`, 'dev', 'mmr1');
      ex('ip', 'link', 'set', 'mmr1', 'up');
      ex('ip', 'route', 'add', 'default', 'via', GATEWAY_IP);
      net.firewall(null);
    } catch (e) {
      net.destroy();
      throw e;
    }
    return net;
  }

  /**
   * Replaces the namespace's firewall: with `allow` null, only loopback; otherwise
   * also what {@link Allow} says. Established traffic of allowed connections comes
   * back in; nothing else does. Loopback means 127.0.0.0/8 only: browsers in the
   * namespace cannot reach each other's host candidates (which share one address)
   * either, so every call leg leaves through the firewall.
   * @param {Allow|null} allow
   */
  firewall(allow) {
    const pass = [];
    if (allow) {
      pass.push(`ip daddr ${allow.server} tcp dport ${allow.httpsPort} accept`);
      if (allow.udp) pass.push(`ip daddr ${allow.server} udp dport ${allow.httpsPort} accept`);
    }
    const rules = `table inet mmfw
delete table inet mmfw
table inet mmfw {
  chain out {
    type filter hook output priority 0; policy drop;
    ip daddr 127.0.0.0/8 accept
    ${pass.join('\n    ')}
    meta l4proto udp counter name udp_dropped drop
    meta l4proto tcp counter name tcp_dropped drop
    counter name other_dropped drop
  }
  chain in {
    type filter hook input priority 0; policy drop;
    ip saddr 127.0.0.0/8 accept
    ct state established,related accept
    counter name in_dropped drop
  }
  counter udp_dropped {}
  counter tcp_dropped {}
  counter other_dropped {}
  counter in_dropped {}
}
`;
    execFileSync('ip', ['netns', 'exec', this.name, 'nft', '-f', '-'], { input: rules, stdio: ['pipe', 'ignore', 'pipe'] });
  }

  /**
   * Packets the firewall dropped since it was last set, by kind.
   * @returns {{udp: number, tcp: number, other: number, in: number}}
   */
  dropped() {
    const out = run('ip', 'netns', 'exec', this.name, 'nft', '-j', 'list', 'counters', 'table', 'inet', 'mmfw');
    /** @type {Record<string, number>} */
    const by = {};
    for (const item of JSON.parse(out).nftables || []) {
      if (item.counter) by[item.counter.name] = item.counter.packets;
    }
    return { udp: by.udp_dropped ?? 0, tcp: by.tcp_dropped ?? 0, other: by.other_dropped ?? 0, in: by.in_dropped ?? 0 };
  }

  /** Ends whatever still runs in the namespace and removes it (and so the veth pair). */
  destroy() {
    if (this.destroyed) return;
    this.destroyed = true;
    process.off('exit', this.onExit);
    destroyNetns(this.name);
  }
}

/**
 * Browsers that run inside a {@link RestrictedNet}. Chromium is started through a
 * wrapper (`ip netns exec NAME chromium ...`) and driven over its DevTools pipe, which
 * is inherited across the namespace switch. Firefox's WebDriver BiDi endpoint listens
 * on the restricted namespace's loopback; a bridge process there serves it on a Unix
 * socket, and a listener on the same port of this namespace's loopback forwards to
 * that socket, so puppeteer connects to the address Firefox prints.
 */
export class RestrictedBrowsers extends Browsers {
  /** @param {RestrictedNet} net @param {{display?: string}} [opts] */
  constructor(net, opts = {}) {
    super(opts);
    this.net = net;
    this.dir = mkdtempSync(join(tmpdir(), 'meshmeet-restricted-'));
    /** @type {(() => void)[]} */
    this.cleanups = [];
  }

  /** @param {string} binary */
  wrapper(binary) {
    const path = join(this.dir, `in-netns-${binary.replace(/\W/g, '_')}`);
    writeFileSync(path, `#!/bin/sh\nexec ip netns exec ${this.net.name} ${binary} "$@"\n`);
    chmodSync(path, 0o755);
    return path;
  }

  launchChromium() {
    return puppeteer.launch({
      executablePath: this.wrapper(CHROMIUM),
      headless: true,
      pipe: true,
      acceptInsecureCerts: true,
      args: CHROMIUM_ARGS,
      timeout: 60000,
      protocolTimeout: 120000,
    });
  }

  async launchFirefox() {
    const port = await this.bridge();
    /** @type {Record<string, string|undefined>} */
    const env = { ...process.env, MOZ_CRASHREPORTER_DISABLE: '1' };
    if (this.display) env.DISPLAY = this.display;
    else delete env.DISPLAY;
    return puppeteer.launch({
      browser: 'firefox',
      executablePath: this.wrapper(FIREFOX),
      headless: !this.display,
      acceptInsecureCerts: true,
      extraPrefsFirefox: FIREFOX_PREFS,
      debuggingPort: port,
      env,
      timeout: 60000,
      protocolTimeout: 120000,
    });
  }

  /**
   * A port free on this namespace's loopback, listened on here and forwarded to the
   * same port on the restricted namespace's loopback (through a Unix socket and a
   * bridge process inside). @returns {Promise<number>}
   */
  async bridge() {
    const sock = join(this.dir, `bidi-${this.cleanups.length}.sock`);
    const server = createServer((c) => {
      const up = connect(sock);
      c.pipe(up).pipe(c);
      const end = () => { c.destroy(); up.destroy(); };
      c.on('error', end);
      up.on('error', end);
      c.on('close', end);
      up.on('close', end);
    });
    const port = await new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve(/** @type {import('node:net').AddressInfo} */ (server.address()).port));
    });
    const child = spawn('ip', ['netns', 'exec', this.net.name, process.execPath, join(here, 'bridge.js'), sock, String(port)], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await new Promise((resolve, reject) => {
      child.stdout?.once('data', resolve);
      child.once('exit', (code) => reject(new Error(`bridge exited with ${code}`)));
    });
    this.cleanups.push(() => { server.close(); child.kill('SIGKILL'); });
    return port;
  }

  async close() {
    await super.close();
    for (const c of this.cleanups.splice(0)) c();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
