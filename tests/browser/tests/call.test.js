// A four-way call in real Chromium against the real server: media, tile states,
// chat, screen share, signaling resume, room full, leave.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Netns, Server, launchBrowser, participant, waitForMedia, pollPage, ensureArtifacts } from '../lib/harness.js';

/** @type {Netns} */ let ns;
/** @type {Server} */ let server;
/** @type {Awaited<ReturnType<typeof launchBrowser>>} */ let chrome;
/** @type {Awaited<ReturnType<typeof participant>>[]} */ let people = [];
const NAMES = ['Ada Lovelace', 'Grace Hopper', 'Alan Turing', 'Katherine Johnson'];
let roomUrl = '';

before(async () => {
  ns = new Netns();
  server = await new Server(ns, { capacity: 4 }).start();
  chrome = await launchBrowser(ns);
  roomUrl = `${server.url}/weekly-sync`;
});

after(async () => {
  for (const p of people) {
    if (p.errors.length) console.log(`page errors (${p.name}):`, p.errors.join('\n'));
  }
  await chrome?.close();
  await server?.stop();
  ns?.destroy();
});

/** @param {import('playwright-core').Page} page */
const ids = (page) => page.evaluate(() => Array.from(/** @type {any} */ (window).meshmeet.peers.keys()));
/** @param {import('playwright-core').Page} page */
const myId = (page) => page.evaluate(() => /** @type {any} */ (window).meshmeet.id);

test('four participants: everyone decodes video and receives audio from the other three', async () => {
  for (const [i, name] of NAMES.entries()) {
    people.push(await participant(chrome.browser, roomUrl, name, {
      viewport: i === 0 ? { width: 1280, height: 720 } : { width: 800, height: 500 },
    }));
  }
  const pages = people.map((p) => p.page);
  await waitForMedia(pages, 4);
  for (const page of pages) {
    const s = await page.evaluate(() => /** @type {any} */ (window).meshmeet.stats());
    assert.equal(Object.keys(s).length, 3);
    for (const peer of Object.values(s)) {
      assert.equal(peer.connectionState, 'connected');
      assert.ok(peer.framesDecoded > 0 && peer.audioPackets > 0, JSON.stringify(peer));
    }
    // Host candidates are on one network here, so the pair is normally direct; on a
    // starved machine ICE may use the relay pair for a while. Either way the tile
    // says which one it is.
    await pollPage(page, async () => {
      const st = await /** @type {any} */ (window).meshmeet.stats();
      return Object.values(st).every((/** @type {any} */ p) => p.path &&
        p.state === (p.path.local === 'relay' || p.path.remote === 'relay' ? 'relay' : 'direct') &&
        document.querySelector(`.tile[data-key="${p.id}"]`)?.getAttribute('data-state') === p.state);
    }, null, { timeout: 15000, what: 'tile connection state matching the selected pair' });
    // Names on the tiles, and the direct-connection state.
    await page.waitForFunction(() => document.querySelectorAll('.tile').length === 4);
  }
  const names = await pages[0].$$eval('.tile .tile-name', (els) => els.map((e) => e.textContent));
  for (const n of NAMES.slice(1)) assert.ok(names.includes(n), `${n} in ${names}`);
  assert.ok(names.some((n) => n?.startsWith('Ada Lovelace')));
  // Mesh-aware limits: three other peers share the uplink budget.
  const limits = await pages[0].evaluate(() => /** @type {any} */ (window).meshmeet.limits);
  assert.ok(limits.video.maxBitrate <= 700_000 && limits.video.scale > 1, JSON.stringify(limits));
  const enc = await pages[0].evaluate(() => {
    const mm = /** @type {any} */ (window).meshmeet;
    return Array.from(mm.peers.values()).map((p) => p.videoTx.sender.getParameters().encodings[0]);
  });
  for (const e of enc) {
    assert.equal(e.maxBitrate, limits.video.maxBitrate);
    assert.equal(e.scaleResolutionDownBy, limits.video.scale);
  }
});

