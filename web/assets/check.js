// Diagnostics page: camera and microphone, the signaling socket, and ICE gathering
// against this server's own STUN and TURN: over UDP, TCP and TLS on the TURN ports and
// on the HTTPS port (the ways in that work where only HTTPS is allowed); then a
// plain-words verdict on what works and what is blocked.

import { lang, translate } from './i18n.js';
import { icon, placeIcons } from './icons.js';

/**
 * @typedef {import('./signaling.js').IceConfig} IceConfig
 * @typedef {import('./signaling.js').ServerMsg} ServerMsg
 */

const GATHER_TIMEOUT_MS = 10000;

/** @type {Record<string, Record<string, string>>} */
const TEXT = {
  en: {
    media: 'Camera and microphone', signaling: 'Connection to the server', stun: 'STUN (your network address)',
    turnUdp: 'Relay over UDP (TURN)', turnTcp: 'Relay over TCP (TURN)', turnTls: 'Relay over TLS (TURNS)',
    turnUdpHttps: 'Relay over UDP on the HTTPS port (TURN)', turnTcpHttps: 'Relay over TCP on the HTTPS port (TURN)',
    turnTlsHttps: 'Relay over TLS on the HTTPS port (TURNS)', httpsHint: 'Works even where only HTTPS is allowed.',
    checking: 'Checking…', works: 'Works', blocked: 'Blocked', notOffered: 'Not offered by this server',
    mediaOk: 'Camera: {cam}. Microphone: {mic}.', mediaDenied: 'Blocked by the browser. Allow camera and microphone for this site to be seen and heard.',
    mediaMissing: 'No camera or microphone found. You can still join to watch and listen.', none: 'none',
    sigOk: 'Connected, round trip {ms} ms.', sigFail: 'The signaling socket could not be opened.',
    stunOk: 'Your address as seen by the server: {addr}.', stunOkSame: 'The server answered; your address is not translated (no NAT).',
    relayOk: 'Relay address {addr} (server port {port}).', relayFail: 'No relay address within {s} s (server port {port}).',
    stunFail: 'No answer within {s} s (server port {port}).',
    allGood: 'Everything works. Calls connect directly where possible and through this server\'s relay otherwise.',
    udpWorks: 'Calls will use UDP, the fastest way; what is blocked here matters only on stricter networks.',
    udpBlocked: 'UDP is blocked on your network; calls will use TURN over {via}.',
    onlyHttps: 'Only the HTTPS port gets through your network (as on many hotel, school and office networks). Calls still work: they go through this server\'s relay over {via} on the HTTPS port, with a little more delay than over UDP.',
    udpOnlyHttps: 'UDP gets through your network only to the HTTPS port number; calls will use the relay over UDP there.',
    tlsBroken: 'TURN over TLS does not work here although plain TCP to the same port does. TURN over TLS needs a certificate the browser trusts, for a host name: browsers refuse a self-signed certificate, and Firefox does not use TURN over TLS with a server named by its IP address. Calls can still use the other ways in.',
    noRelay: 'Your network blocks this server\'s relay on every transport. Calls only work where a direct connection is possible.',
    noTurn: 'This server offers no relay (TURN is turned off). Calls only work where a direct connection is possible.',
    noSignaling: 'The server cannot be reached over WebSocket, so calls cannot start. Check the address, your network, or a proxy that blocks WebSockets.',
    noMedia: 'Without a camera or microphone you can still join a call and watch and listen.',
    noCandidates: 'Your browser found no network address of its own to use (not even a local one), so no check could start. Browsers gather nothing when the computer has no default route (no gateway), even if this server is reachable: check the network settings (on Linux, `ip route` should show a `default` line). Firefox then reports "ICE failed" and may name the TURN server; the server is not the cause.',
  },
  ko: {
    media: '카메라와 마이크', signaling: '서버 연결', stun: 'STUN (내 네트워크 주소)',
    turnUdp: 'UDP 릴레이 (TURN)', turnTcp: 'TCP 릴레이 (TURN)', turnTls: 'TLS 릴레이 (TURNS)',
    turnUdpHttps: 'HTTPS 포트의 UDP 릴레이 (TURN)', turnTcpHttps: 'HTTPS 포트의 TCP 릴레이 (TURN)',
    turnTlsHttps: 'HTTPS 포트의 TLS 릴레이 (TURNS)', httpsHint: 'HTTPS만 허용되는 곳에서도 동작합니다.',
    checking: '확인 중…', works: '정상', blocked: '차단됨', notOffered: '이 서버가 제공하지 않음',
    mediaOk: '카메라: {cam}. 마이크: {mic}.', mediaDenied: '브라우저가 차단했습니다. 이 사이트에 카메라와 마이크를 허용해야 다른 사람에게 보이고 들립니다.',
    mediaMissing: '카메라나 마이크를 찾을 수 없습니다. 보고 듣기만 하며 참가할 수 있습니다.', none: '없음',
    sigOk: '연결됨, 왕복 {ms} ms.', sigFail: '시그널링 소켓을 열 수 없습니다.',
    stunOk: '서버가 본 내 주소: {addr}.', stunOkSame: '서버가 응답했습니다. 주소 변환(NAT)이 없습니다.',
    relayOk: '릴레이 주소 {addr} (서버 포트 {port}).', relayFail: '{s}초 안에 릴레이 주소를 받지 못했습니다 (서버 포트 {port}).',
    stunFail: '{s}초 안에 응답이 없습니다 (서버 포트 {port}).',
    allGood: '모두 정상입니다. 가능하면 직접 연결하고, 아니면 이 서버의 릴레이를 거칩니다.',
    udpWorks: '통화는 가장 빠른 UDP를 사용합니다. 여기서 차단된 방식은 더 엄격한 네트워크에서만 문제가 됩니다.',
    udpBlocked: '네트워크에서 UDP가 차단되어 있습니다. 통화는 {via} TURN을 사용합니다.',
    onlyHttps: '네트워크에서 HTTPS 포트만 통과합니다(호텔, 학교, 회사 네트워크에서 흔합니다). 그래도 통화할 수 있습니다: HTTPS 포트의 {via} 릴레이를 거치며, UDP보다 지연이 조금 더 큽니다.',
    udpOnlyHttps: '네트워크에서 UDP는 HTTPS 포트 번호로만 통과합니다. 통화는 그 포트의 UDP 릴레이를 사용합니다.',
    tlsBroken: '같은 포트의 일반 TCP는 되지만 TLS TURN은 동작하지 않습니다. TLS TURN에는 브라우저가 신뢰하는, 호스트 이름에 대한 인증서가 필요합니다. 브라우저는 자체 서명 인증서를 거부하고, Firefox는 IP 주소로 지정된 서버에는 TLS TURN을 쓰지 않습니다. 다른 방식으로는 통화할 수 있습니다.',
    noRelay: '네트워크가 모든 방식의 릴레이를 차단합니다. 직접 연결이 가능한 경우에만 통화할 수 있습니다.',
    noTurn: '이 서버는 릴레이를 제공하지 않습니다(TURN이 꺼져 있음). 직접 연결이 가능한 경우에만 통화할 수 있습니다.',
    noSignaling: 'WebSocket으로 서버에 연결할 수 없어 통화를 시작할 수 없습니다. 주소, 네트워크, WebSocket을 막는 프록시를 확인하세요.',
    noMedia: '카메라나 마이크가 없어도 통화에 참가해 보고 들을 수 있습니다.',
    noCandidates: '브라우저가 사용할 자기 네트워크 주소를 하나도 찾지 못해(로컬 주소조차) 어떤 확인도 시작할 수 없었습니다. 컴퓨터에 기본 경로(게이트웨이)가 없으면 이 서버에 접속할 수 있더라도 브라우저는 아무것도 수집하지 않습니다. 네트워크 설정을 확인하세요(Linux에서는 `ip route`에 `default` 줄이 있어야 합니다). 이때 Firefox는 "ICE failed"를 보고하며 TURN 서버를 지목할 수 있지만 서버가 원인이 아닙니다.',
  },
};

