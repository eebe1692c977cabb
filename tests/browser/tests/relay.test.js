// Four participants with ice.force_relay = true: every selected candidate pair is
// relayed through meshmeet's own TURN server, and media flows.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Netns, Server, launchBrowser, participant, waitForMedia, HOST_IP } from '../lib/harness.js';

/** @type {Netns} */ let ns;
/** @type {Server} */ let server;
/** @type {Awaited<ReturnType<typeof launchBrowser>>} */ let chrome;

before(async () => {
  ns = new Netns();
  server = await new Server(ns, { forceRelay: true }).start();
  chrome = await launchBrowser(ns);
});

after(async () => {
  await chrome?.close();
  await server?.stop();
  ns?.destroy();
});

test('forced relay: four participants, all media through the embedded TURN server', async () => {
  const people = [];
  for (const name of ['Relay One', 'Relay Two', 'Relay Three', 'Relay Four']) {
    people.push(await participant(chrome.browser, `${server.url}/relayed-room`, name));
  }
  const pages = people.map((p) => p.page);
  await waitForMedia(pages, 4, 60000);
  for (const page of pages) {
    const ice = await page.evaluate(() => {
      const pc = /** @type {any} */ (window).meshmeet.peers.values().next().value.pc;
      return pc.getConfiguration();
    });
    assert.equal(ice.iceTransportPolicy, 'relay');
    for (const s of ice.iceServers) {
      for (const u of [].concat(s.urls)) assert.ok(String(u).includes(HOST_IP), `only meshmeet's own servers: ${u}`);
    }
    const stats = await page.evaluate(() => /** @type {any} */ (window).meshmeet.stats());
    assert.equal(Object.keys(stats).length, 3);
    for (const peer of Object.values(stats)) {
      assert.equal(peer.path.local, 'relay', JSON.stringify(peer.path));
      assert.equal(peer.path.remote, 'relay', JSON.stringify(peer.path));
      assert.equal(peer.path.localAddress, HOST_IP);
      assert.equal(peer.state, 'relay');
    }
    await page.waitForFunction(() => Array.from(document.querySelectorAll('.tile:not(.self)')).every((t) => t.getAttribute('data-state') === 'relay'));
  }
});