test('active speaker, ICE credential renewal and ICE restart', async () => {
  const [a, b] = people.map((p) => p.page);
  // The fake microphone beeps: some tile lights up as the active speaker.
  await a.waitForFunction(() => document.querySelector('.tile.speaking') !== null, null, { timeout: 15000, polling: 100 });
  // Renewal: a new username (EXPIRY:ID) is applied to every connection.
  const before = await a.evaluate(() => {
    const mm = /** @type {any} */ (window).meshmeet;
    return Array.from(mm.peers.values()).map((p) => JSON.stringify(p.pc.getConfiguration().iceServers));
  });
  await new Promise((r) => setTimeout(r, 1100));
  await a.evaluate(() => /** @type {any} */ (window).meshmeet.renewIce());
  await a.waitForFunction((old) => {
    const mm = /** @type {any} */ (window).meshmeet;
    return Array.from(mm.peers.values()).every((p, i) => JSON.stringify(p.pc.getConfiguration().iceServers) !== old[i]);
  }, before, { timeout: 15000 });
  // ICE restart on one pair: new credentials in the SDP, same connection, media flows.
  const bId = await myId(b);
  const ufrag = (/** @type {string} */ sdp) => (sdp.match(/a=ice-ufrag:(\S+)/) || [])[1];
  const sdpBefore = await a.evaluate((id) => /** @type {any} */ (window).meshmeet.peers.get(id).pc.localDescription.sdp, bId);
  await a.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), bId);
  await a.waitForFunction(([id, old]) => {
    const pc = /** @type {any} */ (window).meshmeet.peers.get(id).pc;
    const m = pc.localDescription.sdp.match(/a=ice-ufrag:(\S+)/);
    return pc.signalingState === 'stable' && m && m[1] !== old && pc.connectionState === 'connected';
  }, [bId, ufrag(sdpBefore)], { timeout: 20000 });
  await waitForMedia(people.map((p) => p.page), 4, 20000);
});

test('screenshot of the four-way call', async () => {
  const page = people[0].page;
  const dir = ensureArtifacts();
  // Wait until every remote tile shows video (not the avatar).
  await page.waitForFunction(() => document.querySelectorAll('.tile:not(.no-video)').length === 4);
  await page.screenshot({ path: join(dir, 'four-way-call.png') });
  await people[1].page.setViewportSize({ width: 390, height: 800 });
  await people[1].page.screenshot({ path: join(dir, 'four-way-call-phone.png') });
  await people[1].page.setViewportSize({ width: 800, height: 500 });
});

test('mute and camera-off show on the other tiles', async () => {
  const [a, b, c, d] = people.map((p) => p.page);
  const bId = await myId(b);
  await b.click('#btn-mic');
  await b.click('#btn-cam');
  assert.equal(await b.getAttribute('#btn-mic', 'aria-pressed'), 'true');
  // Camera off releases the device.
  await b.waitForFunction(() => /** @type {any} */ (window).meshmeet.localVideoState === 'ended');
  for (const page of [a, c, d]) {
    await page.waitForFunction((id) => {
      const el = document.querySelector(`.tile[data-key="${id}"]`);
      return !!el && el.classList.contains('is-muted') && el.classList.contains('no-video') &&
        el.querySelector('.tile-icons .icon') !== null;
    }, bId, { timeout: 15000 });
  }
  await b.keyboard.press('m');
  await b.keyboard.press('v');
  for (const page of [a, c, d]) {
    await page.waitForFunction((id) => {
      const el = document.querySelector(`.tile[data-key="${id}"]`);
      return !!el && !el.classList.contains('is-muted') && !el.classList.contains('no-video');
    }, bId, { timeout: 15000 });
  }
  // The reopened camera's frames reach everyone again.
  await waitForMedia([a, b, c, d], 4, 20000);
});

