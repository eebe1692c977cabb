// A four-way Chromium call spread over two meshmeet nodes that share their rooms
// through NATS (docs/CLUSTER.md): two participants on each node, each decoding the
// other three's video and audio. The room is homed on the node its first participant
// joined; the other node forwards its participants' signaling there. A NATS server
// with JetStream runs on the namespace's loopback, beside the two nodes. Chromium
// only, whatever MESHMEET_ROOMS says: this is about the servers, not the browsers.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  Server, Browsers, participant, waitForMedia, waitFor, requireNetns,
} from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Participant} Participant */

/** @type {Server[]} */ const nodes = [];
/** @type {Browsers} */ let browsers;
/** @type {import('node:child_process').ChildProcess|null} */ let nats = null;
let natsDir = '';
/** @type {Participant[]} */ const people = [];
const NAMES = ['Ada Lovelace', 'Grace Hopper', 'Alan Turing', 'Katherine Johnson'];
/** Waits end when their state is reached; this bound only says when to give up. */
const WAIT = 60_000;

/** A free TCP port on loopback. @returns {Promise<number>} */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/**
 * Resolves once `check` does, trying every `interval` ms; rejects after `timeout`.
 * @param {() => Promise<boolean>} check @param {string} what
 */
async function until(check, what, timeout = WAIT, interval = 100) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** @param {number} port @returns {Promise<boolean>} */
function listening(port) {
  return new Promise((resolve) => {
    const c = connect(port, '127.0.0.1');
    c.once('connect', () => { c.destroy(); resolve(true); });
    c.once('error', () => resolve(false));
  });
}

/** The node's /healthz. @param {Server} node @returns {Promise<any>} */
function health(node) {
  return new Promise((resolve, reject) => {
    const req = request(`${node.url}/healthz`, { rejectUnauthorized: false, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => {
        try { resolve(JSON.parse(body)); } catch (e) { reject(e); }
      });
    });
    req.on('timeout', () => req.destroy(new Error('/healthz: no answer')));
    req.on('error', reject);
    req.end();
  });
}

before(async () => {
  requireNetns();
  const port = await freePort();
  natsDir = mkdtempSync(join(tmpdir(), 'meshmeet-nats-'));
  // A missing nats-server fails the test (spawn error), it is never skipped.
  const proc = spawn('nats-server', ['-js', '-a', '127.0.0.1', '-p', String(port), '-sd', natsDir], { stdio: 'ignore' });
  nats = proc;
  const reap = () => { if (proc.exitCode === null) proc.kill('SIGKILL'); };
  process.once('exit', reap);
  const failed = new Promise((_, reject) => {
    proc.once('error', (e) => reject(new Error(`nats-server: ${e.message}`)));
    proc.once('exit', (code) => reject(new Error(`nats-server exited with ${code}`)));
  });
  failed.catch(() => {});
  await Promise.race([failed, until(() => listening(port), 'nats-server to listen')]);
  const cluster = (/** @type {string} */ name) => [`nats_url = "nats://127.0.0.1:${port}"`, `node_name = "${name}"`];
  nodes.push(await new Server({ capacity: 4, label: 'cluster-1', cluster: cluster('node-1') }).start());
  nodes.push(await new Server({
    capacity: 4,
    label: 'cluster-2',
    cluster: cluster('node-2'),
    ports: { https: 8444, turn: 3479, turnTls: 5350, relay: '51000-51999' },
  }).start());
  // Both on NATS, with their buckets open, before anyone joins.
  for (const n of nodes) await until(async () => (await health(n)).cluster === 'ok', `${n.opts.label} on NATS`);
  browsers = new Browsers();
});

after(async () => {
  await Promise.all(people.map((p) => p.context.close().catch(() => {})));
  await browsers?.close();
  for (const n of nodes) await n.stop();
  if (nats && nats.exitCode === null) {
    const exited = new Promise((r) => nats?.once('exit', r));
    nats.kill('SIGTERM');
    await exited;
  }
  if (natsDir) rmSync(natsDir, { recursive: true, force: true });
});

test('four Chromium participants on two nodes see and hear each other', { timeout: 240_000 }, async () => {
  // Participants 0 and 2 on the first node, 1 and 3 on the second: every newcomer
  // offers to peers on both nodes.
  const urls = [0, 1, 2, 3].map((i) => `${nodes[i % 2].url}/cluster-call`);
  const opened = await Promise.all(urls.map((u, i) => participant(browsers, 'chromium', u, NAMES[i], { join: false })));
  people.push(...opened);
  for (const [i, p] of people.entries()) {
    await p.page.click('#join-btn');
    await waitFor(p.page, (n) => {
      const mm = /** @type {any} */ (window).meshmeet;
      return mm && mm.inCall && mm.peers.size === n;
    }, i, { timeout: WAIT, interval: 50, what: `${NAMES[i]} in the call` });
  }
  const pages = people.map((p) => p.page);
  await waitForMedia(pages, 4);

  // Everyone has the same four ids, each page its own and the three others.
  const ids = await Promise.all(pages.map((page) => page.evaluate(() => {
    const mm = /** @type {any} */ (window).meshmeet;
    return [mm.id, ...Array.from(mm.peers.keys())].sort();
  })));
  for (const v of ids) assert.deepEqual(v, ids[0]);
  assert.equal(new Set(ids[0]).size, 4);

  // The call really went through both nodes: one is the room's home, and each
  // forwarded to or delivered from the other.
  const metrics = await Promise.all(nodes.map((n) => n.metrics()));
  const homed = metrics.map((m) => Server.total(m, 'meshmeet_cluster_rooms_homed'));
  assert.deepEqual(homed.slice().sort(), [0, 1], `rooms homed per node: ${homed}`);
  for (const [i, m] of metrics.entries()) {
    assert.ok(Server.total(m, 'meshmeet_cluster_messages_total{direction="out"}') > 0, `node ${i + 1} sent over NATS`);
    assert.ok(Server.total(m, 'meshmeet_cluster_messages_total{direction="in"}') > 0, `node ${i + 1} received over NATS`);
  }
});
