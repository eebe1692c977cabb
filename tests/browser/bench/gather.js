// ICE gathering time in Chromium and Firefox for several lists of ICE server URLs,
// against the real server, on three networks made with lib/restricted.js:
//
//   nat         everything allowed, behind a NAT (a home network)
//   https-only  only TCP to the HTTPS port gets out (NATed too)
//   https-udp   TCP and UDP to the HTTPS port number get out
//
// For each browser, network and list it creates peer connections one after another
// (bundled, one data channel: one transport, as the client's connections) and times,
// from setLocalDescription: the first server-reflexive candidate, the first relay
// candidate, and the end of gathering (the null candidate), capped at CAP_S seconds.
// It also notes whether the browser warned about the number of URLs on its console.
// The server has a certificate from a test CA that Firefox's profile trusts, for its
// address and a host name (meshmeet.test, in the namespace's hosts file).
//
//   cargo build --bin meshmeet
//   cd tests/browser && MESHMEET_BIN=$PWD/../../target/debug/meshmeet npm run bench:gather
//
// Environment: REPS (runs per cell, default 3), CAP_S (default 45), BROWSERS
// (chromium,firefox), NETWORKS (nat,https-only,https-udp), LISTS (names below).
// Prints a Markdown table (medians, with min-max) and writes artifacts/gather.json.

import { createHmac } from 'node:crypto';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Server, newPage, ensureArtifacts, HOST_IP } from '../lib/harness.js';
import { RestrictedNet, RestrictedBrowsers, testCertificates } from '../lib/restricted.js';

/** @typedef {import('../lib/harness.js').Kind} Kind */

const HTTPS = 8443;
const MAIN = 3478;
const TLS = 5349;
const SECRET = 'browser-test-secret-0123456789';
const REPS = Number(process.env.REPS || 3);
const CAP_S = Number(process.env.CAP_S || 45);

// As in a real deployment, Firefox is given a host name with a certificate it trusts
// (it uses no `turns:` URL whose host is an IP address, and refuses a self-signed
// certificate for TURN over TLS). Chromium is given the address: it ignores
// certificate errors (a flag), and looks up TURN servers for UDP by DNS alone,
// which this sandbox has none of.
const NAME = 'meshmeet.test';

/** The URLs for `host`. @param {string} H */
const urls = (H) => ({
  stun: `stun:${H}:${MAIN}`,
  udp: `turn:${H}:${MAIN}?transport=udp`,
  udpHttps: `turn:${H}:${HTTPS}?transport=udp`,
  tcp: `turn:${H}:${MAIN}?transport=tcp`,
  tcpHttps: `turn:${H}:${HTTPS}?transport=tcp`,
  tlsHttps: `turns:${H}:${HTTPS}?transport=tcp`,
  tls5349: `turns:${H}:${TLS}?transport=tcp`,
});
/**
 * The URL lists measured: name, what it is, STUN URLs, TURN URLs.
 * @param {ReturnType<typeof urls>} U
 * @returns {{name: string, about: string, stun: string[], turn: string[]}[]}
 */
const lists = (U) => [
  { name: 'today', about: 'stun, udp 3478, tcp 3478, turns HTTPS', stun: [U.stun], turn: [U.udp, U.tcp, U.tlsHttps] },
  { name: 'today-nostun', about: 'today without stun', stun: [], turn: [U.udp, U.tcp, U.tlsHttps] },
  { name: 'today+udp443', about: 'today + udp HTTPS (installer config)', stun: [U.stun], turn: [U.udp, U.udpHttps, U.tcp, U.tlsHttps] },
  { name: 'today+tls5349', about: 'today + turns 5349', stun: [U.stun], turn: [U.udp, U.tcp, U.tlsHttps, U.tls5349] },
  { name: 'today+tcp443', about: 'today + tcp HTTPS', stun: [U.stun], turn: [U.udp, U.tcp, U.tcpHttps, U.tlsHttps] },
  { name: 'four', about: 'udp 3478, udp HTTPS, tcp HTTPS, turns HTTPS', stun: [], turn: [U.udp, U.udpHttps, U.tcpHttps, U.tlsHttps] },
  { name: 'all', about: 'every way in (7 URLs)', stun: [U.stun], turn: [U.udp, U.udpHttps, U.tcp, U.tcpHttps, U.tlsHttps, U.tls5349] },
];
const LIST_NAMES = lists(urls('h')).map((l) => l.name);

/** @type {Record<string, import('../lib/restricted.js').Allow>} */
const NETWORKS = {
  nat: { server: HOST_IP, httpsPort: HTTPS, all: true },
  'https-only': { server: HOST_IP, httpsPort: HTTPS },
  'https-udp': { server: HOST_IP, httpsPort: HTTPS, udp: true },
};

/** @param {string|undefined} env @param {string[]} all */
function pick(env, all) {
  const want = (env || '').split(',').map((s) => s.trim()).filter(Boolean);
  for (const w of want) if (!all.includes(w)) throw new Error(`unknown: ${w} (one of ${all.join(', ')})`);
  return want.length ? want : all;
}

/** TURN REST credentials, as the server hands out. */
function credentials() {
  const username = `${Math.floor(Date.now() / 1000) + 3600}:gather-bench`;
  return { username, credential: createHmac('sha1', SECRET).update(username).digest('base64') };
}

/**
 * One gathering, in the page: times in ms from setLocalDescription (null: not seen
 * before the end or the cap).
 * @param {import('puppeteer-core').Page} page
 * @param {RTCIceServer[]} iceServers
 */