test('chat reaches everyone in order, with an unread count', async () => {
  const pages = people.map((p) => p.page);
  const log = (/** @type {import('playwright-core').Page} */ page) => page.evaluate(() => /** @type {any} */ (window).meshmeet.chatLog);
  // Turns: each participant sends three lines; all four see every line, in one order.
  /** @type {string[]} */
  const turns = [];
  for (let i = 0; i < 4; i++) {
    const lines = [0, 1, 2].map((k) => `turn ${k} from ${i}`);
    await pages[i].evaluate((ls) => { for (const l of ls) /** @type {any} */ (window).meshmeet.chat(l); }, lines);
    turns.push(...lines);
    await Promise.all(pages.map((page) => page.waitForFunction((n) => /** @type {any} */ (window).meshmeet.chatLog.length >= n, turns.length, { timeout: 15000 })));
  }
  for (const page of pages) assert.deepEqual(await log(page), turns);
  // A burst from everyone at once: every line arrives everywhere in one order, and
  // each sender's lines keep their order.
  /** @type {string[]} */
  const burst = [];
  await Promise.all(pages.map((page, i) => page.evaluate((i) => {
    const mm = /** @type {any} */ (window).meshmeet;
    for (let k = 0; k < 3; k++) mm.chat(`message ${k} from ${i}`);
  }, i)));
  for (let i = 0; i < 4; i++) for (let k = 0; k < 3; k++) burst.push(`message ${k} from ${i}`);
  const total = turns.length + burst.length;
  await Promise.all(pages.map((page) => page.waitForFunction((n) => /** @type {any} */ (window).meshmeet.chatLog.length >= n, total, { timeout: 15000 })));
  const first = (await log(pages[0])).slice(turns.length);
  for (const page of pages) {
    const got = (await log(page)).slice(turns.length);
    assert.deepEqual(got, first, 'the same order everywhere');
    assert.deepEqual([...got].sort(), [...burst].sort());
    for (let i = 0; i < 4; i++) {
      assert.deepEqual(got.filter((/** @type {string} */ l) => l.endsWith(`from ${i}`)), [0, 1, 2].map((k) => `message ${k} from ${i}`));
    }
  }
  // Typed through the UI, and counted as unread on a closed panel.
  await pages[3].click('#btn-chat');
  await pages[3].fill('#chat-input', '안녕하세요 everyone');
  await pages[3].press('#chat-input', 'Enter');
  await pages[0].waitForFunction(() => /** @type {any} */ (window).meshmeet.chatLog.includes('안녕하세요 everyone'));
  await pages[3].screenshot({ path: join(ensureArtifacts(), 'chat.png') });
  const unread = await pages[0].textContent('#unread');
  assert.equal(unread, '19', 'eighteen lines from the others plus one typed');
  await pages[3].click('#chat-close');
});

test('screen share starts and stops, and the others see it', async () => {
  const [a, b, c, d] = people.map((p) => p.page);
  const aId = await myId(a);
  await a.click('#btn-share');
  await a.waitForFunction(() => document.querySelector('.tile[data-key="self:screen"]') !== null, null, { timeout: 20000 });
  for (const page of [b, c, d]) {
    await pollPage(page, async (id) => {
      if (!document.querySelector(`.tile[data-key="${id}:screen"]`)) return false;
      const mm = /** @type {any} */ (window).meshmeet;
      const s1 = (await mm.stats())[id].screenFrames;
      await new Promise((r) => setTimeout(r, 500));
      const s2 = (await mm.stats())[id].screenFrames;
      return s2 > s1;
    }, aId, { timeout: 30000, what: "screen frames decoded" });
  }
  await a.screenshot({ path: join(ensureArtifacts(), 'screen-share.png') });
  await a.click('#btn-share');
  for (const page of [b, c, d]) {
    await page.waitForFunction((id) => document.querySelector(`.tile[data-key="${id}:screen"]`) === null, aId, { timeout: 20000 });
  }
  // Camera video keeps flowing after the renegotiations.
  await waitForMedia([a, b, c, d], 4, 20000);
});

test('signaling drops and resumes: media keeps flowing, connections are kept', async () => {
  const pages = people.map((p) => p.page);
  const c = pages[2];
  const before = await c.evaluate(async () => {
    const mm = /** @type {any} */ (window).meshmeet;
    /** @type {any} */ (window).__pcs = Array.from(mm.peers.values()).map((p) => p.pc);
    return { id: mm.id, stats: await mm.stats() };
  });
  const cId = before.id;
  const serialAtA = async () => (await pages[0].evaluate(() => /** @type {any} */ (window).meshmeet.stats()))[cId];
  const aBefore = await serialAtA();
  // A 10 s outage (the socket closes without `leave`, as on a network drop).
  await c.evaluate(() => /** @type {any} */ (window).meshmeet.dropSocket(10000));
  const sample = () => c.evaluate(async () => {
    const mm = /** @type {any} */ (window).meshmeet;
    const down = !mm.signaling.joined && !document.getElementById('banner')?.hidden;
    return { down, stats: await mm.stats() };
  });
  const early = await sample();
  await new Promise((r) => setTimeout(r, 2000));
  const during = await sample();
  assert.ok(early.down && during.down, 'the socket is down and the banner shows');
  for (const id of Object.keys(before.stats)) {
    assert.ok(during.stats[id].framesDecoded > early.stats[id].framesDecoded, 'frames decoded during the outage');
    assert.ok(during.stats[id].audioPackets > early.stats[id].audioPackets, 'audio received during the outage');
  }
  await c.waitForFunction(() => {
    const mm = /** @type {any} */ (window).meshmeet;
    return mm.signaling.joined && document.getElementById('banner')?.hidden;
  }, null, { timeout: 30000 });
  await new Promise((r) => setTimeout(r, 500));
  const afterStats = await c.evaluate(() => /** @type {any} */ (window).meshmeet.stats());
  const same = await c.evaluate(() => {
    const mm = /** @type {any} */ (window).meshmeet;
    const pcs = /** @type {any} */ (window).__pcs;
    const now = Array.from(mm.peers.values()).map((p) => p.pc);
    return { id: mm.id, samePcs: pcs.length === now.length && pcs.every((pc, i) => pc === now[i]) };
  });
  assert.equal(same.id, cId, 'resumed with the same id');
  assert.ok(same.samePcs, 'peer connections were not recreated');
  for (const id of Object.keys(before.stats)) {
    assert.equal(afterStats[id].serial, before.stats[id].serial);
    assert.ok(afterStats[id].framesDecoded > during.stats[id].framesDecoded, 'frames decoded across the outage');
    assert.ok(afterStats[id].audioPackets > before.stats[id].audioPackets);
  }
  // The others never saw C leave, and kept their connections to it.
  for (const page of [pages[0], pages[1], pages[3]]) {
    assert.ok((await ids(page)).includes(cId));
  }
  const aAfter = await serialAtA();
  assert.equal(aAfter.serial, aBefore.serial);
  assert.ok(aAfter.framesDecoded > aBefore.framesDecoded);
  await waitForMedia(pages, 4, 20000);
});