/** @param {string} key @param {Record<string, string|number>} [vars] */
function tx(key, vars) {
  let s = (TEXT[lang] || TEXT.en)[key] ?? TEXT.en[key] ?? key;
  for (const [k, v] of Object.entries(vars || {})) s = s.split(`{${k}}`).join(String(v));
  return s;
}

/** @typedef {'pending'|'ok'|'bad'|'warn'} Status */
/** @type {Record<string, {status: Status, detail: string}>} */
const results = {};
/** The relay checks, in the order shown. */
const RELAYS = ['turnUdp', 'turnUdpHttps', 'turnTcp', 'turnTls', 'turnTcpHttps', 'turnTlsHttps'];
/** Lines always shown; turnUdpHttps and turnTls only when the server offers them. */
const BASE = ['media', 'signaling', 'stun', 'turnUdp', 'turnTcp', 'turnTcpHttps', 'turnTlsHttps'];
/** @type {string[]} */
let shown = BASE.slice();
/** The port this page came over: "the HTTPS port". */
const HTTPS_PORT = Number(location.port) || 443;
/** candidates of any kind gathered by all checks together (0: no usable local address) */
let gatheredAny = 0;

/**
 * @param {string} key
 * @param {Status} status
 * @param {string} detail
 */
function report(key, status, detail) {
  results[key] = { status, detail };
  render();
}

