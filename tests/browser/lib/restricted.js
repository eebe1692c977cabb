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
// so the restricted namespace reaches HOST_IP through the test namespace, and
// nftables rules on the test namespace's end of the veth decide what gets there: only
// TCP to the server's HTTPS port (and, when asked, UDP to that port number).
// Everything else is dropped, silently as on a real network, and counted. Browsers
// started by {@link RestrictedBrowsers} run inside it
// (Chromium over its DevTools pipe, which crosses namespaces; Firefox over WebDriver
// BiDi, whose TCP endpoint is bridged through a Unix socket, which also does).

import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, chmodSync, rmSync } from 'node:fs';
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
/** The address the restricted namespace's traffic leaves with when it is NATed. */
export const NAT_IP = '10.214.0.3';
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
    rmSync(`/etc/netns/${m[1]}`, { recursive: true, force: true });
  }
  let tables = '';
  try { tables = run('nft', 'list', 'tables', 'inet'); } catch { return; }
  for (const m of tables.matchAll(/^table inet (mmfw_(\d+))$/gm)) {
    if (Number(m[2]) === process.pid) continue;
    try { process.kill(Number(m[2]), 0); continue; } catch { /* owner is gone */ }
    try { run('nft', 'delete', 'table', 'inet', m[1]); } catch { /* raced */ }
  }
}

/**
 * What the restricted namespace lets out towards the server (`server`: its address):
 * TCP to `httpsPort`, and UDP to the same port number with `udp`; or, with `all`,
 * everything (the namespace is then an ordinary network, NATed if asked).
 * @typedef {{server: string, httpsPort: number, udp?: boolean, all?: boolean}} Allow
 */

export class RestrictedNet {
  constructor() {
    this.name = `${PREFIX}-${process.pid}`;
    this.destroyed = false;
    this.nat = false;
    this.onExit = () => this.destroy();
  }

  /**
   * Creates the namespace and the veth pair, with nothing let out yet. With `nat`,
   * what leaves the namespace is source-NATed to NAT_IP, as a home router would
   * (browsers then learn a server-reflexive address that differs from their host
   * candidate).
   * @param {{nat?: boolean}} [opts]
   */
  static create(opts = {}) {
    requireNetns();
    removeStale();
    const net = new RestrictedNet();
    net.nat = !!opts.nat;
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
      if (net.nat) {
        // Answers to NAT_IP go to the restricted end, where the NAT translates them back.
        const mac = JSON.parse(ex('ip', '-j', 'link', 'show', 'mmr1'))[0].address;
        run('ip', 'neigh', 'replace', NAT_IP, 'lladdr', mac, 'dev', 'mmr0', 'nud', 'permanent');
      }
      net.localRules();
      net.firewall(null);
    } catch (e) {
      net.destroy();
      throw e;
    }
    return net;
  }

  /**
   * The restricted namespace's own rules, set once: new connections from outside are
   * not let in, and loopback carries only 127.0.0.0/8, so browsers in the namespace
   * cannot reach each other's host candidates (which share one address) and every
   * call leg leaves through the veth; with `nat`, what leaves is source-NATed.
   */
  localRules() {
    const rules = `table inet mmlocal {
  chain out {
    type filter hook output priority 0;
    oifname "lo" ip daddr != 127.0.0.0/8 drop
  }
  chain in {
    type filter hook input priority 0; policy drop;
    iifname "lo" accept
    ct state established,related accept
  }
  ${this.nat ? `chain post {
    type nat hook postrouting priority srcnat;
    oifname "mmr1" snat ip to ${NAT_IP}
  }` : ''}
}
`;
    execFileSync('ip', ['netns', 'exec', this.name, 'nft', '-f', '-'], { input: rules, stdio: ['pipe', 'ignore', 'pipe'] });
  }

  /** The table in the test namespace that filters what arrives from the veth. */
  get table() { return `mmfw_${process.pid}`; }

  /**
   * Replaces the firewall: with `allow` null, nothing from the restricted namespace
   * gets in; otherwise what {@link Allow} says. It filters on the test namespace's
   * side of the veth (where the server is), so a refused packet is lost on the way as
   * on a real network, rather than refused to the sending browser at once (a packet
   * dropped on its own host's output fails the browser's send call at once, which
   * would make blocked ways look quick to give up on). Answers to allowed traffic go
   * back unfiltered.
   * @param {Allow|null} allow
   */
  firewall(allow) {
    const pass = [];
    if (allow?.all) pass.push('accept');
    else if (allow) {
      pass.push(`ip daddr ${allow.server} tcp dport ${allow.httpsPort} accept`);
      if (allow.udp) pass.push(`ip daddr ${allow.server} udp dport ${allow.httpsPort} accept`);
    }
    const t = this.table;
    const rules = `table inet ${t}
delete table inet ${t}
table inet ${t} {
  counter udp_dropped {}
  counter tcp_dropped {}
  counter other_dropped {}
  chain from_restricted {
    ${pass.join('\n    ')}
    meta l4proto udp counter name udp_dropped drop
    meta l4proto tcp counter name tcp_dropped drop
    counter name other_dropped drop
  }
  chain in {
    type filter hook input priority 0;
    iifname "mmr0" jump from_restricted
  }
  chain forward_from_restricted {
    type filter hook forward priority 0;
    iifname "mmr0" drop
  }
}
`;
    execFileSync('nft', ['-f', '-'], { input: rules, stdio: ['pipe', 'ignore', 'pipe'] });
  }

  /**
   * Packets the firewall dropped since it was last set, by kind.
   * @returns {{udp: number, tcp: number, other: number}}
   */
  dropped() {
    const out = run('nft', '-j', 'list', 'counters', 'table', 'inet', this.table);
    /** @type {Record<string, number>} */
    const by = {};
    for (const item of JSON.parse(out).nftables || []) {
      if (item.counter) by[item.counter.name] = item.counter.packets;
    }
    return { udp: by.udp_dropped ?? 0, tcp: by.tcp_dropped ?? 0, other: by.other_dropped ?? 0 };
  }

  /**
   * Host names for the processes started in the namespace (`ip netns exec` puts
   * /etc/netns/NAME/hosts in place of /etc/hosts for them), and a DNS server on the
   * namespace's loopback, where nothing listens: a lookup of any other name fails at
   * once instead of waiting on a server the firewall cuts off.
   * @param {Record<string, string>} names name -> address
   */
  hosts(names) {
    const dir = `/etc/netns/${this.name}`;
    mkdirSync(dir, { recursive: true });
    const lines = ['127.0.0.1 localhost', ...Object.entries(names).map(([n, a]) => `${a} ${n}`)];
    writeFileSync(join(dir, 'hosts'), `${lines.join('\n')}\n`);
    writeFileSync(join(dir, 'resolv.conf'), 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n');
  }

  /** Ends whatever still runs in the namespace and removes it (and so the veth pair). */
  destroy() {
    if (this.destroyed) return;
    this.destroyed = true;
    process.off('exit', this.onExit);
    rmSync(`/etc/netns/${this.name}`, { recursive: true, force: true });
    try { run('nft', 'delete', 'table', 'inet', this.table); } catch { /* never made */ }
    destroyNetns(this.name);
  }
}

