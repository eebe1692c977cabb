// Four-way calls against the real server, in three rooms one after another: all
// Chromium, all Firefox, and Firefox and Chromium mixed. In each: media, tile states,
// active speaker and ICE restart, mute and camera-off, chat, screen share, signaling
// resume, a server restart in the middle of the call, leaving; in the mixed room also
// a minute of CPU load beside the call. One server, one Xvfb and one browser of each
// kind for the file; each room's four pages load at once and join one by one.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import {
  Server, Browsers, startXvfb, rooms, participant, joinAll, waitForMedia, waitFor, ensureArtifacts, text, attr,
  fill, dishonestTiles, describeCall, firstFrames, settled, myId,
} from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */
/** @typedef {import('../lib/harness.js').Participant} Participant */

/** @type {Server} */ let server;
/** @type {Awaited<ReturnType<typeof startXvfb>>} */ let xvfb;
/** @type {Browsers} */ let browsers;
const NAMES = ['Ada Lovelace', 'Grace Hopper', 'Alan Turing', 'Katherine Johnson'];
/** Each test's own limit: a starved machine is slow, a hung one is not waited on. */
const T = { timeout: 240_000 };
// Waits end as soon as their state is reached; these bounds only say when to give up.
/** a page reacting to a click or a signaling message */
const UI = 30_000;
/** media flowing again after a change (renegotiation, restart, a peer gone) */
const MEDIA = 60_000;
/** how long the CPU hog runs beside the mixed room's call */
const LOAD_S = 60;

/**
 * Runs stress-ng for `seconds` with two CPU workers; resolves when it has ended.
 * @param {number} seconds
 */
function cpuHog(seconds) {
  const proc = spawn('stress-ng', ['--cpu', '2', '--timeout', `${seconds}s`, '--quiet'], { stdio: 'ignore' });
  const reap = () => { if (proc.exitCode === null) proc.kill('SIGKILL'); };
  process.once('exit', reap);
  return new Promise((resolve, reject) => {
    proc.on('error', reject);
    proc.on('exit', (code) => {
      process.off('exit', reap);
      if (code === 0) resolve(undefined);
      else reject(new Error(`stress-ng exited with ${code}`));
    });
  });
}

before(async () => {
  server = await new Server({ capacity: 4, label: 'call' }).start();
  // Firefox shares a screen only from a display; it runs on this one.
  xvfb = await startXvfb();
  browsers = new Browsers({ display: xvfb.display });
});

after(async () => {
  await browsers?.close();
  await xvfb?.stop();
  await server?.stop();
});

/** @param {Page} page */
const ids = (page) => page.evaluate(() => /** @type {string[]} */ (Array.from(/** @type {any} */ (window).meshmeet.peers.keys())));
/** @param {Page} page */
const stats = (page) => page.evaluate(() => /** @type {Promise<Record<string, any>>} */ (/** @type {any} */ (window).meshmeet.stats()));

/**
 * Starves Firefox's page `page` of its signaling with peer `id`, as a page that gets no
 * CPU would be: from the moment the peer's next (restart) offer arrives, however slow
 * the machine is to make it, and for 6 s, the peer's candidates reach the page 8 s
 * late, and the page's answer and candidates reach the peer 8 s late. With
 * `stripOfferCandidates` that offer also arrives without its candidates (as from a
 * client that sends none in its descriptions). The page records its connection's
 * states in `window.__states`.
 * @param {Page} page @param {string} id @param {boolean} stripOfferCandidates
 */
function starveSignaling(page, id, stripOfferCandidates) {
  return page.evaluate(([peerId, strip]) => {
    const w = /** @type {any} */ (window);
    const sig = w.meshmeet.signaling;
    let until = 0;
    let armed = true;
    const send = sig.send.bind(sig);
    sig.send = (/** @type {any} */ m) => {
      if (Date.now() < until && m.to === peerId && (m.type === 'answer' || m.type === 'candidate')) setTimeout(() => send(m), 8000);
      else send(m);
    };
    const onMessage = sig.handlers.onMessage;
    sig.handlers.onMessage = (/** @type {any} */ m) => {
      if (armed && m.from === peerId && m.type === 'offer') {
        armed = false;
        until = Date.now() + 6000;
        onMessage(strip ? { ...m, sdp: m.sdp.replace(/^a=(candidate|end-of-candidates).*\r\n/gm, '') } : m);
      } else if (Date.now() < until && m.from === peerId && m.type === 'candidate') setTimeout(() => onMessage(m), 8000);
      else onMessage(m);
    };
    w.__states = [];
    const pc = w.meshmeet.peers.get(peerId).pc;
    pc.addEventListener('connectionstatechange', () => w.__states.push(pc.connectionState));
  }, /** @type {[string, boolean]} */ ([id, stripOfferCandidates]));
}

