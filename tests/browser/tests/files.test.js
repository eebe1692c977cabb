// File sharing over the peer connections' data channel, in rooms of three (the first
// three browsers of each room of `rooms()`): a 5 MB file of random bytes sent to the
// two others arrives byte-identical (SHA-256 of the file behind each Save link), with
// progress shown on both sides; a transfer cancelled midway by its sender, and one
// cancelled by a receiver, leaves no Save link and no bytes held, while the transfers
// beside them complete; the size limit refuses a bigger file on the sending and on
// the receiving side; the receiver's parser refuses malformed frames, oversized
// declarations and bytes beyond the declared size, and garbage sent over a real
// channel ends no call; with one receiver's connection limited to 256 kbit/s (HTB on
// the namespace's loopback), the other receiver gets the file first and chat goes
// on, and the slow one gets it once the limit is lifted.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { Server, Browsers, featureRooms, joinAll, waitFor, text, step, myId } from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */
/** @typedef {import('../lib/harness.js').Participant} Participant */

/** @type {Server} */ let server;
/** @type {Browsers} */ let browsers;
const T = { timeout: 600_000 };
// Waits end as soon as their state is reached; these bounds only say when to give up.
const UI = 60_000;
const XFER = 240_000;
const MB5 = 5 * 1024 * 1024;

