// Room control in real browsers, in rooms of three one after another: all Chromium,
// all Firefox, and mixed (a Chromium host, a Firefox guest and a Firefox latecomer).
// In each: the first in is host; a host locks the room and a latecomer sees the
// locked screen; with the waiting room on the latecomer knocks, is denied (its
// session ends with 4003), knocks again, and the host admits it and it decodes
// everyone; a mute request turns a participant's microphone off and names who
// asked; a host makes another participant host; a host removes a participant, whose
// tile goes everywhere and whose page shows who did it and does not reconnect; a
// room password set by a host is asked of the latecomer, who gets in with it. One
// server and one browser of each kind for the file; each room has its own name,
// starts when the server holds nobody from the room before, and reuses its pages
// throughout. Firefox pages open one after another (Firefox answers getUserMedia
// only in the window that has the focus).

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Server, Browsers, rooms, newPage, waitFor, waitForMedia, settled, ensureArtifacts, text, attr, fill, step, myId } from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */
/** @typedef {import('../lib/harness.js').Participant} Participant */
/** @typedef {import('../lib/harness.js').Kind} Kind */

/** @type {Server} */ let server;
/** @type {Browsers} */ let browsers;
/** Each test's own limit: a starved machine is slow, a hung one is not waited on. */
const T = { timeout: 300_000 };
// Waits end as soon as their state is reached; these bounds only say when to give up
// (generous: other work may starve the machine's two cores).
/** a page reacting to a click or a signaling message */
const UI = 60_000;
/** a page loading, its devices opening */
const LOAD = 90_000;
/** media flowing after a join */
const MEDIA = 120_000;
/** the server letting go of the previous room's participants (beyond the 20 s resume grace) */
const DRAIN = 90_000;
const ROOM_PASSWORD = 'correct horse 7';

/**
 * Host, guest and latecomer per room of `rooms()`. Across the rooms Firefox is host,
 * guest and latecomer, and in the mixed room a Chromium host controls Firefox pages
 * while the Firefox latecomer decodes a Chromium and a Firefox page.
 * @type {Record<string, [Kind, Kind, Kind]>}
 */
const ROLES = {
  chromium: ['chromium', 'chromium', 'chromium'],
  firefox: ['firefox', 'firefox', 'firefox'],
  mixed: ['chromium', 'firefox', 'firefox'],
};