for (const room of rooms()) {
  describe(`${room.label} room (${room.kinds.join(', ')})`, () => {
    /** @type {Participant[]} */
    const people = [];
    /** @type {Participant[]} pages beyond the four (closed with the room) */
    const extras = [];
    let roomUrl = '';
    let up = false;
    const shot = (/** @type {string} */ what) => join(ensureArtifacts(), `${what}-${room.label}.png`);
    /** The tests after the first need its call; without it they fail at once. */
    const pages = () => {
      if (!up) throw new Error('the four-way call did not come up');
      return people.map((p) => p.page);
    };

    before(() => { roomUrl = `${server.url}/weekly-sync-${room.label}`; });

    after(async () => {
      for (const p of [...people, ...extras]) {
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
    });

    test("four participants: everyone decodes video and receives audio from the other three", { timeout: 400_000 }, async (t) => {
      people.push(...await joinAll(browsers, room.kinds, roomUrl, NAMES, (i) => ({
        viewport: i === 0 ? { width: 1280, height: 720 } : { width: 800, height: 500 },
      })));
      const all = people.map((p) => p.page);
      await waitForMedia(all, 4, 120_000);
      up = true;
      t.diagnostic((await firstFrames(all)).text);
      await Promise.all(all.map(async (page) => {
        const s = await stats(page);
        assert.equal(Object.keys(s).length, 3);
        for (const peer of Object.values(s)) {
          if (!(peer.framesDecoded > 0 && peer.audioPackets > 0)) assert.fail(`${JSON.stringify(peer)}\n${await describeCall(page)}`);
        }
        // Every connection is up, and its tile says which path it is on. Host candidates
        // are on one network here, so the pair is normally direct; on a starved machine
        // ICE may use the relay pair for a while. The tile re-reads the pair every 2 s.
        await waitFor(page, async () => {
          const st = await /** @type {any} */ (window).meshmeet.stats();
          return document.querySelectorAll('.tile').length === 4 &&
            Object.values(st).every((/** @type {any} */ p) => p.connectionState === 'connected' && p.path &&
            p.state === (p.path.local === 'relay' || p.path.remote === 'relay' ? 'relay' : 'direct') &&
            document.querySelector(`.tile[data-key="${p.id}"]`)?.getAttribute('data-state') === p.state);
        }, null, { timeout: UI, interval: 250, what: 'four tiles, connections up, tiles matching the selected pair' });
      }));
      // No tile claimed a path before its connection was connected.
      for (const page of all) assert.deepEqual(await dishonestTiles(page), []);
      const names = await all[0].$$eval('.tile .tile-name', (els) => els.map((e) => e.textContent));
      for (const n of NAMES.slice(1)) assert.ok(names.includes(n), `${n} in ${names}`);
      assert.ok(names.some((n) => n?.startsWith('Ada Lovelace')));
      // Mesh-aware limits: three other peers share the uplink budget.
      await Promise.all(all.map(async (page) => {
        const limits = await page.evaluate(() => /** @type {any} */ (window).meshmeet.limits);
        assert.ok(limits.video.maxBitrate <= 700_000 && limits.video.scale > 1, JSON.stringify(limits));
        await waitFor(page, (lim) => {
          const mm = /** @type {any} */ (window).meshmeet;
          return Array.from(mm.peers.values()).every((/** @type {any} */ p) => {
            const e = p.videoTx.sender.getParameters().encodings[0];
            return e && e.maxBitrate === lim.video.maxBitrate && e.scaleResolutionDownBy === lim.video.scale;
          });
        }, limits, { timeout: UI, what: 'sender limits on every connection' });
      }));
    });

    test('active speaker, ICE credential renewal and ICE restart', T, async () => {
      const [a, b] = pages();
      // The fake microphones make sound: some tile lights up as the active speaker.
      await waitFor(a, () => document.querySelector('.tile.speaking') !== null, null, { timeout: UI, what: 'an active speaker' });
      // Renewal: a new username (EXPIRY:ID) is applied to every connection.
      const before = await a.evaluate(() => {
        const mm = /** @type {any} */ (window).meshmeet;
        return Array.from(mm.peers.values()).map((p) => JSON.stringify(p.pc.getConfiguration().iceServers));
      });
      // The username carries an expiry in whole seconds: the next second gives a new one.
      await waitFor(a, (t0) => Date.now() >= t0 + 1000, Date.now(), { what: 'the next second' });
      await a.evaluate(() => /** @type {any} */ (window).meshmeet.renewIce());
      await waitFor(a, (old) => {
        const mm = /** @type {any} */ (window).meshmeet;
        return Array.from(mm.peers.values()).every((p, i) => JSON.stringify(p.pc.getConfiguration().iceServers) !== old[i]);
      }, before, { timeout: UI, what: 'new ICE credentials on every connection' });
      // ICE restart on one pair: new credentials in the SDP, same connection, media flows.
      // First every connection settled: a restart of the client's own (after a
      // consent-check blip on a busy machine) would refuse the ones asked for here.
      await settled(pages());
      const bId = await myId(b);
      const ufrag = (/** @type {string} */ sdp) => (sdp.match(/a=ice-ufrag:(\S+)/) || [])[1];
      const sdpBefore = await a.evaluate((id) => /** @type {any} */ (window).meshmeet.peers.get(id).pc.localDescription.sdp, bId);
      // One restart at a time: a second request while the first is under way is refused.
      const started = await a.evaluate((id) => {
        const mm = /** @type {any} */ (window).meshmeet;
        return [mm.restartIce(id), mm.restartIce(id)];
      }, bId);
      assert.deepEqual(started, [true, false]);
      await waitFor(a, ([id, old]) => {
        const pc = /** @type {any} */ (window).meshmeet.peers.get(id).pc;
        const m = pc.localDescription.sdp.match(/a=ice-ufrag:(\S+)/);
        return pc.signalingState === 'stable' && m && m[1] !== old && pc.connectionState === 'connected' &&
          !/** @type {any} */ (window).meshmeet.peers.get(id).restarting;
      }, [bId, ufrag(sdpBefore)], { timeout: MEDIA, what: 'the ICE restart to complete' });
      // A restart offered by the side that answered first (B answered C's offer): in
      // the mixed room Chromium offers to Firefox, whose answer names the other DTLS
      // role; the connection must still complete its negotiation.
      const c = pages()[2];
      const cId = await myId(c);
      await settled(pages());
      assert.equal(await b.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), cId), true);
      await waitFor(b, (id) => {
        const p = /** @type {any} */ (window).meshmeet.peers.get(id);
        return p.pc.signalingState === 'stable' && p.pc.connectionState === 'connected' && !p.restarting;
      }, cId, { timeout: MEDIA, what: 'the restart offered by the first answerer to complete' });
      await waitForMedia(pages(), 4, MEDIA);
    });

    if (room.label === 'mixed') {
      /**
       * On `page`, drops the next message of `type` it sends to peer `to` (as a
       * signaling socket that dies with it would); `window.__lost` turns 1 when it has.
       * @param {Page} page @param {string} to @param {'offer'|'answer'} type
       */
      const loseNext = (page, to, type) => page.evaluate(([id, kind]) => {
        const w = /** @type {any} */ (window);
        const sig = w.meshmeet.signaling;
        const send = sig.send.bind(sig);
        w.__lost = 0;
        sig.send = (/** @type {any} */ m) => {
          if (m.type === kind && m.to === id && w.__lost === 0) {
            w.__lost = 1;
            sig.send = send;
            return;
          }
          send(m);
        };
      }, [to, type]);
      /**
       * The ICE restart `from` started towards `to` has completed: `from` sent its
       * offer again (the first went unanswered), both connections are stable and
       * connected, and each side has the other's new ICE credentials. Or, on a machine
       * so busy that the Firefox side's new ICE generation failed before the offer came
       * again (it has nothing it may nominate without the lost answer's other half),
       * the connection was replaced by a new one, which is then connected and stable
       * on both sides. Returns which way it went: how many times the offer was sent
       * again, and how many times the connection was replaced.
       * @param {Page} fromPage @param {Page} toPage @param {string} fromId @param {string} toId
       * @param {{ufrag: string, unanswered: number, renewals: number}} old `from`'s ICE
       *   username fragment, count of offers sent again and of connections replaced,
       *   before the restart
       */
      const restarted = async (fromPage, toPage, fromId, toId, old) => {
        await waitFor(fromPage, ([id, was]) => {
          const p = /** @type {any} */ (window).meshmeet.peers.get(id);
          const ufrag = (p.pc.currentLocalDescription?.sdp.match(/a=ice-ufrag:(\S+)/) || [])[1];
          return (p.renewals > was.renewals || p.unanswered > was.unanswered) && p.pc.signalingState === 'stable' &&
            p.pc.connectionState === 'connected' && !p.restarting && ufrag && ufrag !== was.ufrag;
        }, /** @type {[string, {ufrag: string, unanswered: number, renewals: number}]} */ ([toId, old]), { timeout: 2 * MEDIA, interval: 250, what: 'the unanswered offer sent again, answered, and the restart complete (or the connection replaced)' });
        const ufrags = (/** @type {Page} */ page, /** @type {string} */ id) => page.evaluate((peer) => {
          const pc = /** @type {any} */ (window).meshmeet.peers.get(peer).pc;
          const u = (/** @type {string|undefined} */ sdp) => ((sdp || '').match(/a=ice-ufrag:(\S+)/) || [])[1];
          return { local: u(pc.currentLocalDescription?.sdp), remote: u(pc.currentRemoteDescription?.sdp), state: pc.signalingState };
        }, id);
        await waitFor(toPage, (id) => /** @type {any} */ (window).meshmeet.peers.get(id).pc.signalingState === 'stable',
          fromId, { timeout: UI, what: 'the other side stable' });
        const [f, t] = [await ufrags(fromPage, toId), await ufrags(toPage, fromId)];
        assert.equal(t.remote, f.local, `both sides on the new ICE credentials: ${JSON.stringify({ f, t })}`);
        assert.equal(f.remote, t.local, `both sides on the new ICE credentials: ${JSON.stringify({ f, t })}`);
        const now = await ufragTo(fromPage, toId);
        return `sent again ${now.unanswered - old.unanswered}, replaced ${now.renewals - old.renewals}`;
      };
      /**
       * Our ICE username fragment on the connection to `id`, and how many offers on it
       * went out again for want of an answer.
       * @param {Page} page @param {string} id
       */
      const ufragTo = (page, id) => page.evaluate((peer) => {
        const p = /** @type {any} */ (window).meshmeet.peers.get(peer);
        return {
          // (none while a connection that was just replaced has not been negotiated yet)
          ufrag: /** @type {string} */ (((p.pc.currentLocalDescription?.sdp || '').match(/a=ice-ufrag:(\S+)/) || [])[1] || ''),
          unanswered: /** @type {number} */ (p.unanswered),
          renewals: /** @type {number} */ (p.renewals),
        };
      }, id);

      test('an offer lost on the way is sent again and answered (from Firefox and from Chromium)', T, async (t) => {
        // Every connection settled first: the recovery of the test before cannot overlap.
        await settled(pages());
        const [a, b, c] = pages();
        const [aId, bId, cId] = [await myId(a), await myId(b), await myId(c)];
        const before = [await ufragTo(a, bId), await ufragTo(b, cId)];
        // The next offer each sends is dropped before it reaches the server; then each
        // restarts ICE towards the next page: Firefox to Chromium, Chromium to Firefox.
        await Promise.all([loseNext(a, bId, 'offer'), loseNext(b, cId, 'offer')]);
        assert.deepEqual(await Promise.all([
          a.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), bId),
          b.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), cId),
        ]), [true, true]);
        const how = await Promise.all([restarted(a, b, aId, bId, before[0]), restarted(b, c, bId, cId, before[1])]);
        t.diagnostic(`Firefox to Chromium: ${how[0]}; Chromium to Firefox: ${how[1]}`);
        for (const page of [a, b]) assert.equal(await page.evaluate(() => /** @type {any} */ (window).__lost), 1, 'an offer was dropped');
        await waitForMedia(pages(), 4, MEDIA);
      });

      test('an answer lost on the way: the offer comes again and gets the same answer (to Firefox and to Chromium)', T, async (t) => {
        // Every connection settled first: the recovery of the test before cannot overlap.
        await settled(pages());
        const [a, b, c] = pages();
        const [aId, bId, cId] = [await myId(a), await myId(b), await myId(c)];
        const before = [await ufragTo(a, bId), await ufragTo(b, cId)];
        // The answer each offer gets is dropped: Chromium's answer to Firefox, and
        // Firefox's answer to Chromium.
        await Promise.all([loseNext(b, aId, 'answer'), loseNext(c, bId, 'answer')]);
        assert.deepEqual(await Promise.all([
          a.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), bId),
          b.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), cId),
        ]), [true, true]);
        const how = await Promise.all([restarted(a, b, aId, bId, before[0]), restarted(b, c, bId, cId, before[1])]);
        t.diagnostic(`Firefox to Chromium: ${how[0]}; Chromium to Firefox: ${how[1]}`);
        for (const page of [b, c]) assert.equal(await page.evaluate(() => /** @type {any} */ (window).__lost), 1, 'an answer was dropped');
        await waitForMedia(pages(), 4, MEDIA);
      });

      test('an ICE restart answered by Firefox while its peer is starved (candidates and answer 8 s late): media flows again, and a failed Firefox connection is replaced', T, async (t) => {
        // Every connection settled first: the recovery of the test before cannot overlap.
        await settled(pages());
        const [a, b] = pages();
        const [aId, bId] = [await myId(a), await myId(b)];
        // On Firefox's page (A): for 6 s from the restart offer, the Chromium peer's candidates reach
        // A 8 s late, and A's answer and candidates reach it 8 s late: nothing to check
        // on either side for 8 s, as with a peer whose page gets no CPU. A Firefox
        // connection that fails (Firefox gives up on a new ICE generation with nothing
        // to check after 5 s) never sends again; the offer carries its first
        // candidates so that A has a pair to check at once.
        await starveSignaling(a, bId, false);
        assert.equal(await b.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), aId), true);
        await waitFor(b, (id) => {
          const p = /** @type {any} */ (window).meshmeet.peers.get(id);
          return p.pc.signalingState === 'stable' && p.pc.connectionState === 'connected' && !p.restarting;
        }, aId, { timeout: MEDIA, what: 'the restart to complete' });
        await waitForMedia(pages(), 4, MEDIA);
        const states = await a.evaluate(() => /** @type {string[]} */ (/** @type {any} */ (window).__states));
        // The first candidates in the offer usually keep Firefox from failing (a new ICE
        // generation with nothing to check fails there after 5 s); on a busy machine it
        // may fail anyway, and then both sides must have replaced the connection.
        if (states.includes('failed')) {
          const renewed = [
            await a.evaluate((id) => /** @type {any} */ (window).meshmeet.peers.get(id).renewals, bId),
            await b.evaluate((id) => /** @type {any} */ (window).meshmeet.peers.get(id).renewals, aId),
          ];
          t.diagnostic(`Firefox's connection failed (states: ${states.join(', ')}); connections replaced: ${renewed.join(', ')}`);
          assert.ok(renewed[0] >= 1 && renewed[1] >= 1, `Firefox's connection failed and was not replaced on both sides: ${renewed.join(', ')}`);
        } else {
          t.diagnostic(`Firefox's connection states: ${states.join(', ') || 'none'} (never failed)`);
        }
      });

      test('a Firefox connection that fails anyway is replaced by a new one on both sides, and media flows both ways again', T, async () => {
        // Every connection settled first: the recovery of the test before cannot overlap.
        await settled(pages());
        const [a, b] = pages();
        const [aId, bId] = [await myId(a), await myId(b)];
        // As above, and the Chromium peer's restart offer reaches Firefox without its
        // candidates (as from a client that sends none in its descriptions): Firefox
        // has nothing to check for 8 s and fails the connection, for good (it would
        // send no media on it again). It is replaced: a new connection on each side.
        const renewalsBefore = await Promise.all([a.evaluate((id) => /** @type {any} */ (window).meshmeet.peers.get(id).renewals, bId),
          b.evaluate((id) => /** @type {any} */ (window).meshmeet.peers.get(id).renewals, aId)]);
        await starveSignaling(a, bId, true);
        assert.equal(await b.evaluate((id) => /** @type {any} */ (window).meshmeet.restartIce(id), aId), true);
        await waitFor(a, (id) => /** @type {any} */ (window).__states.includes('failed'), bId,
          { timeout: UI, what: "Firefox's connection failed (the injected fault)" });
        // Both sides replaced their connection, and the new ones are up.
        for (const [page, id, before] of /** @type {[Page, string, number][]} */ ([[a, bId, renewalsBefore[0]], [b, aId, renewalsBefore[1]]])) {
          await waitFor(page, ([peer, was]) => {
            const p = /** @type {any} */ (window).meshmeet.peers.get(peer);
            return p.renewals > was && p.pc.connectionState === 'connected' && p.pc.signalingState === 'stable' && !p.restarting;
          }, /** @type {[string, number]} */ ([id, before]), { timeout: MEDIA, interval: 250, what: 'a new connection, connected' });
        }
        await waitForMedia(pages(), 4, MEDIA);
        await settled(pages());
      });
    }

    test('screenshot of the four-way call', T, async () => {
      const [a, b] = pages();
      // Wait until every tile shows video (not the avatar).
      await waitFor(a, () => document.querySelectorAll('.tile:not(.no-video)').length === 4, null, { what: 'video on every tile' });
      await a.screenshot({ path: shot('four-way-call') });
      await b.setViewport({ width: 390, height: 800 });
      await b.screenshot({ path: shot('four-way-call-phone') });
      await b.setViewport({ width: 800, height: 500 });
    });

    test('mute and camera-off show on the other tiles', T, async () => {
      const [a, b, c, d] = pages();
      const bId = await myId(b);
      await b.click('#btn-mic');
      await b.click('#btn-cam');
      assert.equal(await attr(b, '#btn-mic', 'aria-pressed'), 'true');
      // Camera off releases the device.
      await waitFor(b, () => /** @type {any} */ (window).meshmeet.localVideoState === 'ended', null, { what: 'the camera released' });
      await Promise.all([a, c, d].map((page) => waitFor(page, (id) => {
        const el = document.querySelector(`.tile[data-key="${id}"]`);
        return !!el && el.classList.contains('is-muted') && el.classList.contains('no-video') &&
          el.querySelector('.tile-icons .icon') !== null;
      }, bId, { timeout: UI, what: 'the muted, camera-off tile' })));
      await b.keyboard.press('m');
      await b.keyboard.press('v');
      await Promise.all([a, c, d].map((page) => waitFor(page, (id) => {
        const el = document.querySelector(`.tile[data-key="${id}"]`);
        return !!el && !el.classList.contains('is-muted') && !el.classList.contains('no-video');
      }, bId, { timeout: UI, what: 'the tile back on' })));
      // The reopened camera's frames reach everyone again.
      await waitForMedia([a, b, c, d], 4, MEDIA);
    });

    test('chat reaches everyone in order, with an unread count', T, async () => {
      const all = pages();
      const log = (/** @type {Page} */ page) => page.evaluate(() => /** @type {string[]} */ (/** @type {any} */ (window).meshmeet.chatLog));
      const chatLength = (/** @type {Page} */ page, /** @type {number} */ n) =>
        waitFor(page, (k) => /** @type {any} */ (window).meshmeet.chatLog.length >= k, n, { timeout: UI, what: `${n} chat lines` });
      // Everyone sends three lines at once: every line arrives everywhere in one order,
      // and each sender's lines keep their order.
      /** @type {string[]} */
      const burst = [];
      await Promise.all(all.map((page, i) => page.evaluate((i) => {
        const mm = /** @type {any} */ (window).meshmeet;
        for (let k = 0; k < 3; k++) mm.chat(`message ${k} from ${i}`);
      }, i)));
      for (let i = 0; i < 4; i++) for (let k = 0; k < 3; k++) burst.push(`message ${k} from ${i}`);
      await Promise.all(all.map((page) => chatLength(page, burst.length)));
      const first = await log(all[0]);
      for (const page of all) {
        const got = await log(page);
        assert.deepEqual(got, first, 'the same order everywhere');
        assert.deepEqual([...got].sort(), [...burst].sort());
        for (let i = 0; i < 4; i++) {
          assert.deepEqual(got.filter((l) => l.endsWith(`from ${i}`)), [0, 1, 2].map((k) => `message ${k} from ${i}`));
        }
      }
      // Typed through the UI, and counted as unread on a closed panel.
      await all[3].click('#btn-chat');
      await fill(all[3], '#chat-input', '안녕하세요 everyone');
      await all[3].keyboard.press('Enter');
      await waitFor(all[0], () => /** @type {any} */ (window).meshmeet.chatLog.includes('안녕하세요 everyone'), null, { what: 'the typed line' });
      await all[3].screenshot({ path: shot('chat') });
      assert.equal(await text(all[0], '#unread'), '10', 'nine lines from the others plus one typed');
      await all[3].click('#chat-close');
    });

    // In the mixed room both kinds share: Firefox (first) and then Chromium (second).
    const sharers = room.label === 'mixed' ? [0, 1] : [0];
    for (const s of sharers) {
      test(`screen share from ${room.kinds[s]} starts and stops, and the others see it`, T, async () => {
        const all = pages();
        const sharer = all[s];
        const others = all.filter((_, i) => i !== s);
        const sId = await myId(sharer);
        await sharer.click('#btn-share');
        await waitFor(sharer, () => document.querySelector('.tile[data-key="self:screen"]') !== null, null, { timeout: UI, what: 'the own screen tile' });
        // Every other page shows the screen tile and decodes screen frames (counted from
        // the first look at the tile).
        await Promise.all(others.map((page) => waitFor(page, async (id) => {
          if (!document.querySelector(`.tile[data-key="${id}:screen"]`)) return false;
          const w = /** @type {any} */ (window);
          const frames = (await w.meshmeet.stats())[id]?.screenFrames ?? 0;
          if (w.__screenBase === undefined || frames < w.__screenBase) {
            w.__screenBase = frames;
            return false;
          }
          return frames > w.__screenBase;
        }, sId, { timeout: MEDIA, interval: 1000, what: 'screen frames decoded' })));
        await Promise.all(others.map((page) => page.evaluate(() => { delete /** @type {any} */ (window).__screenBase; })));
        await sharer.screenshot({ path: shot(`screen-share-${s}`) });
        await sharer.click('#btn-share');
        await Promise.all(others.map((page) => waitFor(page, (id) =>
          document.querySelector(`.tile[data-key="${id}:screen"]`) === null, sId, { timeout: UI, what: 'the screen tile gone' })));
        // Camera video keeps flowing after the renegotiations.
        await waitForMedia(all, 4, MEDIA);
      });
    }

    test('signaling drops and resumes: media keeps flowing, connections are kept', T, async () => {
      const all = pages();
      const c = all[2];
      const before = await c.evaluate(async () => {
        const mm = /** @type {any} */ (window).meshmeet;
        /** @type {any} */ (window).__pcs = Array.from(mm.peers.values()).map((p) => p.pc);
        return { id: /** @type {string} */ (mm.id), stats: /** @type {Record<string, any>} */ (await mm.stats()) };
      });
      const cId = before.id;
      const atA = async () => (await stats(all[0]))[cId];
      const aBefore = await atA();
      // A 12 s outage (the socket closes without `leave`, as on a network drop), within
      // the server's 20 s resume grace, and long enough for a rise to be seen on a page
      // that a busy machine starves for several seconds.
      await c.evaluate(() => /** @type {any} */ (window).meshmeet.dropSocket(12000));
      const sample = () => c.evaluate(async () => {
        const mm = /** @type {any} */ (window).meshmeet;
        const down = !mm.signaling.joined && !document.getElementById('banner')?.hidden;
        return { down, stats: /** @type {Record<string, any>} */ (await mm.stats()) };
      });
      const early = await sample();
      assert.ok(early.down, 'the socket is down and the banner shows');
      // Media keeps being decoded while the socket is down (12 s): wait for a rise from
      // every peer, checked only while the socket is still down.
      await waitFor(c, async (base) => {
        const mm = /** @type {any} */ (window).meshmeet;
        const st = await mm.stats();
        return !mm.signaling.joined && Object.keys(base).every((id) => st[id] &&
          st[id].framesDecoded > base[id].framesDecoded + 2 && st[id].audioPackets > base[id].audioPackets + 10);
      }, early.stats, { timeout: 11_000, interval: 250, what: 'media decoded during the outage' });
      const during = await sample();
      assert.ok(during.down, 'still down: the rise happened during the outage');
      await waitFor(c, () => {
        const mm = /** @type {any} */ (window).meshmeet;
        return mm.signaling.joined && document.getElementById('banner')?.hidden;
      }, null, { timeout: UI, what: 'signaling to resume' });
      const same = await c.evaluate(() => {
        const mm = /** @type {any} */ (window).meshmeet;
        const pcs = /** @type {any} */ (window).__pcs;
        const now = Array.from(mm.peers.values()).map((p) => p.pc);
        return { id: mm.id, samePcs: pcs.length === now.length && pcs.every((/** @type {any} */ pc, /** @type {number} */ i) => pc === now[i]) };
      });
      assert.equal(same.id, cId, 'resumed with the same id');
      assert.ok(same.samePcs, 'peer connections were not recreated');
      await waitFor(c, async (base) => {
        const st = await /** @type {any} */ (window).meshmeet.stats();
        return Object.keys(base).every((id) => st[id] && st[id].serial === base[id].serial &&
          st[id].framesDecoded > base[id].framesDecoded && st[id].audioPackets > base[id].audioPackets);
      }, during.stats, { timeout: UI, interval: 250, what: 'media decoded across the outage, on the same connections' });
      // The others never saw C leave, and kept their connections to it.
      for (const page of [all[0], all[1], all[3]]) {
        assert.ok((await ids(page)).includes(cId));
      }
      const aAfter = await atA();
      assert.equal(aAfter.serial, aBefore.serial);
      assert.ok(aAfter.framesDecoded > aBefore.framesDecoded);
      await waitForMedia(all, 4, MEDIA);
    });

    test('server restarted mid-call: same ids, same connections, media throughout', T, async (t) => {
      const all = pages();
      // Each page: its id, the ids it sees, its peer connections (kept for comparison),
      // its media counters, and from now on every `peer_left` it is told of.
      const before = await Promise.all(all.map((page) => page.evaluate(async () => {
        const w = /** @type {any} */ (window);
        const mm = w.meshmeet;
        w.__pcs = Array.from(mm.peers.values()).map((p) => p.pc);
        w.__left = [];
        mm.signaling.handlers.onMessage = ((orig) => (/** @type {any} */ m) => {
          if (m.type === 'peer_left') w.__left.push(m.id);
          return orig(m);
        })(mm.signaling.handlers.onMessage);
        return { id: /** @type {string} */ (mm.id), peers: Array.from(mm.peers.keys()).sort(), stats: await mm.stats() };
      })));
      const t0 = Date.now();
      // SIGTERM, as `systemctl restart` or an upgrade sends; the same config and data.
      await server.restart();
      assert.match(server.stderr, /rooms restored/, 'the new process restored the rooms');
      // Every page resumes: joined again, same id, banner gone. (The client retries
      // after 0.3, 0.7, 1.5 s ...; the server needs about a second to stop and start.)
      await Promise.all(all.map((page, i) => waitFor(page, (id) => {
        const mm = /** @type {any} */ (window).meshmeet;
        return mm.signaling.joined && mm.id === id && document.getElementById('banner')?.hidden;
      }, before[i].id, { timeout: UI, interval: 100, what: `page ${i} to resume` })));
      t.diagnostic(`all four resumed ${Date.now() - t0} ms after the restart began`);
      for (const [i, page] of all.entries()) {
        const now = await page.evaluate(() => {
          const w = /** @type {any} */ (window);
          const mm = w.meshmeet;
          const pcs = Array.from(mm.peers.values()).map((p) => p.pc);
          return {
            id: /** @type {string} */ (mm.id),
            peers: Array.from(mm.peers.keys()).sort(),
            samePcs: pcs.length === w.__pcs.length && pcs.every((pc, k) => pc === w.__pcs[k]),
            left: /** @type {string[]} */ (w.__left),
          };
        });
        assert.equal(now.id, before[i].id, `page ${i} kept its id`);
        assert.deepEqual(now.peers, before[i].peers, `page ${i} sees the same peers`);
        assert.ok(now.samePcs, `page ${i}: no peer connection recreated\n${await describeCall(page)}`);
        assert.deepEqual(now.left, [], `page ${i} saw nobody leave`);
      }
      // Media was decoded across the restart on the same connections, and still is.
      await Promise.all(all.map((page, i) => waitFor(page, async (base) => {
        const st = await /** @type {any} */ (window).meshmeet.stats();
        return Object.keys(base).every((id) => st[id] && st[id].serial === base[id].serial &&
          st[id].framesDecoded > base[id].framesDecoded);
      }, before[i].stats, { timeout: UI, interval: 250, what: `media on page ${i} across the restart` })));
      await waitForMedia(all, 4, MEDIA);
    });

    if (room.label === 'mixed') {
      // Calm recovery: blips (a connection briefly `disconnected` when a consent check
      // is answered late) recover by themselves; what restarts there are complete.
      test(`under ${LOAD_S} s of CPU load (stress-ng, two workers) the call ends with every connection connected`, { timeout: 400_000 }, async (t) => {
        const all = pages();
        const started = Date.now();
        await cpuHog(LOAD_S);
        t.diagnostic(`load ran ${Math.round((Date.now() - started) / 1000)} s`);
        // Afterwards: every connection connected again, no tile on "failed", media flowing.
        await Promise.all(all.map((page, i) => waitFor(page, () => {
          const mm = /** @type {any} */ (window).meshmeet;
          return mm.peers.size === 3 && Array.from(mm.peers.values()).every((/** @type {any} */ p) =>
            p.pc.connectionState === 'connected' &&
            document.querySelector(`.tile[data-key="${p.id}"]`)?.getAttribute('data-state') !== 'failed');
        }, null, { timeout: MEDIA, interval: 250, what: `page ${i}: every connection connected, no failed tile` })));
        await waitForMedia(all, 4, MEDIA);
        for (const [i, page] of all.entries()) {
          const st = await stats(page);
          const blips = Object.values(st).flatMap((p) => p.blips);
          const restarts = Object.values(st).reduce((a, p) => a + p.restarts, 0);
          const noPath = Object.values(st).reduce((a, p) => a + p.noPathRestarts, 0);
          const renewed = Object.values(st).reduce((a, p) => a + p.renewals, 0);
          t.diagnostic(`${people[i].name} (${room.kinds[i]}): ${blips.length} disconnected spells ` +
            `[${blips.map((ms) => (ms / 1000).toFixed(1)).join(', ')}] s, ${restarts} ICE restarts ` +
            `(${noPath} for no selected pair, ${renewed} new connections)`);
          // (Every connection was connected above; a consent-check blip since, on a
          // machine still busy, is not a failure: no tile may say "failed".)
          for (const p of Object.values(st)) assert.notEqual(p.state, 'failed', `${people[i].name}: ${p.name} ${p.connectionState}`);
          assert.deepEqual(await dishonestTiles(page), []);
        }
      });
    }

    if (room.label === 'chromium') {
      test('at capacity, the next participant sees the room-full screen', T, async () => {
        pages();
        const extra = await participant(browsers, 'chromium', roomUrl, 'Latecomer');
        extras.push(extra);
        await waitFor(extra.page, () => !document.getElementById('screen')?.hidden, null, { timeout: UI, what: 'the room-full screen' });
        assert.equal(await text(extra.page, '#screen-title'), 'This room is full');
        assert.match(await text(extra.page, '#screen-text') || '', /4/);
        await extra.context.close();
      });
    }

    test('a participant leaves: its tile goes at once and its connections close', T, async (t) => {
      const all = pages();
      const leaver = all[3];
      const leaverId = await myId(leaver);
      await leaver.evaluate(() => {
        /** @type {any} */ (window).__pcs = Array.from(/** @type {any} */ (window).meshmeet.peers.values()).map((p) => p.pc);
      });
      // Timestamps are taken inside the pages (one machine, one clock), so the
      // measurement excludes the test driver's own round trips.
      for (const page of all.slice(0, 3)) {
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
      const clickAt = await leaver.evaluate(() => /** @type {number} */ (/** @type {any} */ (window).__clickAt));
      await Promise.all(all.slice(0, 3).map((page) => waitFor(page, (id) =>
        /** @type {any} */ (window).__goneAt > 0 &&
        /** @type {any} */ (window).__leaverPc.signalingState === 'closed' &&
        !/** @type {any} */ (window).meshmeet.peers.has(id), leaverId, { timeout: UI, interval: 50, what: 'the leaver gone' })));
      // The tile goes on the `leave` message, not when the 20 s resume grace runs out:
      // well inside the grace even on a starved machine. (How soon is reported; a few
      // hundred ms on a machine with time to spare.)
      for (const page of all.slice(0, 3)) {
        const goneAt = await page.evaluate(() => /** @type {number} */ (/** @type {any} */ (window).__goneAt));
        t.diagnostic(`tile gone ${goneAt - clickAt} ms after the click`);
        assert.ok(goneAt - clickAt < 10_000, `tile gone ${goneAt - clickAt} ms after the click`);
      }
      const closed = await leaver.evaluate(() => /** @type {any} */ (window).__pcs.every((/** @type {any} */ pc) => pc.signalingState === 'closed'));
      assert.ok(closed, 'leaver closed all its connections');
      assert.equal(await text(leaver, '#screen-title'), 'You left the call');
      await waitForMedia(all.slice(0, 3), 3, MEDIA);
    });

    test('closing the tab sends leave: the others drop its tile at once, not after the resume grace', T, async () => {
      const [a, b, c] = pages();
      const cId = await myId(c);
      await c.close();
      await Promise.all([a, b].map((page) => waitFor(page, (id) =>
        document.querySelector(`.tile[data-key="${id}"]`) === null && !/** @type {any} */ (window).meshmeet.peers.has(id),
      cId, { timeout: 15_000, interval: 50, what: 'the closed tab gone (before the 20 s resume grace)' })));
      await waitForMedia([a, b], 2, MEDIA);
    });

    // The newcomer's kind: Firefox in the mixed room (it offers to Firefox and Chromium).
    const lateKind = room.kinds[2];
    test(`Join pressed before the camera opened (${lateKind}): every peer still gets its video and audio`, T, async () => {
      const [a, b] = pages();
      // Join at once on page load, with getUserMedia held back until the newcomer is
      // connected: its connections to A and B are set up (it offers) with no tracks.
      const late = await participant(browsers, lateKind, roomUrl, 'Late Camera', { early: true, holdDevices: true });
      extras.push(late);
      const connectedTo = (/** @type {number} */ n) => waitFor(late.page, (k) => {
        const mm = /** @type {any} */ (window).meshmeet;
        return mm && mm.inCall && mm.peers.size === k &&
          Array.from(mm.peers.values()).every((/** @type {any} */ p) => p.pc.connectionState === 'connected');
      }, n, { timeout: MEDIA, interval: 250, what: `the newcomer connected to ${n} peers` });
      await connectedTo(2);
      // One more joins and offers to the newcomer, which answers, still without tracks.
      const next = await participant(browsers, room.kinds[3], roomUrl, 'Next One');
      extras.push(next);
      await connectedTo(3);
      const held = await late.page.evaluate(() => ({
        asked: /** @type {any} */ (window).__devicesAsked, video: /** @type {any} */ (window).meshmeet.localVideoState,
      }));
      assert.ok(held.asked > 0 && held.video === 'none', `devices asked for and not open yet: ${JSON.stringify(held)}`);
      await late.page.evaluate(() => /** @type {any} */ (window).__releaseDevices());
      // Everyone decodes the newcomer's video and receives its audio (and it theirs).
      await waitForMedia([a, b, late.page, next.page], 4, MEDIA);
      const lateId = await myId(late.page);
      for (const page of [a, b, next.page]) {
        await waitFor(page, (id) => {
          const el = document.querySelector(`.tile[data-key="${id}"]`);
          return !!el && !el.classList.contains('no-video') && !el.classList.contains('is-muted');
        }, lateId, { timeout: UI, what: 'the newcomer shown with camera and microphone on' });
      }
      for (const page of [a, b, late.page, next.page]) assert.deepEqual(await dishonestTiles(page), []);
    });
  });
}