function render() {
  const ul = /** @type {HTMLElement} */ (document.getElementById('results'));
  ul.replaceChildren();
  for (const key of ['media', 'signaling', 'stun', ...RELAYS].filter((k) => shown.includes(k))) {
    const r = results[key] || { status: 'pending', detail: tx('checking') };
    const li = document.createElement('li');
    li.className = r.status;
    li.dataset.check = key;
    li.dataset.status = r.status;
    li.appendChild(icon(r.status === 'ok' ? 'check' : r.status === 'pending' ? 'warn' : r.status === 'warn' ? 'warn' : 'cross'));
    const div = document.createElement('div');
    const strong = document.createElement('strong');
    const verdict = r.status === 'ok' ? tx('works') : r.status === 'bad' ? tx('blocked') : r.status === 'pending' ? tx('checking') : '';
    strong.textContent = verdict ? `${tx(key)}: ${verdict}` : tx(key);
    const p = document.createElement('span');
    p.className = 'muted';
    p.textContent = r.status === 'pending' ? '' : r.detail;
    div.append(strong, p);
    li.appendChild(div);
    ul.appendChild(li);
  }
}

async function checkMedia() {
  try {
    const s = await navigator.mediaDevices.getUserMedia({ audio: true, video: true }).catch(async (e) => {
      // Either one alone is still useful.
      const parts = [];
      for (const c of [{ audio: true }, { video: true }]) {
        try { parts.push(...(await navigator.mediaDevices.getUserMedia(c)).getTracks()); } catch { /* missing */ }
      }
      if (!parts.length) throw e;
      return new MediaStream(parts);
    });
    const cam = s.getVideoTracks()[0];
    const mic = s.getAudioTracks()[0];
    report('media', cam && mic ? 'ok' : 'warn', tx('mediaOk', { cam: cam ? cam.label || 'ok' : tx('none'), mic: mic ? mic.label || 'ok' : tx('none') }));
    for (const t of s.getTracks()) t.stop();
    return true;
  } catch (e) {
    const denied = e && (/** @type {any} */ (e).name === 'NotAllowedError' || /** @type {any} */ (e).name === 'SecurityError');
    report('media', 'warn', denied ? tx('mediaDenied') : tx('mediaMissing'));
    return false;
  }
}

/** Opens the socket, measures a ping, asks for ICE servers. @returns {Promise<IceConfig|null>} */
function checkSignaling() {
  return new Promise((resolve) => {
    let done = false;
    const ws = new WebSocket(`wss://${location.host}/ws`);
    const finish = (/** @type {IceConfig|null} */ ice) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      try { ws.close(1000); } catch { /* closed */ }
      resolve(ice);
    };
    const timer = setTimeout(() => { report('signaling', 'bad', tx('sigFail')); finish(null); }, 10000);
    let sent = 0;
    let rtt = 0;
    ws.onopen = () => {
      sent = performance.now();
      ws.send(JSON.stringify({ type: 'ping' }));
    };
    ws.onmessage = (ev) => {
      /** @type {ServerMsg} */
      let m;
      try { m = JSON.parse(String(ev.data)); } catch { return; }
      if (m.type === 'pong') {
        rtt = Math.round(performance.now() - sent);
        ws.send(JSON.stringify({ type: 'ice_request' }));
      } else if (m.type === 'ice') {
        report('signaling', 'ok', tx('sigOk', { ms: rtt }));
        finish(m.ice);
      } else if (m.type === 'error') {
        report('signaling', 'bad', `${tx('sigFail')} (${m.code})`);
        finish(null);
      }
    };
    ws.onclose = () => { if (!done) { report('signaling', 'bad', tx('sigFail')); finish(null); } };
  });
}

