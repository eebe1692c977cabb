// Where the time from Join to the first decoded frame goes: four participants join a
// room one by one (as in the call tests), and each page records, per peer, when (ms
// after its own Join, or after the peer's arrival) the offer/answer went out, the
// connection was connected, the first RTP packet and the first decoded frame showed
// in getStats, and the tile's video had its first frame; `firstEncoded` is when the
// page's own encoder for that connection had its first frame (a sender that has no
// frames to encode shows there, not on the network).
//
//   cd tests/browser && MESHMEET_BIN=... node lib/netns.js node bench/firstframe.js
//
// Environment: KINDS (chromium,chromium,chromium,chromium), RELAY (1: force relay).

import { Server, Browsers, participant, waitFor, waitForMedia } from '../lib/harness.js';

const kinds = /** @type {any} */ ((process.env.KINDS || 'chromium,chromium,chromium,chromium').split(','));
const server = await new Server({ forceRelay: process.env.RELAY === '1', capacity: 4, label: 'ff' }).start();
const browsers = new Browsers();
try {
  const names = kinds.map((/** @type {string} */ _k, /** @type {number} */ i) => `P${i + 1}`);
  /** @type {any[]} */
  const people = [];
  for (const [i, kind] of kinds.entries()) people.push(await participant(browsers, kind, `${server.url}/first-frame`, names[i], { join: false }));
  const pages = people.map((p) => p.page);
  for (const page of pages) {
    await page.evaluate(() => {
      setInterval(async () => {
        const mm = /** @type {any} */ (window).meshmeet;
        if (!mm) return;
        for (const p of mm.peers.values()) {
          const m = (p.marks ||= {});
          if (m.firstDecoded && m.firstEncoded) continue;
          (await p.pc.getStats()).forEach((/** @type {any} */ s) => {
            if (s.kind !== 'video') return;
            const now = performance.now();
            if (s.type === 'inbound-rtp') {
              if (s.packetsReceived > 0 && !m.firstRtp) m.firstRtp = now;
              if (s.framesReceived > 0 && !m.firstReceived) m.firstReceived = now;
              if (s.framesDecoded > 0 && !m.firstDecoded) m.firstDecoded = now;
            } else if (s.type === 'outbound-rtp') {
              // Our side of the same connection: when our encoder had its first frame.
              if (s.framesEncoded > 0 && !m.firstEncoded) m.firstEncoded = now;
            }
          });
        }
      }, 50);
    });
  }
  for (const [i, page] of pages.entries()) {
    await page.click('#join-btn');
    await waitFor(page, (n) => { const mm = /** @type {any} */ (window).meshmeet; return mm && mm.inCall && mm.peers.size === n; }, i, { timeout: 60_000, interval: 50 });
  }
  await waitForMedia(pages, 4, 120_000);
  for (const [i, page] of pages.entries()) {
    const rows = await page.evaluate(async () => {
      const mm = /** @type {any} */ (window).meshmeet;
      const st = await mm.stats();
      return Array.from(mm.peers.values()).map((/** @type {any} */ p) => ({
        peer: p.name, sinceJoin: st[p.id].sinceJoin, firstFrameMs: st[p.id].firstFrameMs,
        marks: Object.fromEntries(Object.entries(p.marks || {}).map(([k, v]) => [k, Math.round(/** @type {number} */ (v) - p.since)])),
        trace: p.trace.slice(0, 14),
      }));
    });
    for (const r of rows) console.log(`page ${i + 1} (${kinds[i]}) <- ${r.peer}: ${r.sinceJoin ? 'from Join' : 'from arrival'} first frame ${r.firstFrameMs} ms; ${JSON.stringify(r.marks)}\n   ${r.trace.join('\n   ')}`);
  }
} finally {
  await browsers.close();
  await server.stop();
}