test('at capacity, the next participant sees the room-full screen', async () => {
  const extra = await participant(chrome.browser, roomUrl, 'Latecomer');
  await extra.page.waitForFunction(() => !document.getElementById('screen')?.hidden, null, { timeout: 20000 });
  const title = await extra.page.textContent('#screen-title');
  assert.equal(title, 'This room is full');
  assert.match(await extra.page.textContent('#screen-text') || '', /4/);
  await extra.context.close();
});

test('a participant leaves: its tile goes within 2 s and its connections close', async (t) => {
  const pages = people.map((p) => p.page);
  const leaver = pages[3];
  const leaverId = await myId(leaver);
  await leaver.evaluate(() => {
    /** @type {any} */ (window).__pcs = Array.from(/** @type {any} */ (window).meshmeet.peers.values()).map((p) => p.pc);
  });
  // Timestamps are taken inside the pages (one machine, one clock), so the
  // measurement excludes the test driver's own round trips.
  for (const page of pages.slice(0, 3)) {
    await page.evaluate((id) => {
      const w = /** @type {any} */ (window);
      w.__leaverPc = w.meshmeet.peers.get(id).pc;
      w.__goneAt = 0;
      const grid = /** @type {HTMLElement} */ (document.getElementById('grid'));
      new MutationObserver(() => {
        if (!w.__goneAt && !grid.querySelector(`.tile[data-key="${id}"]`)) w.__goneAt = Date.now();
      }).observe(grid, { childList: true });
    }, leaverId);
  }
  await leaver.evaluate(() => {
    document.getElementById('btn-leave')?.addEventListener('click', () => { /** @type {any} */ (window).__clickAt = Date.now(); }, { capture: true });
  });
  await leaver.click('#btn-leave');
  const clickAt = await leaver.evaluate(() => /** @type {any} */ (window).__clickAt);
  await Promise.all(pages.slice(0, 3).map((page) => page.waitForFunction((id) =>
    /** @type {any} */ (window).__goneAt > 0 &&
    /** @type {any} */ (window).__leaverPc.signalingState === 'closed' &&
    !/** @type {any} */ (window).meshmeet.peers.has(id), leaverId, { timeout: 15000, polling: 50 })));
  for (const page of pages.slice(0, 3)) {
    const goneAt = await page.evaluate(() => /** @type {any} */ (window).__goneAt);
    assert.ok(goneAt - clickAt < 2000, `tile gone ${goneAt - clickAt} ms after the click`);
    t.diagnostic(`tile gone ${goneAt - clickAt} ms after the click`);
  }
  const closed = await leaver.evaluate(() => /** @type {any} */ (window).__pcs.every((pc) => pc.signalingState === 'closed'));
  assert.ok(closed, 'leaver closed all its connections');
  assert.equal(await leaver.textContent('#screen-title'), 'You left the call');
  await waitForMedia(pages.slice(0, 3), 3, 20000);
});

test('closing the tab sends leave: the others drop its tile at once, not after the resume grace', async () => {
  const [a, b, c] = people.map((p) => p.page);
  const cId = await myId(c);
  await c.close();
  await Promise.all([a, b].map((page) => page.waitForFunction((id) =>
    document.querySelector(`.tile[data-key="${id}"]`) === null && !/** @type {any} */ (window).meshmeet.peers.has(id),
  cId, { timeout: 15000, polling: 50 })));
  await waitForMedia([a, b], 2, 20000);
});