before(async () => {
  server = await new Server({ label: 'files' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

/**
 * Makes a file of random bytes in the page (kept as `window.__files[name]`) and
 * returns its SHA-256, hex.
 * @param {Page} page @param {string} name @param {number} size
 */
function makeFile(page, name, size) {
  return page.evaluate(async (name, size) => {
    const buf = new Uint8Array(size);
    for (let i = 0; i < size; i += 65536) crypto.getRandomValues(buf.subarray(i, Math.min(size, i + 65536)));
    const w = /** @type {any} */ (window);
    (w.__files ||= {})[name] = new File([buf], name, { type: 'application/octet-stream' });
    const h = new Uint8Array(await crypto.subtle.digest('SHA-256', buf));
    return Array.from(h, (b) => b.toString(16).padStart(2, '0')).join('');
  }, name, size);
}

/**
 * Sends a file made by makeFile the way a person does: picked in the Send file
 * button's file input, or dropped on the call. Returns the transfer's id (0 if the
 * page sent nothing). With `cancelMidway`, the sender's Cancel is pressed as soon as
 * a receiver's progress shows a value between 0 and 100.
 * @param {Page} page @param {string} name @param {{drop?: boolean, cancelMidway?: boolean}} [opts]
 */
function sendFile(page, name, opts = {}) {
  return page.evaluate((name, opts) => {
    const w = /** @type {any} */ (window);
    const before = document.querySelectorAll('li.file-item.mine').length;
    const dt = new DataTransfer();
    dt.items.add(w.__files[name]);
    if (opts.drop) {
      document.getElementById('grid')?.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    } else {
      const input = /** @type {HTMLInputElement} */ (document.getElementById('file-input'));
      input.files = dt.files;
      input.dispatchEvent(new Event('change'));
    }
    const items = document.querySelectorAll('li.file-item.mine');
    if (items.length === before) return 0;
    const li = /** @type {HTMLElement} */ (items[items.length - 1]);
    if (opts.cancelMidway) {
      const obs = new MutationObserver(() => {
        const vals = Array.from(li.querySelectorAll('progress')).map((p) => Number(p.getAttribute('aria-valuenow')));
        if (vals.some((v) => v > 0 && v < 100)) {
          obs.disconnect();
          w.__cancelAt = vals;
          /** @type {HTMLButtonElement} */ (li.querySelector('.file-cancel')).click();
        }
      });
      obs.observe(li, { subtree: true, attributes: true, attributeFilter: ['aria-valuenow'] });
    }
    return Number((li.dataset.transfer || '').split(':')[1]);
  }, name, opts);
}

/**
 * The local UDP port of the selected candidate pair of a page's connection with a
 * peer (the transport's selected pair, or the pair marked selected where the stats
 * have no transport entry naming it).
 * @param {Page} page @param {string} peer
 */
async function selectedLocalPort(page, peer) {
  const port = await page.evaluate(async (peer) => {
    const pc = /** @type {RTCPeerConnection} */ (/** @type {any} */ (window).meshmeet.peers.get(peer).pc);
    /** @type {Map<string, any>} */
    const st = new Map();
    (await pc.getStats()).forEach((v, k) => st.set(k, v));
    const all = Array.from(st.values());
    const tid = all.find((v) => v.type === 'transport' && v.selectedCandidatePairId)?.selectedCandidatePairId;
    const pair = (tid && st.get(tid)) || all.find((v) => v.type === 'candidate-pair' && v.selected) ||
      all.find((v) => v.type === 'candidate-pair' && v.nominated && v.state === 'succeeded');
    const local = pair && st.get(pair.localCandidateId);
    return local && local.protocol === 'udp' ? Number(local.port) : 0;
  }, peer);
  assert.ok(port > 0, 'a UDP pair is selected');
  return port;
}

/**
 * Limits the UDP traffic from and to one port on the namespace's loopback (where the
 * browsers' direct connections run) to 256 kbit/s, with a short queue (a long one
 * would hold packets for seconds, and consent checks with them).
 */
class Shaper {
  /** @param {number} port */
  constructor(port) {
    this.on = true;
    const tc = (/** @type {string[]} */ ...a) => execFileSync('tc', a, { stdio: ['ignore', 'ignore', 'pipe'] });
    tc('qdisc', 'add', 'dev', 'lo', 'root', 'handle', '1:', 'htb', 'default', '10');
    tc('class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', '1:10', 'htb', 'rate', '10gbit', 'quantum', '60000');
    tc('class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', '1:20', 'htb', 'rate', '256kbit', 'ceil', '256kbit');
    tc('qdisc', 'add', 'dev', 'lo', 'parent', '1:20', 'handle', '20:', 'pfifo', 'limit', '30');
    for (const dir of ['sport', 'dport']) {
      tc('filter', 'add', 'dev', 'lo', 'parent', '1:', 'protocol', 'ip', 'prio', '1', 'u32', 'match', 'ip', 'protocol', '17', '0xff',
        'match', 'ip', dir, String(port), '0xffff', 'flowid', '1:20');
    }
  }

  /** Packets that went through the limited class so far. */
  packets() {
    const out = execFileSync('tc', ['-s', 'class', 'show', 'dev', 'lo', 'classid', '1:20'], { encoding: 'utf8' });
    const m = /Sent \d+ bytes (\d+) pkt/.exec(out);
    return m ? Number(m[1]) : 0;
  }

  remove() {
    if (!this.on) return;
    this.on = false;
    execFileSync('tc', ['qdisc', 'del', 'dev', 'lo', 'root'], { stdio: 'ignore' });
  }
}

/** The item of a transfer from `from` on a receiver's page. @param {string} from @param {number} id */
const inItem = (from, id) => `li.file-item[data-transfer="in:${from}:${id}"]`;

/**
 * The SHA-256 (hex) of the file behind an item's Save link, and the link's file name.
 * The page's Content-Security-Policy (connect-src 'self') keeps fetch() off blob:
 * URLs, so the Blob is looked up by the link's own href among the object URLs the
 * page made.
 * @param {Page} page @param {string} sel
 */
function savedHash(page, sel) {
  return page.evaluate(async (sel) => {
    const a = /** @type {HTMLAnchorElement|null} */ (document.querySelector(`${sel} a.file-save`));
    if (!a) return null;
    const blob = /** @type {any} */ (window).meshmeet.files.saved.get(a.href);
    if (!blob) return { name: a.download, hash: 'no blob behind the link' };
    const h = new Uint8Array(await crypto.subtle.digest('SHA-256', await blob.arrayBuffer()));
    return { name: a.download, hash: Array.from(h, (b) => b.toString(16).padStart(2, '0')).join('') };
  }, sel);
}

/**
 * The page's record of a transfer (files.summary()).
 * @param {Page} page @param {'in'|'out'} dir @param {number} id @param {string} peer
 */
function record(page, dir, id, peer) {
  return page.evaluate((dir, id, peer) => /** @type {any} */ (window).meshmeet.files.summary()
    .find((/** @type {any} */ x) => x.dir === dir && x.id === id && (dir === 'in' ? x.from : x.to) === peer) || null, dir, id, peer);
}

/** Opens the chat panel (where transfers show) unless it is open. @param {Page} page */
async function openChat(page) {
  if (await page.$eval('#chat', (el) => /** @type {HTMLElement} */ (el).hidden)) await page.click('#btn-chat');
  await page.waitForSelector('#chat', { visible: true, timeout: UI });
}

/**
 * Accepts offers on a page at once, whatever their state by then (an offer the
 * sender has cancelled meanwhile has no visible Accept any more; its handler does
 * nothing then).
 * @param {Page} page @param {string[]} sels
 */
function acceptNow(page, sels) {
  return page.evaluate((sels) => {
    for (const s of sels) /** @type {HTMLButtonElement} */ (document.querySelector(`${s} .file-accept`)).click();
  }, sels);
}

/** Waits for an item's state (data-state). @param {Page} page @param {string} sel @param {string} state @param {string} what */
async function itemState(page, sel, state, what) {
  await waitFor(page, ({ sel, state }) => /** @type {HTMLElement|null} */ (document.querySelector(sel))?.dataset.state === state,
    { sel, state }, { timeout: XFER, interval: 100, what });
}

for (const { label, kinds } of featureRooms()) {
  const three = kinds.slice(0, 3);
  describe(`${label} room (${three.join(', ')})`, () => {
    /** @type {Participant[]} */ let people = [];
    /** @type {string[]} */ let ids = [];
    let up = false;
    /** @param {string} what */
    const note = (what) => step(`${label}: ${what}`);
    const call = () => {
      if (!up) throw new Error('the call of three did not come up');
      return people.map((p) => p.page);
    };

    before(async () => {
      people = await joinAll(browsers, three, `${server.url}/files-${label}`, ['Ann Send', 'Ben Bee', 'Cy Sea']);
      ids = await Promise.all(people.map((p) => myId(p.page)));
      for (const p of people) {
        await waitFor(p.page, () => {
          const mm = /** @type {any} */ (window).meshmeet;
          return mm.peers.size === 2 && Array.from(mm.peers.values()).every((x) => x.channel && x.channel.readyState === 'open');
        }, null, { timeout: XFER, what: `${p.name}'s data channels open` });
      }
      up = true;
      note('call of three up, data channels open');
    });

    after(async () => {
      for (const p of people) {
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
    });

    test('a 5 MB file reaches both others byte-identical, with progress on both sides', T, async () => {
      const [a, b, c] = call();
      // The first offer's m=application came with the first offer: no renegotiation for it.
      const sdp = await a.evaluate(() => Array.from(/** @type {any} */ (window).meshmeet.peers.values())
        .map((p) => /** @type {any} */ (p).pc.currentLocalDescription?.sdp || ''));
      for (const s of sdp) assert.match(s, /\nm=application /);
      assert.ok((await a.$eval('#btn-file', (el) => el.getAttribute('aria-label') || '')).length > 0, 'the Send file button has a label');
      const hash = await makeFile(a, 'random.bin', MB5);
      const id = await sendFile(a, 'random.bin');
      assert.ok(id > 0, 'the file was offered');
      for (const p of [b, c]) {
        await p.waitForSelector(inItem(ids[0], id), { timeout: UI });
        assert.equal(await text(p, `${inItem(ids[0], id)} .file-name span`), 'random.bin');
        assert.equal(await text(p, `${inItem(ids[0], id)} .file-size`), ' (5.0 MB)');
        assert.equal(await text(p, '#unread'), '1', 'the offer counts as unread while the chat is closed');
        await openChat(p);
        await p.click(`${inItem(ids[0], id)} .file-accept`);
      }
      await openChat(a);
      note('offer accepted by both');
      for (const [i, p] of [[1, b], [2, c]].map(([i, p]) => /** @type {[number, Page]} */ ([i, p]))) {
        await itemState(p, inItem(ids[0], id), 'done', `${people[i].name} has the file`);
        const saved = await savedHash(p, inItem(ids[0], id));
        assert.deepEqual(saved, { name: 'random.bin', hash }, `${people[i].name}'s Save link holds the same bytes`);
        const rec = await record(p, 'in', id, ids[0]);
        assert.equal(rec.received, MB5);
        assert.ok(rec.seen.some((/** @type {number} */ v) => v > 0 && v < 100), `${people[i].name} showed progress midway: ${rec.seen}`);
        assert.equal(await p.$eval(`${inItem(ids[0], id)} progress`, (el) => el.getAttribute('role')), 'progressbar');
      }
      await itemState(a, `li.file-item[data-transfer="out:${id}"]`, 'over', 'the sender done');
      for (const to of [ids[1], ids[2]]) {
        const rec = await record(a, 'out', id, to);
        assert.equal(rec.state, 'done');
        assert.equal(rec.acked, MB5);
        assert.ok(rec.seen.some((/** @type {number} */ v) => v > 0 && v < 100), `the sender showed progress midway: ${rec.seen}`);
      }
      note('5 MB delivered to both, hashes equal');
    });

    test('cancelled by the sender midway: no Save link, no bytes held; a file beside it completes', T, async () => {
      const [a, b, c] = call();
      const sender = b;
      const from = ids[1];
      await makeFile(sender, 'gone.bin', MB5);
      const hash = await makeFile(sender, 'kept.bin', MB5);
      const gone = await sendFile(sender, 'gone.bin', { cancelMidway: true });
      const kept = await sendFile(sender, 'kept.bin', { drop: true });
      assert.ok(gone > 0 && kept > 0);
      await Promise.all([a, c].map(async (p) => {
        await p.waitForSelector(inItem(from, kept), { timeout: UI });
        await acceptNow(p, [inItem(from, gone), inItem(from, kept)]);
      }));
      await itemState(sender, `li.file-item[data-transfer="out:${gone}"]`, 'over', 'the cancelled transfer over for the sender');
      let midway = 0;
      for (const p of [a, c]) {
        await itemState(p, inItem(from, gone), 'failed', 'the cancelled transfer ended');
        assert.equal(await p.$(`${inItem(from, gone)} a.file-save`), null, 'no Save link for a cancelled file');
        const rec = await record(p, 'in', gone, from);
        assert.equal(rec.reason, 'aborted');
        assert.equal(rec.held, 0, 'no bytes held');
        assert.ok(rec.received < MB5, `cancelled before the end (${rec.received})`);
        if (rec.received > 0) midway += 1;
        assert.equal(await text(p, `${inItem(from, gone)} .file-status`), 'Cancelled by the sender');
      }
      assert.ok(midway > 0, 'at least one receiver had part of the file when it was cancelled');
      for (const p of [a, c]) {
        await itemState(p, inItem(from, kept), 'done', 'the other file complete');
        assert.deepEqual(await savedHash(p, inItem(from, kept)), { name: 'kept.bin', hash });
      }
      for (const to of [ids[0], ids[2]]) {
        assert.equal((await record(sender, 'out', gone, to)).reason, 'cancelled');
      }
      note(`sender cancelled at ${JSON.stringify(await sender.evaluate(() => /** @type {any} */ (window).__cancelAt))}; the other file delivered`);
    });

    test('cancelled by one receiver midway: none for it, the other receiver gets the file', T, async () => {
      const [a, b, c] = call();
      const from = ids[2];
      const hash = await makeFile(c, 'third.bin', MB5);
      const id = await sendFile(c, 'third.bin');
      await a.waitForSelector(inItem(from, id), { timeout: UI });
      await b.waitForSelector(inItem(from, id), { timeout: UI });
      // Ann cancels as soon as her progress shows a value between 0 and 100.
      await a.evaluate((sel) => {
        const li = /** @type {HTMLElement} */ (document.querySelector(sel));
        const obs = new MutationObserver(() => {
          const v = Number(li.querySelector('progress')?.getAttribute('aria-valuenow'));
          if (v > 0 && v < 100) {
            obs.disconnect();
            /** @type {HTMLButtonElement} */ (li.querySelector('.file-cancel')).click();
          }
        });
        obs.observe(li, { subtree: true, attributes: true, attributeFilter: ['aria-valuenow'] });
      }, inItem(from, id));
      await a.click(`${inItem(from, id)} .file-accept`);
      await b.click(`${inItem(from, id)} .file-accept`);
      await itemState(a, inItem(from, id), 'failed', 'Ann cancelled');
      assert.equal(await a.$(`${inItem(from, id)} a.file-save`), null);
      const rec = await record(a, 'in', id, from);
      assert.equal(rec.reason, 'cancelled');
      assert.equal(rec.held, 0);
      assert.ok(rec.received > 0 && rec.received < MB5, `cancelled midway (${rec.received})`);
      await itemState(b, inItem(from, id), 'done', 'Ben has the file');
      assert.deepEqual(await savedHash(b, inItem(from, id)), { name: 'third.bin', hash });
      await itemState(c, `li.file-item[data-transfer="out:${id}"]`, 'over', 'the sender done');
      assert.equal((await record(c, 'out', id, ids[0])).reason, 'cancelled');
      assert.equal((await record(c, 'out', id, ids[1])).state, 'done');
      assert.equal(await text(c, `li.file-item[data-transfer="out:${id}"] li[data-peer="${ids[0]}"] .file-status`), 'Cancelled by the receiver');
      note('receiver cancelled midway; the other got the file');
    });

    test('one slow receiver: the other gets the file first, chat goes on, the slow one gets it too', T, async () => {
      const [a, b, c] = call();
      // Cy's connection with Ann limited to 256 kbit/s both ways (HTB on the
      // namespace's loopback, by Cy's UDP port of that connection): Ann's 5 MB takes
      // Cy at least 160 s, Ben none of that.
      const port = await selectedLocalPort(c, ids[0]);
      const shaper = new Shaper(port);
      try {
        const hash = await makeFile(a, 'slow.bin', MB5);
        const id = await sendFile(a, 'slow.bin');
        assert.ok(id > 0);
        for (const p of [b, c]) {
          await p.waitForSelector(inItem(ids[0], id), { timeout: XFER });
          await acceptNow(p, [inItem(ids[0], id)]);
        }
        await itemState(b, inItem(ids[0], id), 'done', 'Ben has the file');
        const slow = await record(c, 'in', id, ids[0]);
        assert.equal(slow.state, 'receiving', `Cy still receiving when Ben is done: ${JSON.stringify(slow)}`);
        assert.ok(slow.received < MB5);
        assert.ok(shaper.packets() > 0, 'the shaper held back Cy\'s connection');
        // Chat meanwhile: a line from Ann reaches both.
        await a.evaluate(() => /** @type {any} */ (window).meshmeet.chat('while Cy is still receiving'));
        for (const p of [b, c]) {
          await waitFor(p, () => /** @type {any} */ (window).meshmeet.chatLog.includes('while Cy is still receiving'),
            null, { timeout: UI, what: 'the chat line during a slow transfer' });
        }
        assert.equal((await record(c, 'in', id, ids[0])).state, 'receiving', 'Cy still receiving after the chat line');
        assert.deepEqual(await savedHash(b, inItem(ids[0], id)), { name: 'slow.bin', hash });
        note(`Ben done while Cy had ${slow.received} bytes; chat went through`);
        shaper.remove();
        await itemState(c, inItem(ids[0], id), 'done', 'Cy has the file once the limit is gone');
        assert.deepEqual(await savedHash(c, inItem(ids[0], id)), { name: 'slow.bin', hash });
      } finally {
        shaper.remove();
      }
    });

    test('the size limit: a bigger file is not sent, and a receiver refuses a bigger offer', T, async () => {
      const [a, b, c] = call();
      // Sending side: Ann's limit at 100 000 bytes.
      await a.evaluate(() => { /** @type {any} */ (window).meshmeet.files.maxBytes = 100_000; });
      await makeFile(a, 'big.bin', 200_000);
      assert.equal(await sendFile(a, 'big.bin'), 0, 'nothing sent above the limit');
      await waitFor(a, () => /(too big)/.test(document.getElementById('toast')?.textContent || ''), null, { timeout: UI, what: 'the too-big message' });
      assert.match(await text(a, '#toast') || '', /big\.bin is too big to send \(195 KB\); the limit is 97\.7 KB/);
      await a.evaluate(() => { /** @type {any} */ (window).meshmeet.files.maxBytes = 200 * 1024 * 1024; });
      // Receiving side: Ben's limit at 100 000 bytes; Cy takes the file.
      await b.evaluate(() => { /** @type {any} */ (window).meshmeet.files.maxBytes = 100_000; });
      const hash = await makeFile(a, 'big2.bin', 200_000);
      const id = await sendFile(a, 'big2.bin');
      assert.ok(id > 0);
      await itemState(b, inItem(ids[0], id), 'failed', 'Ben refused the offer');
      assert.equal(await text(b, `${inItem(ids[0], id)} .file-status`), 'Not received: bigger than the limit');
      assert.equal(await b.$(`${inItem(ids[0], id)} .file-accept:not([hidden])`), null, 'nothing to accept');
      await c.waitForSelector(inItem(ids[0], id), { timeout: UI });
      await c.click(`${inItem(ids[0], id)} .file-accept`);
      await itemState(c, inItem(ids[0], id), 'done', 'Cy has the file');
      assert.deepEqual(await savedHash(c, inItem(ids[0], id)), { name: 'big2.bin', hash });
      await itemState(a, `li.file-item[data-transfer="out:${id}"]`, 'over', 'the sender done');
      assert.equal((await record(a, 'out', id, ids[1])).reason, 'too_big');
      await b.evaluate(() => { /** @type {any} */ (window).meshmeet.files.maxBytes = 200 * 1024 * 1024; });
    });

    test('bad peer input: the parser refuses it, and garbage on a real channel ends no call', T, async () => {
      const [a, b] = call();
      const result = await a.evaluate(async () => {
        const { Link, MAX_CHUNK_BYTES } = await import('/assets/files.js');
        /** @type {any[]} */
        const sent = [];
        /** @type {any[]} */
        const events = [];
        const channel = {
          readyState: 'open', bufferedAmount: 0, bufferedAmountLowThreshold: 0,
          send: (/** @type {any} */ d) => { sent.push(typeof d === 'string' ? JSON.parse(d) : 'binary'); },
          addEventListener() {}, removeEventListener() {},
        };
        const link = new Link('peer', channel, {
          maxBytes: () => 1000,
          event: (ev) => { if (ev.type !== 'leg') events.push({ type: ev.type, id: ev.inc.id, state: ev.inc.state, reason: ev.inc.reason }); },
        });
        const chunk = (/** @type {number} */ id, /** @type {number} */ n) => {
          const f = new Uint8Array(4 + n);
          new DataView(f.buffer).setUint32(0, id);
          return f.buffer;
        };
        const json = (/** @type {object} */ o) => JSON.stringify(o);
        /** @type {Record<string, any>} */
        const out = {};
        const take = () => { const r = { sent: sent.splice(0), events: events.splice(0) }; return r; };
        link.receive('{not json');
        link.receive(json({ t: 'offer', id: -1, name: 'x', size: 1 }));
        link.receive(new Uint8Array([0, 0, 1]).buffer);
        link.receive('x'.repeat(5000));
        out.garbage = { ...take(), dropped: link.dropped };
        link.receive(json({ t: 'offer', id: 1, name: 'n'.repeat(300), size: 10 }));
        out.longName = take();
        link.receive(json({ t: 'offer', id: 2, name: 'big', size: 5000 }));
        out.oversized = take();
        link.receive(json({ t: 'offer', id: 3, name: 'frac', size: 1.5 }));
        out.badSize = take();
        link.receive(json({ t: 'offer', id: 4, name: 'ok.bin', size: 10 }));
        link.accept(4);
        link.receive(chunk(4, 8));
        link.receive(chunk(4, 8));
        out.tooMany = { ...take(), held: link.incoming.get(4)?.chunks.length, received: link.incoming.get(4)?.received };
        link.receive(json({ t: 'offer', id: 5, name: 'early', size: 10 }));
        link.receive(chunk(5, 4));
        out.notAccepted = take();
        link.receive(json({ t: 'offer', id: 6, name: 'short', size: 10 }));
        link.accept(6);
        link.receive(chunk(6, 4));
        link.receive(json({ t: 'end', id: 6 }));
        out.endEarly = take();
        link.receive(json({ t: 'offer', id: 7, name: 'huge chunk', size: 1000 }));
        link.accept(7);
        link.receive(chunk(7, MAX_CHUNK_BYTES + 1));
        out.hugeChunk = take();
        for (const id of [10, 11, 12, 13, 14]) link.receive(json({ t: 'offer', id, name: `f${id}`, size: 1 }));
        out.busy = take();
        for (const id of [10, 11, 12, 13]) link.decline(id);
        take();
        link.receive(json({ t: 'offer', id: 20, name: 'good', size: 4 }));
        link.accept(20);
        link.receive(chunk(20, 4));
        link.receive(json({ t: 'end', id: 20 }));
        out.good = { ...take(), size: (/** @type {any} */ (link.incoming.get(20))).blob?.size };
        return out;
      });
      assert.equal(result.garbage.dropped, 4, 'four malformed frames dropped');
      assert.deepEqual(result.garbage.sent, []);
      assert.deepEqual(result.garbage.events, []);
      assert.deepEqual(result.longName.sent, [{ t: 'refuse', id: 1, reason: 'invalid' }]);
      assert.deepEqual(result.longName.events, []);
      assert.deepEqual(result.oversized.sent, [{ t: 'refuse', id: 2, reason: 'too_big' }]);
      assert.deepEqual(result.oversized.events, [{ type: 'incoming', id: 2, state: 'failed', reason: 'too_big' }]);
      assert.deepEqual(result.badSize.sent, [{ t: 'refuse', id: 3, reason: 'invalid' }]);
      assert.deepEqual(result.tooMany.sent, [{ t: 'accept', id: 4 }, { t: 'refuse', id: 4, reason: 'invalid' }]);
      assert.equal(result.tooMany.held, 0, 'the partial file is let go');
      assert.equal(result.tooMany.events.at(-1).state, 'failed');
      assert.deepEqual(result.notAccepted.sent, [{ t: 'refuse', id: 5, reason: 'invalid' }]);
      assert.deepEqual(result.endEarly.sent.at(-1), { t: 'refuse', id: 6, reason: 'invalid' });
      assert.deepEqual(result.hugeChunk.sent.at(-1), { t: 'refuse', id: 7, reason: 'invalid' });
      assert.deepEqual(result.busy.sent, [{ t: 'refuse', id: 14, reason: 'busy' }], 'a fifth offer at once is refused');
      assert.deepEqual(result.good.sent.map((/** @type {any} */ m) => m.t), ['accept', 'ack', 'done']);
      assert.equal(result.good.size, 4);

      // Garbage over the real channel from Ben to Ann: dropped, or refused, and the call goes on.
      const before = await a.evaluate((from) => /** @type {any} */ (window).meshmeet.files.links.get(from).dropped, ids[1]);
      await b.evaluate((to) => {
        const ch = /** @type {any} */ (window).meshmeet.peers.get(to).channel;
        ch.send('{"t":');
        ch.send(JSON.stringify({ t: 'offer', id: 4242, name: 'huge', size: 1e12 }));
        ch.send(new Uint8Array([1, 2]));
        ch.send(JSON.stringify({ t: 'end', id: 999 }));
      }, ids[0]);
      await itemState(a, inItem(ids[1], 4242), 'failed', 'the oversized offer refused');
      await waitFor(a, ({ from, n }) => /** @type {any} */ (window).meshmeet.files.links.get(from).dropped >= n + 2,
        { from: ids[1], n: before }, { timeout: UI, what: 'the malformed frames dropped' });
      // Still in the call, on the same channel, and it still carries a file.
      const hash = await makeFile(b, 'after.bin', 30_000);
      const id = await sendFile(b, 'after.bin');
      await a.waitForSelector(inItem(ids[1], id), { timeout: UI });
      await a.click(`${inItem(ids[1], id)} .file-accept`);
      await itemState(a, inItem(ids[1], id), 'done', 'a file after the garbage');
      assert.deepEqual(await savedHash(a, inItem(ids[1], id)), { name: 'after.bin', hash });
      assert.ok(await a.evaluate(() => /** @type {any} */ (window).meshmeet.inCall));
    });
  });
}