/**
 * Gathers candidates with one ICE server URL.
 * @param {RTCIceServer} server
 * @param {'all'|'relay'} policy
 * @returns {Promise<{candidates: RTCIceCandidate[], errors: number[]}>}
 */
async function gather(server, policy) {
  const pc = new RTCPeerConnection({ iceServers: [server], iceTransportPolicy: policy });
  /** @type {RTCIceCandidate[]} */
  const candidates = [];
  /** @type {number[]} */
  const errors = [];
  pc.addEventListener('icecandidateerror', (e) => errors.push(/** @type {any} */ (e).errorCode));
  pc.createDataChannel('check');
  const done = new Promise((resolve) => {
    const timer = setTimeout(resolve, GATHER_TIMEOUT_MS);
    pc.onicecandidate = (e) => {
      if (e.candidate && e.candidate.candidate) {
        candidates.push(e.candidate);
        // A relay candidate is the answer; no need to wait for the rest.
        if (policy === 'relay' && e.candidate.type === 'relay') { clearTimeout(timer); resolve(undefined); }
      } else if (!e.candidate) { clearTimeout(timer); resolve(undefined); }
    };
  });
  await pc.setLocalDescription();
  await done;
  pc.close();
  gatheredAny += candidates.length;
  return { candidates, errors };
}

/**
 * A STUN or TURN URL's parts (RFC 7064, RFC 7065); null if it is not one.
 * @param {string} url
 * @returns {{scheme: string, host: string, port: number, tcp: boolean}|null}
 */
function parseIceUrl(url) {
  const m = /^(stuns?|turns?):(\[[^\]]+\]|[^:?[\]]+)(?::(\d+))?(?:\?(.*))?$/i.exec(url);
  if (!m) return null;
  const scheme = m[1].toLowerCase();
  const secure = scheme.endsWith('s');
  const port = m[3] ? Number(m[3]) : secure ? 5349 : 3478;
  const tcp = secure || /(^|&)transport=tcp(&|$)/i.test(m[4] || '');
  return { scheme, host: m[2], port, tcp };
}

/**
 * @typedef {{url: string, port: number, host: string, username?: string, credential?: string}} Way
 * @typedef {{stun: {url: string, port: number}|null, relays: Record<string, Way>}} Plan
 */

/**
 * What to check, from the server's ICE servers: each TURN URL under the check it
 * belongs to (by transport, and whether it is on the port this page came over), plus
 * what the server serves without handing it out: STUN and TURN over TCP on the port
 * of its TURN over UDP (one listener serves all three), and plain TURN over TCP on the
 * HTTPS port wherever TURN over TLS is there (the HTTPS listener tells both apart).
 * @param {IceConfig} ice
 * @returns {Plan}
 */
function planChecks(ice) {
  /** @type {Plan} */
  const plan = { stun: null, relays: {} };
  for (const s of ice.iceServers || []) {
    for (const u of /** @type {string[]} */ ([]).concat(s.urls || [])) {
      const url = String(u);
      const p = parseIceUrl(url);
      if (!p || p.scheme === 'stuns') continue;
      if (p.scheme === 'stun') { plan.stun = plan.stun || { url, port: p.port }; continue; }
      const https = p.port === HTTPS_PORT ? 'Https' : '';
      const key = `${p.scheme === 'turns' ? 'turnTls' : p.tcp ? 'turnTcp' : 'turnUdp'}${https}`;
      plan.relays[key] = plan.relays[key] || { url, port: p.port, host: p.host, username: s.username, credential: s.credential };
    }
  }
  const main = plan.relays.turnUdp;
  if (main) {
    plan.stun = plan.stun || { url: `stun:${main.host}:${main.port}`, port: main.port };
    plan.relays.turnTcp = plan.relays.turnTcp || { ...main, url: `turn:${main.host}:${main.port}?transport=tcp` };
  }
  const tls = plan.relays.turnTlsHttps;
  if (tls) plan.relays.turnTcpHttps = plan.relays.turnTcpHttps || { ...tls, url: `turn:${tls.host}:${tls.port}?transport=tcp` };
  return plan;
}