before(async () => {
  server = await new Server({ label: 'room' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

/**
 * Waits until the server's metrics satisfy `ok` (polled), for the server side of a
 * state the pages cannot see.
 * @param {(m: Map<string, number>) => boolean} ok @param {string} what @param {number} timeout
 */
async function serverState(ok, what, timeout) {
  const end = Date.now() + timeout;
  /** @type {Map<string, number>} */
  let m = new Map();
  for (;;) {
    m = await server.metrics();
    if (ok(m)) return m;
    if (Date.now() > end) {
      throw new Error(`waiting for ${what}: metrics ${JSON.stringify(Object.fromEntries([...m].filter(([k]) => k.startsWith('meshmeet_'))))}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** @param {Page} page */
const room = (page) => page.evaluate(() => /** @type {any} */ (window).meshmeet.room);
/** @param {Page} page @param {string} selector */
const visible = async (page, selector) => !!(await (await page.$(selector))?.isVisible());
/** @param {Page} page @param {string} what */
const inCall = (page, what) => waitFor(page, () => /** @type {any} */ (window).meshmeet.inCall, null, { timeout: UI, what });
/** @param {Page} page @param {string} title @param {string} what */
const screenTitled = (page, title, what) => waitFor(page, (want) => {
  const s = document.getElementById('screen');
  return !!s && !s.hidden && document.getElementById('screen-title')?.textContent === want;
}, title, { timeout: UI, what });
/**
 * Opens the host's menu on a participant's tile (closing any open one first: the
 * button toggles) and returns once it is up for that participant.
 * @param {Page} page @param {string} id
 */
async function openMenu(page, id) {
  if (await visible(page, '#tile-menu')) {
    await page.keyboard.press('Escape');
    await page.waitForSelector('#tile-menu', { hidden: true, timeout: UI });
  }
  await page.click(`.tile[data-key="${id}"] .tile-menu-btn`);
  await page.waitForSelector(`#tile-menu[data-for="${id}"]`, { visible: true, timeout: UI });
}
/** Clicks one item of the host's menu on a participant's tile. @param {Page} page @param {string} id @param {string} action */
async function tileAction(page, id, action) {
  await openMenu(page, id);
  await page.click(`#tile-menu[data-for="${id}"] [data-action="${action}"]`);
}
/** Opens the room panel, clicks a control in it, and closes it. @param {Page} page @param {string} selector */
async function panel(page, selector) {
  if (!(await visible(page, '#room-panel'))) await page.click('#btn-room');
  await page.waitForSelector(selector, { visible: true, timeout: UI });
  await page.click(selector);
  await page.click('#room-panel-close');
  await page.waitForSelector('#room-panel', { hidden: true, timeout: UI });
}

/**
 * The latecomer asks to join from the screen it is on (primary button) and waits in
 * the lobby; returns the id it knocks with, once the host's prompt for it is up.
 * @param {Page} a the host's page @param {Page} c the latecomer's
 */
async function knock(a, c) {
  await c.click('#screen-actions button.primary');
  await screenTitled(c, 'Waiting to be let in', 'the waiting screen');
  const id = await c.evaluate(() => /** @type {string} */ (/** @type {any} */ (window).meshmeet.room.waitingId));
  assert.match(id, /^[0-9a-f]{16}$/);
  const card = `#knocks .knock[data-id="${id}"]`;
  await a.waitForSelector(card, { visible: true, timeout: UI });
  assert.equal(await text(a, `${card} p`), 'Cy Late wants to join');
  assert.equal(await text(a, '#waiting-badge'), '1');
  return id;
}

for (const { label } of rooms()) {
  const [hostKind, guestKind, lateKind] = ROLES[label];
  describe(`${label} room (host ${hostKind}, guest ${guestKind}, latecomer ${lateKind})`, () => {
    /** @type {Participant} */ let host;
    /** @type {Participant} */ let guest;
    /** @type {Participant} */ let late;
    let roomUrl = '';
    /** The tests after the first need its call; without it they fail at once. */
    let up = false;
    const shot = (/** @type {string} */ what) => join(ensureArtifacts(), `${what}-${label}.png`);
    /** @param {string} what */
    const note = (what) => step(`${label}: ${what}`);

    before(async () => {
      roomUrl = `${server.url}/room-control-${label}`;
      // Nobody from an earlier room is still on the server (a page whose last leave
      // was lost is dropped after the resume grace): the peer counts below are this
      // room's alone.
      await serverState((m) => m.get('meshmeet_peers') === 0 && m.get('meshmeet_lobby_waiting') === 0,
        'no participants left on the server', DRAIN);
      note('room starts');
    });

    after(async () => {
      for (const p of [host, guest, late]) {
        if (!p) continue;
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
      note('room done');
    });

    /**
     * A participant of the given kind on the room page that presses Join as `name`.
     * Pages open one at a time (each waits for the one before), so a new Firefox
     * window has the focus while its devices open.
     * @param {Kind} kind @param {string} name
     * @returns {Promise<Participant>}
     */
    async function person(kind, name) {
      const { page, context, errors } = await newPage(browsers, kind);
      page.setDefaultNavigationTimeout(LOAD);
      page.setDefaultTimeout(UI);
      await page.goto(roomUrl);
      await waitFor(page, () => document.body.dataset.ready === 'true', null, { timeout: LOAD, what: 'the preview' });
      await fill(page, '#name', name);
      await page.click('#join-btn');
      note(`${name} (${kind}) pressed Join`);
      return { page, context, name, kind, errors };
    }

    const pages = () => {
      if (!up) throw new Error('the call of two did not come up');
      return { a: host.page, b: guest.page };
    };

    test('the first in is host: badge, room menu and host actions for it alone', T, async () => {
      host = await person(hostKind, 'Ada Host');
      await inCall(host.page, 'the host in the call');
      guest = await person(guestKind, 'Bo Guest');
      await inCall(guest.page, 'the guest in the call');
      const a = host.page;
      const b = guest.page;
      const aId = await myId(a);
      const bId = await myId(b);
      up = true;
      await waitFor(a, (id) => /** @type {any} */ (window).meshmeet.peers.has(id), bId, { timeout: UI, what: 'the guest tile' });
      // Everyone knows who the host is.
      for (const page of [a, b]) assert.deepEqual((await room(page)).hosts, [aId]);
      assert.equal((await room(a)).host, true);
      assert.equal((await room(b)).host, false);
      assert.equal(await visible(a, '.tile[data-key="self"] .tile-host'), true);
      await waitFor(b, (id) => {
        const badge = document.querySelector(`.tile[data-key="${id}"] .tile-host`);
        return !!badge && !/** @type {HTMLElement} */ (badge).hidden;
      }, aId, { timeout: UI, what: 'the host badge on the host tile' });
      assert.equal(await text(b, `.tile[data-key="${aId}"] .tile-host`), 'Host');
      // The room menu and the tile menus' host actions are the host's only; everyone
      // has a tile menu (the safety code).
      assert.equal(await visible(a, '#btn-room'), true);
      assert.equal(await visible(a, `.tile[data-key="${bId}"] .tile-menu-btn`), true);
      assert.equal(await visible(b, '#btn-room'), false);
      assert.equal(await attr(a, `.tile[data-key="${bId}"] .tile-menu-btn`, 'aria-label'), 'Options for Bo Guest');
      await openMenu(a, bId);
      assert.notEqual(await a.$('#tile-menu [data-action="kick"]'), null);
      await a.keyboard.press('Escape');
      await openMenu(b, aId);
      assert.notEqual(await b.$('#tile-menu [data-action="safety"]'), null);
      assert.equal(await b.$('#tile-menu [data-action="kick"]'), null);
      assert.equal(await b.$('#tile-menu [data-action="mute-audio"]'), null);
      await b.keyboard.press('Escape');
      await b.waitForSelector('#tile-menu', { hidden: true, timeout: UI });
    });

    test('a host locks the room: everyone sees the lock, a latecomer sees the locked screen', T, async () => {
      const { a, b } = pages();
      await panel(a, '#rc-lock');
      note('locked');
      for (const page of [a, b]) {
        await waitFor(page, () => {
          const el = document.getElementById('st-locked');
          return /** @type {any} */ (window).meshmeet.room.locked && !!el && !el.hidden;
        }, null, { timeout: UI, what: 'the lock icon' });
      }
      assert.equal(await attr(b, '#st-locked', 'aria-label'), 'Room locked');
      late = await person(lateKind, 'Cy Late');
      await screenTitled(late.page, 'This room is locked', 'the locked screen');
      note('locked screen shown');
      assert.equal(await late.page.evaluate(() => /** @type {any} */ (window).meshmeet.inCall), false);
      await late.page.screenshot({ path: shot('room-locked') });
    });

    test('waiting room: the latecomer knocks, is denied, knocks again, is admitted and decodes everyone', T, async () => {
      const { a, b } = pages();
      const c = late.page;
      await panel(a, '#rc-lobby');
      await waitFor(b, () => !document.getElementById('st-lobby')?.hidden, null, { timeout: UI, what: 'the waiting-room icon' });
      // The room stays locked: the waiting room is the only way in. The host gets a
      // prompt with the knocker's name; the guest (not a host) none.
      const first = await knock(a, c);
      assert.equal(await visible(b, '#knocks'), false);
      await a.screenshot({ path: shot('room-knock') });
      note('knock shown');
      // Denied: its screen, and the session ends with 4003 (no reconnect).
      await a.click(`#knocks .knock[data-id="${first}"] .knock-deny`);
      await screenTitled(c, 'You were not let in', 'the not-let-in screen');
      await waitFor(c, () => {
        const sig = /** @type {any} */ (window).meshmeet.signaling;
        return sig.endCode === 4003 && sig.stopped && sig.ws === null;
      }, null, { timeout: UI, what: 'the session ended with 4003' });
      await a.waitForSelector('#knocks', { hidden: true, timeout: UI });
      // Asking again is a new knock, under a new id.
      const cId = await knock(a, c);
      assert.notEqual(cId, first);
      const card = `#knocks .knock[data-id="${cId}"]`;
      await a.click(`${card} .knock-admit`);
      await inCall(c, 'the admitted latecomer in the call');
      assert.equal(await myId(c), cId, 'admitted under the id it knocked with');
      await a.waitForSelector('#knocks', { hidden: true, timeout: UI });
      await waitForMedia([c], 3, MEDIA);
      note('admitted; the latecomer decodes both');
      // Lobby off and unlocked again, seen by everyone.
      await panel(a, '#rc-lobby');
      await panel(a, '#rc-lock');
      for (const page of [a, b, c]) {
        await waitFor(page, () => {
          const r = /** @type {any} */ (window).meshmeet.room;
          return !r.locked && !r.lobby && document.getElementById('st-locked')?.hidden && document.getElementById('st-lobby')?.hidden;
        }, null, { timeout: UI, what: 'the room open again' });
      }
    });

    test('mute requests turn the microphone or camera off and say who asked', T, async () => {
      const { a, b } = pages();
      const c = late.page;
      const bId = await myId(b);
      const cId = await myId(c);
      assert.equal(await b.evaluate(() => /** @type {any} */ (window).meshmeet.peers.size), 2);
      await tileAction(a, bId, 'mute-audio');
      await waitFor(b, () => {
        const mm = /** @type {any} */ (window).meshmeet;
        const mic = document.getElementById('btn-mic')?.getAttribute('aria-pressed') === 'true';
        const track = Array.from(mm.peers.values()).every((/** @type {any} */ p) => {
          const t = p.audioTx?.sender.track;
          return !!t && !t.enabled;
        });
        return mic && track && mm.notices.includes('Ada Host (host) turned off your microphone.');
      }, null, { timeout: UI, what: 'the microphone off, with a notice naming the host' });
      assert.equal(await text(b, '#toast'), 'Ada Host (host) turned off your microphone.');
      // The usual media update reaches the others.
      for (const page of [a, c]) {
        await waitFor(page, (id) => document.querySelector(`.tile[data-key="${id}"]`)?.getAttribute('data-audio') === 'false',
          bId, { timeout: UI, what: 'the guest shown muted' });
      }
      // The camera: turned off and released.
      await tileAction(a, cId, 'mute-video');
      await waitFor(c, () => {
        const mm = /** @type {any} */ (window).meshmeet;
        return mm.localVideoState === 'ended' && mm.notices.includes('Ada Host (host) turned off your camera.');
      }, null, { timeout: UI, what: 'the camera off, with a notice naming the host' });
      await waitFor(a, (id) => document.querySelector(`.tile[data-key="${id}"]`)?.getAttribute('data-video') === 'false',
        cId, { timeout: UI, what: 'the latecomer shown with its camera off' });
      // A request never turns anything on: asking a muted guest again leaves it muted.
      await tileAction(a, bId, 'mute-audio');
      await waitFor(b, () => /** @type {any} */ (window).meshmeet.notices.length === 2, null, { timeout: UI, what: 'the second notice' });
      assert.equal(await attr(b, '#btn-mic', 'aria-pressed'), 'true');
      // The guest turns its own microphone back on (nobody else can).
      await b.click('#btn-mic');
      assert.equal(await attr(b, '#btn-mic', 'aria-pressed'), 'false');
      note('mute requests done');
    });

    test('a host makes another participant host', T, async () => {
      const { a, b } = pages();
      const c = late.page;
      const aId = await myId(a);
      const bId = await myId(b);
      await tileAction(a, bId, 'host');
      await waitFor(b, () => /** @type {any} */ (window).meshmeet.room.host &&
        !document.getElementById('btn-room')?.hidden, null, { timeout: UI, what: 'the guest a host, with the room menu' });
      assert.equal(await text(b, '#toast'), 'You are now a host of this room.');
      for (const page of [a, b, c]) {
        await waitFor(page, (want) => JSON.stringify(/** @type {any} */ (window).meshmeet.room.hosts) === JSON.stringify(want),
          [aId, bId], { timeout: UI, what: 'two hosts everywhere' });
      }
      await waitFor(c, (id) => !(/** @type {HTMLElement|null} */ (document.querySelector(`.tile[data-key="${id}"] .tile-host`)))?.hidden,
        bId, { timeout: UI, what: 'the host badge on the new host' });
      // The new host has the tile menu; the one already a host is not offered again.
      await openMenu(b, aId);
      assert.notEqual(await b.$('#tile-menu [data-action="kick"]'), null);
      assert.equal(await b.$('#tile-menu [data-action="host"]'), null);
      await b.keyboard.press('Escape');
      await b.waitForSelector('#tile-menu', { hidden: true, timeout: UI });
    });

    test('safety codes: both ends of a connection show the same code, another connection another; a changed certificate is flagged', T, async () => {
      const { a, b } = pages();
      const c = late.page;
      const aId = await myId(a);
      const bId = await myId(b);
      const cId = await myId(c);
      // The code of a connection, as one end's tile menu shows it (opened with the
      // keyboard: the menu button, then its first item).
      /** @param {Page} page @param {string} id */
      const shown = async (page, id) => {
        await waitFor(page, (peer) => !!/** @type {any} */ (window).meshmeet.safety[peer], id,
          { timeout: MEDIA, what: 'a safety code' });
        if (await visible(page, '#tile-menu')) {
          await page.keyboard.press('Escape');
          await page.waitForSelector('#tile-menu', { hidden: true, timeout: UI });
        }
        // (A Firefox window takes keys only while it has the focus.)
        await page.bringToFront();
        await page.focus(`.tile[data-key="${id}"] .tile-menu-btn`);
        await page.keyboard.press('Enter');
        await page.waitForSelector(`#tile-menu[data-for="${id}"] [data-action="safety"]`, { visible: true, timeout: UI });
        assert.equal(await page.evaluate(() => document.activeElement?.getAttribute('data-action')), 'safety');
        await page.keyboard.press('Enter');
        await page.waitForSelector('#safety-code[data-code]', { visible: true, timeout: UI });
        const code = /** @type {string} */ (await attr(page, '#safety-code', 'data-code'));
        assert.match(code, /^\d{3} \d{3}$/);
        assert.equal(await text(page, '#safety-code'), code);
        return code;
      };
      const ab = await shown(a, bId);
      assert.equal(await shown(b, aId), ab, 'both ends of a and b show one code');
      const ac = await shown(a, cId);
      assert.equal(await shown(c, aId), ac, 'both ends of a and c show one code');
      const bc = await shown(b, cId);
      assert.equal(await shown(c, bId), bc, 'both ends of b and c show one code');
      assert.equal(new Set([ab, ac, bc]).size, 3, `three connections, three codes: ${ab} / ${ac} / ${bc}`);
      for (const page of [a, b, c]) {
        await page.keyboard.press('Escape');
        await page.waitForSelector('#tile-menu', { hidden: true, timeout: UI });
      }
      // a marks b's code verified: the tile says so.
      await shown(a, bId);
      await a.click('#tile-menu [data-action="safety-verify"]');
      await a.waitForSelector('#tile-menu [data-action="safety-verify"][aria-pressed="true"]', { timeout: UI });
      await a.keyboard.press('Escape');
      await a.waitForSelector(`.tile[data-key="${bId}"][data-safety="verified"] .tile-safety`, { visible: true, timeout: UI });
      assert.equal(await text(a, `.tile[data-key="${bId}"] .tile-safety`), 'Verified');
      // b's page puts a new certificate on its connections (what a swap in the middle
      // would look like): a's code for b changes, a is told, the verified mark goes;
      // a's code for c stays.
      note('b changes its certificate');
      await b.evaluate(() => /** @type {any} */ (window).meshmeet.renewCertificate());
      await waitFor(a, (arg) => {
        const s = /** @type {any} */ (window).meshmeet.safety[arg.id];
        return !!s && s.code !== arg.old;
      }, { id: bId, old: ab }, { timeout: MEDIA, what: "a's new code for b" });
      const now = /** @type {any} */ (await a.evaluate((id) => /** @type {any} */ (window).meshmeet.safety[id], bId));
      assert.equal(now.verified, false);
      assert.equal(now.changed, true);
      assert.ok((await a.evaluate(() => /** @type {any} */ (window).meshmeet.notices)).includes(
        'The safety code with Bo Guest changed. Compare it again.'));
      await a.waitForSelector(`.tile[data-key="${bId}"][data-safety="changed"] .tile-safety`, { visible: true, timeout: UI });
      assert.equal(await text(a, `.tile[data-key="${bId}"] .tile-safety`), 'Code changed');
      const ab2 = await shown(a, bId);
      assert.notEqual(ab2, ab);
      // Looked at again: no longer flagged. Both ends agree on the new code.
      await a.waitForSelector(`.tile[data-key="${bId}"][data-safety=""]`, { timeout: UI });
      assert.equal(await shown(b, aId), ab2);
      assert.equal(await shown(c, aId), ac);
      for (const page of [a, b, c]) {
        await page.keyboard.press('Escape');
        await page.waitForSelector('#tile-menu', { hidden: true, timeout: UI });
      }
      // The replaced connections are up again before the next test.
      await settled([a, b, c], MEDIA);
    });

    test('a host removes a participant: its tile goes everywhere, it sees who did it, it does not reconnect', T, async () => {
      const { a, b } = pages();
      const c = late.page;
      const cId = await myId(c);
      // Count the sockets the page opens from now on.
      await c.evaluate(() => {
        const w = /** @type {any} */ (window);
        const Real = WebSocket;
        w.__socketsOpened = 0;
        w.WebSocket = class extends Real {
          constructor(/** @type {string} */ url, /** @type {any} */ p) { super(url, p); w.__socketsOpened += 1; }
        };
      });
      // Counted from here: the server counts the kicks of every room before this one,
      // and holds this room's three alone (it held nobody when the room started).
      const m0 = await server.metrics();
      const kicksBefore = Server.total(m0, 'meshmeet_kicks_total');
      const peersBefore = m0.get('meshmeet_peers');
      assert.equal(peersBefore, 3);
      await tileAction(a, cId, 'kick');
      // A second step: the menu asks first.
      await a.waitForSelector('#tile-menu .menu-question', { visible: true, timeout: UI });
      assert.equal(await text(a, '#tile-menu .menu-question'), 'Remove Cy Late from the call?');
      await a.click('#tile-menu [data-action="kick-confirm"]');
      await screenTitled(c, 'You were removed from the call', 'the removed screen');
      note('removed screen shown');
      assert.equal(await text(c, '#screen-text'), 'Ada Host (host) removed you from this call.');
      for (const page of [a, b]) {
        await waitFor(page, (id) => !document.querySelector(`.tile[data-key="${id}"]`) &&
          !/** @type {any} */ (window).meshmeet.peers.has(id), cId, { timeout: UI, what: 'the removed tile gone' });
      }
      // The page's session ended with 4002: no socket, no retry; its devices are released.
      await waitFor(c, () => {
        const sig = /** @type {any} */ (window).meshmeet.signaling;
        return sig.endCode === 4002 && sig.stopped && sig.ws === null;
      }, null, { timeout: UI, what: 'the session ended with 4002' });
      assert.equal(await c.evaluate(() => /** @type {any} */ (window).meshmeet.inCall), false);
      assert.equal(await c.evaluate(() => /** @type {any} */ (window).meshmeet.localVideoState), 'ended');
      await c.screenshot({ path: shot('room-kicked') });
      const m = await server.metrics();
      assert.equal(Server.total(m, 'meshmeet_kicks_total'), kicksBefore + 1);
      assert.equal(m.get('meshmeet_peers'), peersBefore - 1);
      // Still no new socket by now (the first retry would have come after 300 ms).
      assert.equal(await c.evaluate(() => /** @type {any} */ (window).__socketsOpened), 0);
    });

    test('a room password set by a host: the latecomer is asked for it and gets in with it', T, async () => {
      const { a, b } = pages();
      const c = late.page;
      if (!(await visible(a, '#room-panel'))) await a.click('#btn-room');
      await fill(a, '#rc-pw', ROOM_PASSWORD);
      await a.click('#rc-pw-set');
      await a.click('#room-panel-close');
      for (const page of [a, b]) {
        await waitFor(page, () => !document.getElementById('st-password')?.hidden, null, { timeout: UI, what: 'the password icon' });
      }
      assert.equal(await text(a, '#rc-pw-state'), 'A password is set. Newcomers must enter it.');
      // The removed participant comes back through the normal join: it decides to rejoin.
      await Promise.all([c.waitForNavigation(), c.click('#screen-actions button:not(.primary)')]);
      await waitFor(c, () => document.body.dataset.ready === 'true', null, { timeout: LOAD, what: 'the preview' });
      assert.equal(await c.$eval('#name', (el) => /** @type {HTMLInputElement} */ (el).value), 'Cy Late');
      await c.click('#join-btn');
      await screenTitled(c, 'This room has a password', 'the room password prompt');
      assert.equal(await text(c, '#screen-text'), 'A host of this room set a password. Enter it to join.');
      await fill(c, '#pw-input', 'not it');
      await c.click('#pw-form button');
      await waitFor(c, () => document.getElementById('screen-text')?.textContent === 'Wrong password. Try again.',
        null, { timeout: UI, what: 'the wrong-password note' });
      await fill(c, '#pw-input', ROOM_PASSWORD);
      await c.click('#pw-form button');
      await inCall(c, 'the latecomer in with the room password');
      await waitForMedia([c], 3, MEDIA);
      note('in with the room password; media flowing');
    });
  });
}