function gatherOnce(page, iceServers) {
  return page.evaluate(async (servers, capMs) => {
    const pc = new RTCPeerConnection({ iceServers: servers, bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' });
    pc.createDataChannel('gather');
    /** @type {number|null} */ let srflx = null;
    /** @type {number|null} */ let relay = null;
    let relayVia = '';
    /** @type {Record<string, number>} */ const counts = {};
    let t0 = 0;
    const done = new Promise((resolve) => {
      const timer = setTimeout(() => resolve(null), capMs);
      pc.onicecandidate = (e) => {
        const now = performance.now() - t0;
        const c = e.candidate;
        if (!c || !c.candidate) {
          clearTimeout(timer);
          resolve(now);
          return;
        }
        const type = c.type || (c.candidate.match(/ typ (\w+)/) || [])[1] || '?';
        counts[type] = (counts[type] || 0) + 1;
        if (type === 'srflx' && srflx === null) srflx = now;
        if (type === 'relay' && relay === null) {
          relay = now;
          relayVia = /** @type {any} */ (e).url || /** @type {any} */ (c).url || String(/** @type {any} */ (c).relayProtocol || '');
        }
      };
    });
    t0 = performance.now();
    await pc.setLocalDescription();
    const end = await done;
    pc.close();
    return { srflx, relay, relayVia, end, counts };
  }, iceServers, CAP_S * 1000);
}

/** @param {(number|null)[]} xs */
function summary(xs) {
  const seen = xs.filter((x) => x !== null).map((x) => Math.round(/** @type {number} */ (x))).sort((a, b) => a - b);
  if (!seen.length) return '-';
  const med = seen[Math.floor((seen.length - 1) / 2)];
  const missing = xs.length - seen.length;
  const range = seen.length > 1 ? ` (${seen[0]}-${seen[seen.length - 1]})` : '';
  return `${med}${range}${missing ? ` [${missing} none]` : ''}`;
}

async function main() {
  const kinds = /** @type {Kind[]} */ (pick(process.env.BROWSERS, ['chromium', 'firefox']));
  const networks = pick(process.env.NETWORKS, Object.keys(NETWORKS));
  const wanted = pick(process.env.LISTS, LIST_NAMES);
  const certDir = mkdtempSync(join(tmpdir(), 'meshmeet-gather-ca-'));
  const certs = testCertificates(certDir, HOST_IP, NAME);
  const net = RestrictedNet.create({ nat: true });
  net.hosts({ [NAME]: HOST_IP });
  const server = await new Server({
    turn: [`extra_udp_listen = ["${HOST_IP}:${HTTPS}"]`], tls: { cert: certs.cert, key: certs.key },
  }).start();
  const browsers = new RestrictedBrowsers(net, { trustCa: certs.ca });
  /** @type {any[]} */
  const rows = [];
  try {
    for (const network of networks) {
      net.firewall(NETWORKS[network]);
      for (const kind of kinds) {
        const { page, context, errors } = await newPage(browsers, kind);
        const host = kind === 'firefox' ? NAME : HOST_IP;
        await page.goto(`https://${host}:${HTTPS}/healthz`);
        for (const list of lists(urls(host)).filter((l) => wanted.includes(l.name))) {
          const cred = credentials();
          /** @type {RTCIceServer[]} */
          const iceServers = [];
          if (list.stun.length) iceServers.push({ urls: list.stun });
          iceServers.push({ urls: list.turn, ...cred });
          const warningsBefore = errors.length;
          const runs = [];
          for (let i = 0; i < REPS; i++) runs.push(await gatherOnce(page, iceServers));
          const warnings = errors.slice(warningsBefore).filter((e) => /server|STUN|TURN/i.test(e));
          const row = {
            network, kind, list: list.name, about: list.about, urls: list.stun.length + list.turn.length, runs,
            warned: warnings.length > 0, warning: warnings[0] || '',
          };
          rows.push(row);
          console.error(`${network} ${kind} ${list.name}: relay ${summary(runs.map((r) => r.relay))} ms, ` +
            `end ${summary(runs.map((r) => r.end))} ms, srflx ${summary(runs.map((r) => r.srflx))} ms, ` +
            `first relay via ${runs.map((r) => r.relayVia).join(' | ')}, candidates ${JSON.stringify(runs[0].counts)}` +
            `${row.warned ? `, warned: ${row.warning}` : ''}`);
        }
        await context.close();
      }
    }
  } finally {
    await browsers.close();
    await server.stop();
    net.destroy();
    rmSync(certDir, { recursive: true, force: true });
  }
  const out = join(ensureArtifacts(), 'gather.json');
  writeFileSync(out, JSON.stringify({ reps: REPS, capS: CAP_S, rows }, null, 2));
  console.log(`\nICE gathering, ms from setLocalDescription: median (min-max) of ${REPS}; ` +
    `"-" = none within ${CAP_S} s; warned = console warning about the number of URLs\n`);
  console.log('| network | browser | list | URLs | first srflx | first relay | end of candidates | warned |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    console.log(`| ${r.network} | ${r.kind} | ${r.list} (${r.about}) | ${r.urls} | ${summary(r.runs.map((/** @type {any} */ x) => x.srflx))} | ` +
      `${summary(r.runs.map((/** @type {any} */ x) => x.relay))} | ${summary(r.runs.map((/** @type {any} */ x) => x.end))} | ${r.warned ? 'yes' : 'no'} |`);
  }
  console.log(`\nraw: ${out}`);
}

await main();