/** @param {IceConfig} ice */
async function checkIce(ice) {
  const plan = planChecks(ice);
  shown = BASE.concat(['turnUdpHttps', 'turnTls'].filter((k) => plan.relays[k]));
  render();
  const jobs = [];
  for (const key of RELAYS) {
    const way = plan.relays[key];
    if (!way) {
      if (shown.includes(key)) report(key, 'warn', tx('notOffered'));
      continue;
    }
    jobs.push(gather({ urls: way.url, username: way.username, credential: way.credential }, 'relay').then(({ candidates }) => {
      const relay = candidates.find((c) => c.type === 'relay');
      const hint = key.endsWith('Https') ? ` ${tx('httpsHint')}` : '';
      if (relay) report(key, 'ok', tx('relayOk', { addr: `${relay.address}:${relay.port}`, port: way.port }) + hint);
      else report(key, 'bad', tx('relayFail', { s: GATHER_TIMEOUT_MS / 1000, port: way.port }));
    }));
  }
  const stun = plan.stun;
  /** @type {Promise<{candidates: RTCIceCandidate[], errors: number[]}>|null} */
  const stunJob = stun ? gather({ urls: stun.url }, 'all') : null;
  await Promise.all(jobs);
  if (!stun || !stunJob) { report('stun', 'warn', tx('notOffered')); return; }
  const { candidates } = await stunJob;
  const srflx = candidates.find((c) => c.type === 'srflx');
  if (srflx) report('stun', 'ok', tx('stunOk', { addr: `${srflx.address}:${srflx.port}` }));
  // No reflexive address, but UDP to that same port is answered: there is no NAT.
  else if (plan.relays.turnUdp && plan.relays.turnUdp.port === stun.port && results.turnUdp?.status === 'ok') report('stun', 'ok', tx('stunOkSame'));
  else report('stun', 'bad', tx('stunFail', { s: GATHER_TIMEOUT_MS / 1000, port: stun.port }));
}

/** @param {boolean} media @param {boolean} signaling */
function summarize(media, signaling) {
  const is = (/** @type {string} */ k, /** @type {Status} */ st) => !!results[k] && results[k].status === st;
  const ok = (/** @type {string} */ k) => is(k, 'ok');
  /** @type {string[]} */
  const lines = [];
  if (!signaling) lines.push(tx('noSignaling'));
  else {
    // The relay checks that ran (offered or derived).
    const tried = RELAYS.filter((k) => shown.includes(k) && (is(k, 'ok') || is(k, 'bad')));
    const udp = ok('turnUdp');
    const udpHttps = ok('turnUdpHttps');
    const streams = ['turnTcp', 'turnTls', 'turnTcpHttps', 'turnTlsHttps'].filter(ok);
    const via = Array.from(new Set(streams.map((k) => (k.startsWith('turnTls') ? 'TLS' : 'TCP')))).join(' / ');
    if (!tried.length) lines.push(tx('noTurn'));
    else if (tried.every(ok) && ok('stun')) lines.push(tx('allGood'));
    else if (udp) lines.push(tx('udpWorks'));
    else if (udpHttps) lines.push(tx('udpOnlyHttps'));
    else if (streams.length && !ok('turnTcp') && !ok('turnTls')) lines.push(tx('onlyHttps', { via }));
    else if (streams.length) lines.push(tx('udpBlocked', { via }));
    else lines.push(tx('noRelay'));
    if (ok('turnTcpHttps') && is('turnTlsHttps', 'bad')) lines.push(tx('tlsBroken'));
  }
  if (signaling && gatheredAny === 0) lines.push(tx('noCandidates'));
  if (!media) lines.push(tx('noMedia'));
  document.body.dataset.noCandidates = String(signaling && gatheredAny === 0);
  const el = /** @type {HTMLElement} */ (document.getElementById('summary'));
  el.replaceChildren(...lines.map((l) => { const p = document.createElement('p'); p.textContent = l; return p; }));
  el.hidden = false;
}

async function run() {
  const again = /** @type {HTMLButtonElement} */ (document.getElementById('again'));
  again.disabled = true;
  for (const k of Object.keys(results)) delete results[k];
  shown = BASE.slice();
  gatheredAny = 0;
  /** @type {HTMLElement} */ (document.getElementById('summary')).hidden = true;
  document.body.dataset.done = 'false';
  render();
  const [media, ice] = await Promise.all([checkMedia(), checkSignaling()]);
  if (ice) await checkIce(ice);
  else for (const k of shown.slice(2)) report(k, 'bad', tx('sigFail'));
  summarize(media, !!ice);
  again.disabled = false;
  document.body.dataset.done = 'true';
}

translate();
placeIcons();
/** @type {HTMLElement} */ (document.getElementById('again')).addEventListener('click', run);
run();
