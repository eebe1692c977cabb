// Local recording with consent, in real browsers, in the rooms of rooms() (all
// Chromium, all Firefox, mixed), three participants each: the first records about
// ten seconds of the three-way call; every participant shows "Recording: NAME" (a
// status banner) and the mark on the recorder's tile while it records, and neither
// after it stops; the file, read in the recorder's page through the download link's
// blob URL, is read by ffprobe with a video stream and an audio stream (their
// durations measured from the packets' timestamps: WebM from MediaRecorder carries
// no duration header). Then: a latecomer who joins during a recording sees the
// indicator at once (from `joined`), and the recorder leaving clears it for the
// others while its own page keeps the finished file to download.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Server, Browsers, featureRooms, joinAll, participant, waitFor, waitForMedia, ensureArtifacts, text, step, myId } from '../lib/harness.js';

/** @typedef {import('../lib/harness.js').Page} Page */
/** @typedef {import('../lib/harness.js').Participant} Participant */

/** @type {Server} */ let server;
/** @type {Browsers} */ let browsers;
const T = { timeout: 400_000 };
// Bounds that only say when to give up (a starved machine is slow).
const UI = 60_000;
const MEDIA = 120_000;
/** ten seconds of recording, with room for a slow machine */
const RECORD = 120_000;
const DRAIN = 90_000;
const NAMES = ['Ada Rec', 'Bo Two', 'Cy Three'];
/** How long the recording runs, by the recorder's own count of recorded time. */
const RECORD_MS = 10_000;

before(async () => {
  server = await new Server({ label: 'record' }).start();
  browsers = new Browsers();
});

after(async () => {
  await browsers?.close();
  await server?.stop();
});

/** @param {Page} page */
const recording = (page) => page.evaluate(() => /** @type {any} */ (window).meshmeet.recording);

/**
 * Waits until the page's recorder is in `state`.
 * @param {Page} page @param {string} state
 */
const recorderIn = (page, state) => waitFor(page, (want) => /** @type {any} */ (window).meshmeet.recording.state === want,
  state, { timeout: UI, what: `the recorder ${state}` });

/**
 * Waits until the page shows the recording banner naming `name` (and the mark on
 * tile `tileKey`, if given), or, with `name` null, shows neither.
 * @param {Page} page @param {string|null} name @param {string|null} tileKey
 */
function indicator(page, name, tileKey) {
  return waitFor(page, ([want, key]) => {
    const banner = document.getElementById('rec-banner');
    const out = document.getElementById('rec-banner-text');
    if (!banner || !out) return false;
    const mark = key ? /** @type {HTMLElement|null} */ (document.querySelector(`.tile[data-key="${key}"] .tile-rec`)) : null;
    if (want === null) {
      return banner.hidden && !document.querySelector('.tile-rec:not([hidden])');
    }
    return !banner.hidden && banner.getAttribute('role') === 'status' && (out.textContent || '').includes(want) &&
      (!key || (!!mark && !mark.hidden));
  }, /** @type {[string|null, string|null]} */ ([name, tileKey]), { timeout: UI, what: name ? `"Recording: ${name}"` : 'no recording indicator' });
}

/**
 * Streams and per-stream packet time spans of a media file, from ffprobe.
 * @param {string} file
 * @returns {{streams: {index: number, codec_type: string, codec_name: string}[], spans: Map<number, {first: number, last: number, packets: number}>}}
 */