/**
 * A certificate authority of its own and a server certificate it issued for `ip`
 * (PEM files under `dir`), so that browsers can be made to trust the server the way
 * they trust a real one: Firefox refuses a self-signed certificate for TURN over TLS
 * even with `acceptInsecureCerts` (which covers pages only), and NSS does not take a
 * self-signed server certificate as a trust anchor.
 * @param {string} dir @param {string} ip @param {string} [name] a host name it names too
 * @returns {{ca: string, cert: string, key: string}}
 */
export function testCertificates(dir, ip, name) {
  const f = (/** @type {string} */ n) => join(dir, n);
  const ssl = (/** @type {string[]} */ ...a) => execFileSync('openssl', a, { stdio: ['ignore', 'ignore', 'pipe'] });
  ssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '30',
    '-subj', '/CN=meshmeet test CA', '-keyout', f('ca-key.pem'), '-out', f('ca.pem'),
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
  ssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${ip}`,
    '-keyout', f('key.pem'), '-out', f('req.pem'));
  writeFileSync(f('ext.cnf'), `subjectAltName=IP:${ip}${name ? `,DNS:${name}` : ''}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n`);
  ssl('x509', '-req', '-in', f('req.pem'), '-CA', f('ca.pem'), '-CAkey', f('ca-key.pem'), '-CAcreateserial',
    '-days', '30', '-extfile', f('ext.cnf'), '-out', f('cert.pem'));
  return { ca: f('ca.pem'), cert: f('cert.pem'), key: f('key.pem') };
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
  /**
   * @param {RestrictedNet} net
   * @param {{display?: string, trustCa?: string}} [opts] `trustCa`: a CA (PEM) that
   *   Firefox's profile trusts (see {@link testCertificates}; Chromium ignores
   *   certificate errors anyway)
   */
  constructor(net, opts = {}) {
    super(opts);
    this.net = net;
    this.trustCa = opts.trustCa || '';
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
    /** @type {string|undefined} */
    let userDataDir;
    if (this.trustCa) {
      userDataDir = mkdtempSync(join(this.dir, 'firefox-profile-'));
      run('certutil', '-N', '--empty-password', '-d', `sql:${userDataDir}`);
      run('certutil', '-A', '-n', 'meshmeet test CA', '-t', 'C,,', '-i', this.trustCa, '-d', `sql:${userDataDir}`);
    }
    return puppeteer.launch({
      browser: 'firefox',
      executablePath: this.wrapper(FIREFOX),
      userDataDir,
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