function probe(file) {
  const out = execFileSync('ffprobe', ['-v', 'error', '-show_entries',
    'stream=index,codec_type,codec_name:packet=stream_index,pts_time', '-of', 'json', file], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const j = JSON.parse(out);
  /** @type {Map<number, {first: number, last: number, packets: number}>} */
  const spans = new Map();
  for (const p of j.packets || []) {
    const t = Number(p.pts_time);
    if (!Number.isFinite(t)) continue;
    const s = spans.get(p.stream_index) || { first: t, last: t, packets: 0 };
    s.first = Math.min(s.first, t);
    s.last = Math.max(s.last, t);
    s.packets += 1;
    spans.set(p.stream_index, s);
  }
  return { streams: j.streams || [], spans };
}

/** Waits until the server holds nobody (an earlier room's pages are gone). */
async function serverEmpty() {
  const end = Date.now() + DRAIN;
  for (;;) {
    const m = await server.metrics();
    if (m.get('meshmeet_peers') === 0) return;
    if (Date.now() > end) throw new Error(`waiting for an empty server: ${m.get('meshmeet_peers')} peers`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

for (const room of featureRooms()) {
  const kinds = room.kinds.slice(0, 3);
  describe(`${room.label} room (${kinds.join(', ')})`, () => {
    /** @type {Participant[]} */
    const people = [];
    /** @type {Participant[]} */
    const extras = [];
    let roomUrl = '';
    let up = false;
    const note = (/** @type {string} */ what) => step(`${room.label}: ${what}`);
    const shot = (/** @type {string} */ what) => join(ensureArtifacts(), `${what}-${room.label}.png`);
    const pages = () => {
      if (!up) throw new Error('the three-way call did not come up');
      return people.map((p) => p.page);
    };

    before(async () => {
      roomUrl = `${server.url}/recorded-${room.label}`;
      await serverEmpty();
    });

    after(async () => {
      for (const p of [...people, ...extras]) {
        if (p.errors.length) console.log(`console errors and warnings (${p.name}, ${p.kind}):`, p.errors.join('\n'));
        await p.context.close().catch(() => {});
      }
    });

    test('ten seconds recorded: everyone sees who records, nobody after; ffprobe reads video and audio', T, async (t) => {
      people.push(...await joinAll(browsers, kinds, roomUrl, NAMES));
      const all = people.map((p) => p.page);
      await waitForMedia(all, 3, MEDIA);
      up = true;
      note('three-way call up');
      const [a, b, c] = all;
      const aId = await myId(a);
      for (const page of all) await indicator(page, null, null);
      assert.equal(await a.$eval('#btn-rec', (el) => el.getAttribute('aria-pressed')), 'false');
      assert.equal(await a.$eval('#btn-rec', (el) => el.getAttribute('aria-label')), 'Record this call');

      // Start from the keyboard: the button is reachable and pressable without a mouse.
      // (A Firefox window takes keys only while it has the focus.)
      await a.bringToFront();
      await a.focus('#btn-rec');
      await a.keyboard.press('Enter');
      await recorderIn(a, 'recording');
      note('recording');
      const st0 = await recording(a);
      assert.match(st0.mimeType, /^video\/webm/, 'WebM in Chromium and Firefox');
      assert.equal(await a.$eval('#btn-rec', (el) => el.getAttribute('aria-pressed')), 'true');
      assert.equal(await a.$eval('#btn-rec', (el) => el.getAttribute('aria-label')), 'Stop recording');
      assert.equal(await text(a, '#rec-panel [data-i18n="recLocal"]'), 'The recording stays on this device. It is not uploaded anywhere.');
      // Everyone sees who records: the others on the recorder's tile too.
      await indicator(a, 'Ada Rec (You)', 'self');
      await indicator(b, 'Ada Rec', aId);
      await indicator(c, 'Ada Rec', aId);
      assert.equal(await text(b, '#rec-banner-text'), 'Recording: Ada Rec');

      // Ten seconds recorded, by the recorder's count of the chunks written.
      await waitFor(a, (ms) => {
        const r = /** @type {any} */ (window).meshmeet.recording;
        return r.state === 'recording' && r.recordedMs >= ms && r.chunks >= 5;
      }, RECORD_MS, { timeout: RECORD, what: `${RECORD_MS} ms recorded` });
      await b.screenshot({ path: shot('record-indicator') });
      // Still shown everywhere at the end of it.
      await indicator(b, 'Ada Rec', aId);
      await indicator(c, 'Ada Rec', aId);
      await a.click('#rec-stop');
      await recorderIn(a, 'stopped');
      const st = await recording(a);
      note(`stopped: ${st.recordedMs} ms, ${st.chunks} chunks, ${st.bytes} bytes, ${st.mimeType}, stored in ${st.storage}`);
      t.diagnostic(`recorded ${st.recordedMs} ms in ${st.chunks} chunks (${st.bytes} bytes, ${st.mimeType}), stored in ${st.storage}`);
      assert.ok(st.bytes > 0);
      // Nobody shows it any more.
      for (const page of all) await indicator(page, null, null);
      assert.equal(await a.$eval('#btn-rec', (el) => el.getAttribute('aria-pressed')), 'false');

      // The file, through the download link: named for the room and the date.
      const link = await a.$eval('#rec-download', (el) => ({
        href: /** @type {HTMLAnchorElement} */ (el).href, download: /** @type {HTMLAnchorElement} */ (el).download,
        hidden: /** @type {HTMLElement} */ (el).hidden,
      }));
      assert.equal(link.hidden, false);
      assert.match(link.href, /^blob:/);
      assert.match(link.download, new RegExp(`^meshmeet-recorded-${room.label}-\\d{4}-\\d\\d-\\d\\d_\\d\\d-\\d\\d-\\d\\d\\.webm$`));
      const b64 = await a.evaluate(async (href) => {
        const buf = new Uint8Array(await (await fetch(href)).arrayBuffer());
        let s = '';
        for (let i = 0; i < buf.length; i += 0x8000) s += String.fromCharCode(...buf.subarray(i, i + 0x8000));
        return btoa(s);
      }, link.href);
      const bytes = Buffer.from(b64, 'base64');
      assert.equal(bytes.length, st.bytes, 'the file is every chunk written');
      const dir = mkdtempSync(join(tmpdir(), 'meshmeet-rec-'));
      try {
        const file = join(dir, link.download);
        writeFileSync(file, bytes);
        const { streams, spans } = probe(file);
        const video = streams.find((s) => s.codec_type === 'video');
        const audio = streams.find((s) => s.codec_type === 'audio');
        assert.ok(video, `a video stream: ${JSON.stringify(streams)}`);
        assert.ok(audio, `an audio stream: ${JSON.stringify(streams)}`);
        const vs = spans.get(video.index);
        const as = spans.get(audio.index);
        assert.ok(vs && as, 'packets in both streams');
        const vDur = vs.last - vs.first;
        const aDur = as.last - as.first;
        t.diagnostic(`ffprobe: video ${video.codec_name} ${vDur.toFixed(2)} s (${vs.packets} packets), audio ${audio.codec_name} ${aDur.toFixed(2)} s (${as.packets} packets)`);
        note(`ffprobe: video ${video.codec_name} ${vDur.toFixed(2)} s / ${vs.packets}, audio ${audio.codec_name} ${aDur.toFixed(2)} s / ${as.packets}`);
        assert.ok(vDur > 0, 'video of non-zero duration');
        // About the ten seconds recorded (the first frames may come a little late).
        assert.ok(vDur >= (RECORD_MS / 1000) * 0.6, `video spans ${vDur} s`);
        assert.ok(aDur >= (RECORD_MS / 1000) * 0.6, `audio spans ${aDur} s`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }

      // Discarding removes the stored file.
      await a.click('#rec-discard');
      await recorderIn(a, 'idle');
      const left = await a.evaluate(async () => {
        if (!navigator.storage?.getDirectory) return [];
        const dir = await navigator.storage.getDirectory();
        const names = [];
        // @ts-ignore: async iteration of a directory handle
        for await (const name of dir.keys()) names.push(name);
        return names;
      });
      assert.deepEqual(left, [], 'nothing left in the private file system');
      assert.equal(await a.$eval('#rec-panel', (el) => /** @type {HTMLElement} */ (el).hidden), true);
    });

    test('a latecomer sees the indicator at join; the recorder leaving clears it', T, async () => {
      const [a, b, c] = pages();
      const aId = await myId(a);
      await a.click('#btn-rec');
      await recorderIn(a, 'recording');
      await indicator(b, 'Ada Rec', aId);
      await indicator(c, 'Ada Rec', aId);
      // The latecomer hears of it only through `joined` (nobody sends `media` for it).
      const late = await participant(browsers, room.kinds[3], roomUrl, 'Di Late');
      extras.push(late);
      const d = late.page;
      await waitFor(d, () => /** @type {any} */ (window).meshmeet.inCall, null, { timeout: UI, what: 'the latecomer in the call' });
      await waitFor(d, (id) => /** @type {any} */ (window).meshmeet.peers.get(id)?.media?.recording === true,
        aId, { timeout: UI, what: 'the recorder\'s state from joined' });
      await indicator(d, 'Ada Rec', aId);
      note('the latecomer sees the indicator');
      // Wait for a chunk so there is something to keep, then the recorder leaves.
      await waitFor(a, () => /** @type {any} */ (window).meshmeet.recording.chunks >= 1, null, { timeout: RECORD, what: 'a chunk' });
      await a.click('#btn-leave');
      for (const page of [b, c, d]) {
        await waitFor(page, (id) => !/** @type {any} */ (window).meshmeet.peers.has(id), aId, { timeout: UI, what: 'the recorder gone' });
        await indicator(page, null, null);
      }
      note('indicator cleared for the others');
      // The recorder's page finished the file on leaving and still offers it.
      await recorderIn(a, 'stopped');
      await waitFor(a, () => {
        const el = document.getElementById('rec-download');
        return !!el && !el.hidden && /^blob:/.test(/** @type {HTMLAnchorElement} */ (el).href);
      }, null, { timeout: UI, what: 'the download offered after leaving' });
      assert.ok((await recording(a)).bytes > 0);
      await a.click('#rec-discard');
      await recorderIn(a, 'idle');
    });
  });
}
