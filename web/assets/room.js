// The room page: preview, join, the call (grid, controls, chat), room control for
// hosts (lock, room password, waiting room, admit/deny, kick, make host, mute
// requests), and every screen a user can end up on (room full, password, locked,
// waiting, denied, removed, unreachable, left).

import { t, translate } from './i18n.js';
import { icon, setIcon, placeIcons } from './icons.js';
import { Signaling, CLOSE_KICKED } from './signaling.js';
import { Peer } from './peer.js';
import { pageCertificate, newPageCertificate } from './safety.js';
import { FileSharing } from './files.js';
import { CallRecorder, canRecord } from './recorder.js';

/**
 * @typedef {import('./signaling.js').MediaState} MediaState
 * @typedef {import('./signaling.js').IceConfig} IceConfig
 * @typedef {import('./signaling.js').ServerMsg} ServerMsg
 * @typedef {import('./signaling.js').JoinedMsg} JoinedMsg
 * @typedef {import('./signaling.js').ChatIn} ChatIn
 * @typedef {import('./signaling.js').ErrorMsg} ErrorMsg
 * @typedef {import('./signaling.js').SignalingState} SignalingState
 * @typedef {import('./signaling.js').ControlMsg} ControlMsg
 * @typedef {import('./signaling.js').RoomStateMsg} RoomStateMsg
 * @typedef {import('./signaling.js').WaitingMsg} WaitingMsg
 * @typedef {import('./signaling.js').KnockMsg} KnockMsg
 * @typedef {import('./signaling.js').DeniedMsg} DeniedMsg
 * @typedef {import('./signaling.js').KickedMsg} KickedMsg
 * @typedef {import('./signaling.js').MuteRequestIn} MuteRequestIn
 * @typedef {import('./signaling.js').Waiter} Waiter
 */

const NAME_KEY = 'meshmeet.name';
const DEVICE_KEY = 'meshmeet.devices';
const VIDEO_CONSTRAINTS = { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 24, max: 30 } };
const AUDIO_CONSTRAINTS = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
/** Uplink budget shared by all peer connections, bits per second. */
const CAMERA_UPLINK_BPS = 2_000_000;
const SCREEN_UPLINK_BPS = 3_000_000;
/** How often the speaking levels are read, and the longest wait when reads are slow. */
const SPEAKER_POLL_MS = 250;
const SPEAKER_POLL_MAX_MS = 5000;
/** Waiting joiners the page lists at most (the server holds 20 per lobby). */
const MAX_KNOCKS = 50;
/** Notices kept for the test handle. */
const MAX_NOTICES = 50;
/** How long a notice about a host's request stays up. */
const NOTICE_MS = 8000;

/** @param {string} id @returns {HTMLElement} */
function $(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el;
}

const roomRaw = decodeURIComponent(location.pathname.replace(/^\/+/, '').split('/')[0] || '');

const state = {
  /** @type {string|null} */
  myId: null,
  room: roomRaw,
  capacity: 0,
  name: '',
  /** the server's password (`rooms.password`), if it asked for one */
  password: '',
  /** this room's own password, if a host set one */
  roomPassword: '',
  /** @type {'server'|'room'} which password the prompt asks for */
  pwScope: 'server',
  micOn: true,
  camOn: true,
  inCall: false,
  left: false,
  /** @type {IceConfig|null} */
  ice: null,
  /** when Join was last pressed (performance.now()), 0 before */
  joinAt: 0,
  /** @type {number} unix seconds */
  iceExpires: 0,
  /** @type {ReturnType<typeof setTimeout>|undefined} */
  iceTimer: undefined,
  /** @type {Map<string, Peer>} */
  peers: new Map(),
  /** local camera+mic stream (tracks may be missing) */
  local: new MediaStream(),
  /** @type {MediaStream|null} */
  screen: null,
  unread: 0,
  chatOpen: false,
  /** @type {string|null} */
  speaker: null,
  speakerSince: 0,
  /** the camera in use (kept while the camera is off and released) */
  camDeviceId: '',
  /** @type {string[]} chat lines as received (for tests) */
  chatLog: [],
  // Room control (protocol 1.1), from `joined.hosts` and `room_state`.
  /** @type {Set<string>} */
  hosts: new Set(),
  locked: false,
  /** whether joins need a room password (never the password itself) */
  hasRoomPassword: false,
  lobby: false,
  /** @type {Waiter[]} joiners in the lobby, oldest first (hosts only) */
  waiting: [],
  /** a `room_state` arrived since the last fresh join */
  roomStateSeen: false,
  /** @type {string|null} the id we knock with while waiting in the lobby */
  waitingId: null,
  /** the server removed us (kicked) or turned us away (denied): its screen is up */
  ended: false,
  /** @type {string[]} notices about hosts' requests, as shown (for tests) */
  notices: [],
  /** @type {RTCCertificate|null} the DTLS certificate of every connection (safety.js) */
  cert: null,
  /**
   * Safety codes by peer id: the fingerprint pair a code was derived from, the code,
   * whether the user marked it verified, whether it changed since it was first shown.
   * @type {Map<string, {pair: string, code: string, verified: boolean, changed: boolean}>}
   */
  safety: new Map(),
};

const signaling = new Signaling(`wss://${location.host}/ws`, {
  onMessage: (m) => onMessage(m),
  onState: (s) => onSignalingState(s),
});

// ---------------------------------------------------------------- helpers

/** @param {string} name */
function initials(name) {
  const parts = name.trim().split(/\s+/).filter(Boolean);
  if (parts.length === 0) return '?';
  const chars = parts.length > 1 ? [parts[0], parts[parts.length - 1]] : [parts[0]];
  return chars.map((p) => Array.from(p)[0] || '').join('').toUpperCase();
}

/** A stable hue per id, for avatar colours. @param {string} s */
function hue(s) {
  let h = 0;
  for (const c of s) h = (h * 31 + (c.codePointAt(0) || 0)) % 360;
  return h;
}

/** @param {string} text */
function toast(text, ms = 2500) {
  const el = $('toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(/** @type {any} */ (el).timer);
  /** @type {any} */ (el).timer = setTimeout(() => { el.hidden = true; }, ms);
}

function audioTrack() { return state.local.getAudioTracks()[0] || null; }
function videoTrack() { return state.local.getVideoTracks()[0] || null; }
/** The camera track to send: none while the camera is off (and released). */
function sendableVideo() {
  const v = videoTrack();
  return v && state.camOn && v.readyState === 'live' ? v : null;
}

/** @returns {MediaState} */
function mediaState() {
  return {
    audio: !!audioTrack() && state.micOn, video: !!videoTrack() && state.camOn, screen: !!state.screen,
    recording: recorder.active,
  };
}

async function copyLink() {
  const url = location.origin + location.pathname;
  try {
    await navigator.clipboard.writeText(url);
  } catch {
    const ta = document.createElement('textarea');
    ta.value = url;
    document.body.appendChild(ta);
    ta.select();
    try { document.execCommand('copy'); } catch { /* nothing more to try */ }
    ta.remove();
  }
  toast(t('copied'));
}

// ---------------------------------------------------------------- screens

/** @param {'preview'|'call'|'screen'} which */
function show(which) {
  $('preview').hidden = which !== 'preview';
  $('call').hidden = which !== 'call';
  $('screen').hidden = which !== 'screen';
  document.body.dataset.view = which;
}

/**
 * A full-page message (room full, unreachable, ...).
 * @param {{icon: string, title: string, text: string, password?: boolean, actions: [string, () => void, string?][]}} opts
 */
function messageScreen(opts) {
  show('screen');
  const ic = $('screen-icon');
  ic.replaceChildren(icon(opts.icon));
  $('screen-title').textContent = opts.title;
  $('screen-text').textContent = opts.text;
  $('pw-form').hidden = !opts.password;
  const actions = $('screen-actions');
  actions.replaceChildren();
  for (const [label, fn, cls] of opts.actions) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = cls || 'secondary';
    b.textContent = label;
    b.addEventListener('click', fn);
    actions.appendChild(b);
  }
  document.body.dataset.screen = opts.title;
  if (opts.password) /** @type {HTMLInputElement} */ ($('pw-input')).focus();
}

function newRoom() { location.href = '/?new'; }

// ---------------------------------------------------------------- local media

/**
 * Opens camera and microphone as far as possible; says what is missing.
 * @param {{audio?: string, video?: string}} [ids] preferred device ids
 */
async function openLocalMedia(ids = {}) {
  const note = $('device-note');
  note.hidden = true;
  const md = navigator.mediaDevices;
  if (!md || !md.getUserMedia) {
    note.textContent = t('missingText');
    note.hidden = false;
    return;
  }
  const video = ids.video ? { ...VIDEO_CONSTRAINTS, deviceId: { exact: ids.video } } : VIDEO_CONSTRAINTS;
  const audio = ids.audio ? { ...AUDIO_CONSTRAINTS, deviceId: { exact: ids.audio } } : AUDIO_CONSTRAINTS;
  /** @type {any} */
  let firstError = null;
  /** @type {MediaStream|null} */
  let stream = null;
  try {
    stream = await md.getUserMedia({ audio, video });
  } catch (e) {
    firstError = e;
  }
  if (!stream) {
    // One of them may work alone (no camera, or a camera without a microphone).
    /** @type {MediaStreamTrack[]} */
    const got = [];
    for (const c of [{ audio }, { video }]) {
      try {
        const s = await md.getUserMedia(c);
        got.push(...s.getTracks());
      } catch { /* this one is unavailable */ }
    }
    if (got.length) stream = new MediaStream(got);
  }
  for (const tr of state.local.getTracks()) { tr.stop(); state.local.removeTrack(tr); }
  if (stream) for (const tr of stream.getTracks()) state.local.addTrack(tr);
  const hasA = !!audioTrack();
  const hasV = !!videoTrack();
  if (!hasA && !hasV) {
    const denied = firstError && (firstError.name === 'NotAllowedError' || firstError.name === 'SecurityError');
    note.textContent = denied ? t('deniedText') : t('missingText');
    note.hidden = false;
  } else if (!hasA || !hasV) {
    note.textContent = t('partialText', { what: `${t(hasA ? 'micOn' : 'micOff')}, ${t(hasV ? 'camOn' : 'camOff')}` });
    note.hidden = false;
  }
  const v = videoTrack();
  if (v) state.camDeviceId = v.getSettings().deviceId || '';
  applyTrackEnabled();
  if (state.inCall) {
    // Joined before the devices opened: the tracks go on every connection now
    // (renegotiating where a slot was receive-only), and the others learn of them.
    for (const p of state.peers.values()) p.syncLocal();
    renderSelf();
    renderControls();
    sendMedia();
    startMeter();
  }
  await fillDeviceLists();
  updatePreview();
}

async function fillDeviceLists() {
  /** @type {MediaDeviceInfo[]} */
  let devices = [];
  try { devices = await navigator.mediaDevices.enumerateDevices(); } catch { /* none */ }
  /** @type {[string, MediaDeviceKind, MediaStreamTrack|null][]} */
  const lists = [['cam-select', 'videoinput', videoTrack()], ['mic-select', 'audioinput', audioTrack()]];
  for (const [id, kind, track] of lists) {
    const sel = /** @type {HTMLSelectElement} */ ($(id));
    sel.replaceChildren();
    const current = track ? track.getSettings().deviceId : '';
    let n = 0;
    for (const d of devices.filter((x) => x.kind === kind && x.deviceId)) {
      const o = document.createElement('option');
      o.value = d.deviceId;
      o.textContent = d.label || `${t(kind === 'videoinput' ? 'camera' : 'microphone')} ${++n}`;
      if (d.deviceId === current) o.selected = true;
      sel.appendChild(o);
    }
    if (!sel.options.length) {
      const o = document.createElement('option');
      o.value = '';
      o.textContent = t('noDevice');
      sel.appendChild(o);
    }
    sel.disabled = !track;
  }
}

/**
 * Switches one device: new track into the preview and every connection.
 * @param {'audio'|'video'} kind
 * @param {string} deviceId
 */
async function switchDevice(kind, deviceId) {
  const constraints = kind === 'audio'
    ? { audio: { ...AUDIO_CONSTRAINTS, deviceId: { exact: deviceId } } }
    : { video: { ...VIDEO_CONSTRAINTS, deviceId: { exact: deviceId } } };
  try {
    const s = await navigator.mediaDevices.getUserMedia(constraints);
    const fresh = s.getTracks()[0];
    const old = kind === 'audio' ? audioTrack() : videoTrack();
    if (old) { old.stop(); state.local.removeTrack(old); }
    state.local.addTrack(fresh);
    applyTrackEnabled();
    if (kind === 'video') {
      state.camDeviceId = deviceId;
      // A camera that is off stays released; the new choice opens when it is turned on.
      if (!state.camOn) fresh.stop();
    }
    if (kind === 'audio' || state.camOn) for (const p of state.peers.values()) p.replaceTrack(kind, fresh);
    try {
      const saved = JSON.parse(localStorage.getItem(DEVICE_KEY) || '{}');
      saved[kind] = deviceId;
      localStorage.setItem(DEVICE_KEY, JSON.stringify(saved));
    } catch { /* storage unavailable */ }
    updatePreview();
    startMeter();
  } catch (e) {
    toast(String(/** @type {any} */ (e).message || e));
  }
}

function applyTrackEnabled() {
  const a = audioTrack();
  const v = videoTrack();
  if (a) a.enabled = state.micOn;
  if (v) v.enabled = state.camOn;
}

function updatePreview() {
  const v = /** @type {HTMLVideoElement} */ ($('preview-video'));
  if (v.srcObject !== state.local) v.srcObject = state.local;
  const camVisible = !!videoTrack() && state.camOn;
  v.hidden = !camVisible;
  const av = $('preview-avatar');
  av.hidden = camVisible;
  const nm = /** @type {HTMLInputElement} */ ($('name')).value || '?';
  av.textContent = initials(nm);
  av.style.setProperty('--hue', String(hue(nm)));
  setToggle($('pv-mic'), !!audioTrack() && state.micOn, !audioTrack(), 'mic', 'micOff', 'mute', 'unmute');
  setToggle($('pv-cam'), !!videoTrack() && state.camOn, !videoTrack(), 'cam', 'camOff', 'stopVideo', 'startVideo');
}

/**
 * @param {HTMLElement} btn
 * @param {boolean} on
 * @param {boolean} unavailable
 * @param {string} onIcon
 * @param {string} offIcon
 * @param {string} onLabel label when on (the action that turns it off)
 * @param {string} offLabel
 */
function setToggle(btn, on, unavailable, onIcon, offIcon, onLabel, offLabel) {
  setIcon(btn, on ? onIcon : offIcon);
  btn.classList.toggle('off', !on);
  btn.setAttribute('aria-pressed', String(!on));
  const label = t(on ? onLabel : offLabel);
  btn.setAttribute('aria-label', label);
  btn.title = label;
  /** @type {HTMLButtonElement} */ (btn).disabled = unavailable;
}

// Microphone level meter in the preview, and local speaking detection in the call.
/** @type {AudioContext|null} */
let audioCtx = null;
/** @type {AnalyserNode|null} */
let analyser = null;
/** @type {MediaStreamAudioSourceNode|null} */
let meterSource = null;
let localLevel = 0;

function startMeter() {
  const a = audioTrack();
  if (!a) return;
  try {
    if (!audioCtx) audioCtx = new AudioContext();
    if (audioCtx.state === 'suspended') audioCtx.resume().catch(() => {});
    if (meterSource) meterSource.disconnect();
    meterSource = audioCtx.createMediaStreamSource(new MediaStream([a]));
    analyser = audioCtx.createAnalyser();
    analyser.fftSize = 512;
    meterSource.connect(analyser);
  } catch {
    analyser = null;
  }
}

function readLocalLevel() {
  if (!analyser || !state.micOn) return 0;
  const buf = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(buf);
  let sum = 0;
  for (const x of buf) sum += x * x;
  return Math.min(1, Math.sqrt(sum / buf.length) * 4);
}

// ---------------------------------------------------------------- tiles and grid

/**
 * Finds or creates a tile.
 * @param {string} key 'self', 'self:screen', peer id, or peer id + ':screen'
 * @returns {HTMLElement}
 */
function tile(key) {
  const grid = $('grid');
  let el = /** @type {HTMLElement|null} */ (grid.querySelector(`[data-key="${CSS.escape(key)}"]`));
  if (el) return el;
  el = document.createElement('div');
  el.className = 'tile';
  el.dataset.key = key;
  el.setAttribute('role', 'group');
  const video = document.createElement('video');
  video.autoplay = true;
  video.playsInline = true;
  video.setAttribute('playsinline', '');
  if (key.startsWith('self')) video.muted = true;
  const avatar = document.createElement('div');
  avatar.className = 'avatar';
  const foot = document.createElement('div');
  foot.className = 'tile-foot';
  const icons = document.createElement('span');
  icons.className = 'tile-icons';
  const name = document.createElement('span');
  name.className = 'tile-name';
  const host = document.createElement('span');
  host.className = 'tile-host';
  host.hidden = true;
  const hostText = document.createElement('span');
  hostText.textContent = t('host');
  host.append(icon('crown'), hostText);
  const safety = document.createElement('span');
  safety.className = 'tile-safety';
  safety.hidden = true;
  foot.append(icons, host, safety, name);
  const st = document.createElement('div');
  st.className = 'tile-state';
  el.append(video, avatar, foot, st);
  if (!key.startsWith('self') && !key.endsWith(':screen')) {
    // The menu for this participant: its safety code; for hosts, kick, make host, mute requests.
    const menu = document.createElement('button');
    menu.type = 'button';
    menu.className = 'tile-menu-btn';
    menu.hidden = true;
    menu.setAttribute('aria-haspopup', 'menu');
    menu.setAttribute('aria-expanded', 'false');
    menu.appendChild(icon('more'));
    menu.addEventListener('click', (e) => {
      e.stopPropagation();
      if (menuFor === key) closeTileMenu();
      else openTileMenu(key, menu);
    });
    el.appendChild(menu);
  }
  if (key.endsWith(':screen')) el.classList.add('screen');
  if (key === 'self') el.classList.add('self');
  grid.appendChild(el);
  layout();
  return el;
}

/** @param {string} key */
function removeTile(key) {
  const el = $('grid').querySelector(`[data-key="${CSS.escape(key)}"]`);
  if (el) {
    const v = el.querySelector('video');
    if (v) v.srcObject = null;
    el.remove();
    layout();
  }
}

/**
 * @param {HTMLElement} el
 * @param {{name: string, stream: MediaStream|null, videoOn: boolean, audioOn: boolean|null,
 *   state?: string, stateClass?: string, idForHue: string, host?: boolean, menu?: boolean}} o
 */
function fillTile(el, o) {
  const video = /** @type {HTMLVideoElement} */ (el.querySelector('video'));
  if (video.srcObject !== o.stream) {
    video.srcObject = o.stream;
    if (o.stream) playVideo(video);
  }
  el.classList.toggle('no-video', !o.videoOn);
  const avatar = /** @type {HTMLElement} */ (el.querySelector('.avatar'));
  avatar.textContent = initials(o.name);
  avatar.style.setProperty('--hue', String(hue(o.idForHue)));
  /** @type {HTMLElement} */ (el.querySelector('.tile-name')).textContent = o.name;
  el.setAttribute('aria-label', o.name);
  const icons = /** @type {HTMLElement} */ (el.querySelector('.tile-icons'));
  icons.replaceChildren();
  if (o.audioOn === false) {
    const m = icon('micOff');
    m.setAttribute('aria-hidden', 'false');
    m.setAttribute('role', 'img');
    m.setAttribute('aria-label', t('muted'));
    m.classList.add('muted-icon');
    icons.appendChild(m);
  }
  el.classList.toggle('is-muted', o.audioOn === false);
  // Tiles are redrawn on every connection-state change: write only what changed.
  const badge = /** @type {HTMLElement} */ (el.querySelector('.tile-host'));
  if (badge.hidden !== !o.host) badge.hidden = !o.host;
  el.classList.toggle('is-host', !!o.host);
  const menu = /** @type {HTMLElement|null} */ (el.querySelector('.tile-menu-btn'));
  if (menu) {
    if (menu.hidden !== !o.menu) menu.hidden = !o.menu;
    const label = t('tileMenu', { name: o.name });
    if (menu.title !== label) {
      menu.setAttribute('aria-label', label);
      menu.title = label;
    }
  }
  const st = /** @type {HTMLElement} */ (el.querySelector('.tile-state'));
  st.textContent = o.state || '';
  st.hidden = !o.state;
  st.className = `tile-state ${o.stateClass || ''}`;
}

/** @type {Set<HTMLVideoElement>} */
const blockedVideos = new Set();

/** @param {HTMLVideoElement} video */
function playVideo(video) {
  const p = video.play();
  if (p) {
    p.catch((e) => {
      if (e && e.name === 'NotAllowedError') {
        blockedVideos.add(video);
        const el = $('toast');
        el.replaceChildren();
        const b = document.createElement('button');
        b.className = 'primary';
        b.textContent = t('enableSound');
        b.addEventListener('click', () => {
          for (const v of blockedVideos) v.play().catch(() => {});
          blockedVideos.clear();
          el.hidden = true;
        });
        el.appendChild(b);
        el.hidden = false;
      }
    });
  }
}

const STATE_TEXT = {
  connecting: 'stConnecting', connected: 'stConnected', direct: 'stDirect', relay: 'stRelay',
  reconnecting: 'stReconnecting', failed: 'stFailed',
};

/** The tile's status line: the state, and for a relayed path the relay protocol. @param {Peer} p */
function stateText(p) {
  if (p.state === 'relay' && p.path) {
    // Our own leg to a relay (a relay candidate's relayProtocol), else the protocol of
    // our candidate that reaches the other side's relay.
    const proto = (p.path.relayProtocol || p.path.protocol || '').toUpperCase();
    if (proto) return t('stRelayVia', { proto });
  }
  return t(STATE_TEXT[p.state]);
}

function renderSelf() {
  if (!state.inCall) return;
  const el = tile('self');
  const name = `${state.name} (${t('you')})`;
  fillTile(el, {
    name, stream: state.local, videoOn: !!videoTrack() && state.camOn, audioOn: !!audioTrack() && state.micOn,
    idForHue: state.myId || 'self', host: isHost(),
  });
  markRecording(el, recorder.active);
  if (state.screen) {
    fillTile(tile('self:screen'), { name: t('yourScreen'), stream: state.screen, videoOn: true, audioOn: null, idForHue: 'self' });
  } else removeTile('self:screen');
}

/** @param {Peer} p */
function renderPeer(p) {
  if (!state.peers.has(p.id)) return;
  const el = tile(p.id);
  const media = p.media;
  const vTrack = p.mainStream ? p.mainStream.getVideoTracks()[0] : null;
  const videoOn = !!vTrack && !vTrack.muted && (media ? media.video : true);
  const connected = p.state === 'direct' || p.state === 'relay' || p.state === 'connected';
  fillTile(el, {
    name: p.name || 'Guest',
    stream: p.mainStream,
    videoOn,
    audioOn: media ? media.audio : null,
    state: stateText(p),
    stateClass: `st-${p.state}${connected ? ' fade' : ''}`,
    idForHue: p.id,
    host: state.hosts.has(p.id),
    menu: true,
  });
  el.dataset.state = p.state;
  renderSafety(p, el);
  watchFirstFrame(p, /** @type {HTMLVideoElement} */ (el.querySelector('video')));
  el.dataset.relayProtocol = p.state === 'relay' && p.path ? p.path.relayProtocol || p.path.protocol : '';
  el.dataset.audio = media ? String(media.audio) : '';
  el.dataset.video = media ? String(media.video) : '';
  el.dataset.screen = media ? String(media.screen) : '';
  markRecording(el, !!(media && media.recording));
  const sTrack = p.screenStream ? p.screenStream.getVideoTracks()[0] : null;
  const screenOn = !!sTrack && sTrack.readyState === 'live' && !sTrack.muted && (media ? media.screen : true);
  if (screenOn) {
    const se = tile(`${p.id}:screen`);
    fillTile(se, { name: t('screenOf', { name: p.name || 'Guest' }), stream: p.screenStream, videoOn: true, audioOn: null, idForHue: p.id });
    const v = /** @type {HTMLVideoElement} */ (se.querySelector('video'));
    v.muted = true;
  } else removeTile(`${p.id}:screen`);
}

/**
 * A tile's safety mark: "Verified" once the user marked the code so, a warning while
 * a code changed and was not looked at again.
 * @param {Peer} p @param {HTMLElement} el
 */
function renderSafety(p, el) {
  const s = state.safety.get(p.id);
  const mark = s ? (s.changed ? 'changed' : s.verified ? 'verified' : '') : '';
  if (el.dataset.safety === mark) return;
  el.dataset.safety = mark;
  const badge = /** @type {HTMLElement} */ (el.querySelector('.tile-safety'));
  badge.hidden = !mark;
  badge.className = `tile-safety ${mark}`;
  badge.replaceChildren();
  if (!mark) return;
  const text = document.createElement('span');
  text.textContent = t(mark === 'changed' ? 'safetyChangedShort' : 'safetyVerified');
  badge.append(icon(mark === 'changed' ? 'warn' : 'check'), text);
}

/**
 * A safety code from a connection's exchange (safety.js). The code of a pair of
 * certificates comes out the same on every connection between two pages; one that
 * differs from the code the page had for that participant means a certificate
 * changed (a page reload, or someone in the middle): the user is told, and a
 * verified mark goes.
 * @param {Peer} p @param {{code: string, local: string, remote: string}} r
 */
function onSafety(p, r) {
  if (state.peers.get(p.id) !== p) return;
  const pair = `${r.local}|${r.remote}`;
  const prev = state.safety.get(p.id);
  if (prev && prev.pair === pair && prev.code === r.code) return;
  const changed = !!prev && prev.code !== r.code;
  state.safety.set(p.id, { pair, code: r.code, verified: !changed && !!prev?.verified, changed: changed || !!prev?.changed });
  if (changed) notice(t('safetyChanged', { name: p.name || 'Guest' }));
  renderPeer(p);
  if (menuFor === p.id && $('tile-menu').dataset.view === 'safety') showSafety(p.id);
}

/**
 * Notes when the first frame of a peer's camera video is shown (`loadeddata`: the
 * element has its first decoded frame), for `firstFrameMs` in the test handle's stats.
 * @param {Peer} p @param {HTMLVideoElement} video
 */
function watchFirstFrame(p, video) {
  if (p.firstFrameAt || !video.srcObject || video.dataset.watched === String(p.serial)) return;
  video.dataset.watched = String(p.serial);
  const seen = () => { if (!p.firstFrameAt) p.firstFrameAt = performance.now(); };
  if (video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA && video.videoWidth > 0) seen();
  else video.addEventListener('loadeddata', seen, { once: true });
}

function renderCount() {
  const n = state.peers.size + 1;
  const c = $('count');
  c.textContent = t('participants', { n });
  c.hidden = !state.inCall;
}

/** Sizes the grid so tiles are as large as possible at 16:9. */
function layout() {
  const grid = $('grid');
  const tiles = /** @type {HTMLElement[]} */ (Array.from(grid.children));
  const n = tiles.length;
  if (!n) return;
  const gap = 8;
  const W = grid.clientWidth;
  const H = grid.clientHeight;
  if (!W || !H) return;
  let best = { cols: 1, w: 0, h: 0 };
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    const maxW = (W - gap * (cols - 1)) / cols;
    const maxH = (H - gap * (rows - 1)) / rows;
    const w = Math.min(maxW, (maxH * 16) / 9);
    if (w > best.w) best = { cols, w, h: (w * 9) / 16 };
  }
  // On a narrow portrait screen, taller tiles use the space better.
  const portrait = W < 600 && H > W;
  if (portrait) {
    const cols = n <= 2 ? 1 : 2;
    const rows = Math.ceil(n / cols);
    const w = (W - gap * (cols - 1)) / cols;
    const h = Math.min((H - gap * (rows - 1)) / rows, w * 1.4);
    best = { cols, w, h };
  }
  grid.style.gridTemplateColumns = `repeat(${best.cols}, ${Math.floor(best.w)}px)`;
  for (const el of tiles) {
    el.style.width = `${Math.floor(best.w)}px`;
    el.style.height = `${Math.floor(best.h)}px`;
  }
}

// ---------------------------------------------------------------- call controls

function renderControls() {
  setToggle($('btn-mic'), !!audioTrack() && state.micOn, !audioTrack(), 'mic', 'micOff', 'mute', 'unmute');
  setToggle($('btn-cam'), !!videoTrack() && state.camOn, !videoTrack(), 'cam', 'camOff', 'stopVideo', 'startVideo');
  const share = $('btn-share');
  setIcon(share, state.screen ? 'screenOff' : 'screen');
  share.classList.toggle('active', !!state.screen);
  share.setAttribute('aria-pressed', String(!!state.screen));
  const sl = t(state.screen ? 'stopShare' : 'share');
  share.setAttribute('aria-label', sl);
  share.title = sl;
  /** @type {HTMLButtonElement} */ (share).disabled = !(navigator.mediaDevices && 'getDisplayMedia' in navigator.mediaDevices);
  const chat = $('btn-chat');
  chat.classList.toggle('active', state.chatOpen);
  chat.setAttribute('aria-pressed', String(state.chatOpen));
}

function sendMedia() {
  if (state.inCall) signaling.send({ type: 'media', ...mediaState() });
}

function toggleMic() {
  if (!audioTrack()) return;
  state.micOn = !state.micOn;
  applyTrackEnabled();
  updatePreview();
  renderControls();
  renderSelf();
  sendMedia();
}

let camBusy = false;

/** Camera off releases the device (its light goes off); camera on opens it again. */
async function toggleCam() {
  const track = videoTrack();
  if (!track || camBusy) return;
  camBusy = true;
  try {
    if (state.camOn) {
      state.camOn = false;
      track.enabled = false;
      for (const p of state.peers.values()) p.replaceTrack('video', null);
      track.stop();
    } else {
      if (track.readyState === 'ended') {
        const deviceId = state.camDeviceId;
        const s = await navigator.mediaDevices.getUserMedia({
          video: deviceId ? { ...VIDEO_CONSTRAINTS, deviceId: { ideal: deviceId } } : VIDEO_CONSTRAINTS,
        });
        const fresh = s.getVideoTracks()[0];
        state.local.removeTrack(track);
        state.local.addTrack(fresh);
        for (const p of state.peers.values()) p.replaceTrack('video', fresh);
      }
      state.camOn = true;
      applyTrackEnabled();
    }
  } catch (e) {
    toast(String(/** @type {any} */ (e).message || e));
  } finally {
    camBusy = false;
  }
  updatePreview();
  renderControls();
  renderSelf();
  sendMedia();
}

async function toggleShare() {
  if (state.screen) {
    stopShare();
    return;
  }
  try {
    const s = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15, max: 30 } }, audio: false });
    const track = s.getVideoTracks()[0];
    if (!track) return;
    if ('contentHint' in track) track.contentHint = 'detail';
    track.addEventListener('ended', () => { if (state.screen === s) stopShare(); });
    state.screen = s;
    for (const p of state.peers.values()) p.setScreen(s);
    renderSelf();
    renderControls();
    sendMedia();
  } catch (e) {
    if (e && /** @type {any} */ (e).name !== 'NotAllowedError') toast(t('shareFailed'));
  }
}

function stopShare() {
  const s = state.screen;
  if (!s) return;
  state.screen = null;
  for (const tr of s.getTracks()) tr.stop();
  for (const p of state.peers.values()) p.setScreen(null);
  renderSelf();
  renderControls();
  sendMedia();
}

/** @param {boolean} [open] */
function toggleChat(open) {
  state.chatOpen = open ?? !state.chatOpen;
  $('chat').hidden = !state.chatOpen;
  document.body.classList.toggle('chat-open', state.chatOpen);
  if (state.chatOpen) {
    state.unread = 0;
    renderUnread();
    /** @type {HTMLInputElement} */ ($('chat-input')).focus();
  }
  renderControls();
  layout();
}

function renderUnread() {
  const b = $('unread');
  b.textContent = state.unread > 99 ? '99+' : String(state.unread);
  b.hidden = state.unread === 0;
  const label = state.unread ? `${t('chat')} · ${state.unread}` : t('chat');
  $('btn-chat').setAttribute('aria-label', label);
  document.title = `${state.unread ? `(${state.unread}) ` : ''}${state.room} · meshmeet`;
}

/** Chat lines kept (in the list and in `chatLog`); older ones are dropped. */
const MAX_CHAT_LINES = 500;

/** @param {ChatIn} m */
function addChat(m) {
  // Lines are shown in the order the server sent them (the same for everyone).
  state.chatLog.push(m.text);
  const li = document.createElement('li');
  li.className = m.from === state.myId ? 'mine' : '';
  const head = document.createElement('div');
  head.className = 'chat-meta';
  const who = document.createElement('strong');
  who.textContent = m.from === state.myId ? t('you') : m.name;
  const when = document.createElement('time');
  const d = new Date(typeof m.ts === 'number' ? m.ts : Date.now());
  when.dateTime = d.toISOString();
  when.textContent = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  head.append(who, when);
  const body = document.createElement('p');
  body.textContent = m.text;
  li.append(head, body);
  const list = $('chat-list');
  list.appendChild(li);
  // A long call keeps only the latest lines (memory stays bounded); the oldest go.
  while (state.chatLog.length > MAX_CHAT_LINES) state.chatLog.shift();
  while (list.childElementCount > MAX_CHAT_LINES) list.firstElementChild?.remove();
  $('chat-empty').hidden = true;
  list.scrollTop = list.scrollHeight;
  if (!state.chatOpen && m.from !== state.myId) {
    state.unread += 1;
    renderUnread();
  }
}

function leave() {
  if (state.left) return;
  state.left = true;
  signaling.leave();
  signaling.close();
  endCall();
  messageScreen({
    icon: 'leave', title: t('leftTitle'), text: '',
    actions: [[t('rejoin'), () => location.reload(), 'primary'], [t('home'), () => { location.href = '/'; }]],
  });
}

/** The call is over for us (left or removed): connections, devices, timers, menus. */
function endCall() {
  // The file is finished while the tiles are still there; it stays offered after.
  recorder.stop();
  state.inCall = false;
  closeAllPeers();
  stopShare();
  for (const tr of state.local.getTracks()) tr.stop();
  clearTimeout(state.iceTimer);
  $('banner').hidden = true;
  state.hosts = new Set();
  state.waiting = [];
  renderRoomControl();
  renderCount();
  renderRecording();
}

function closeAllPeers() {
  for (const p of state.peers.values()) p.close();
  state.peers.clear();
  state.safety.clear();
  for (const el of Array.from($('grid').querySelectorAll('.tile'))) {
    const k = /** @type {HTMLElement} */ (el).dataset.key || '';
    if (!k.startsWith('self')) removeTile(k);
  }
}

// ---------------------------------------------------------------- room control

/** Whether we are a host of the room (the server decides; this only shows it). */
function isHost() {
  return state.inCall && !!state.myId && state.hosts.has(state.myId);
}

/**
 * Sends a host action. The server checks it; a refusal comes back as an error.
 * @param {ControlMsg} msg
 */
function control(msg) {
  signaling.send(msg);
}

/**
 * A notice that stays up a while (a host's request), kept for the test handle.
 * @param {string} text
 */
function notice(text) {
  state.notices.push(text);
  while (state.notices.length > MAX_NOTICES) state.notices.shift();
  toast(text, NOTICE_MS);
}

/** Room state everywhere it shows: status icons, host badges, the room menu, knocks. */
function renderRoomControl() {
  const inCall = state.inCall;
  $('st-locked').hidden = !(inCall && state.locked);
  $('st-password').hidden = !(inCall && state.hasRoomPassword);
  $('st-lobby').hidden = !(inCall && state.lobby);
  const host = isHost();
  document.body.dataset.host = String(host);
  const btn = $('btn-room');
  btn.hidden = !host;
  if (!host) {
    closeRoomPanel();
    // A tile menu with a host's items goes; one on a safety code stays.
    if ($('tile-menu').querySelector('[data-action^="kick"], [data-action^="mute-"]')) closeTileMenu();
  }
  /** @type {HTMLInputElement} */ ($('rc-lock')).checked = state.locked;
  /** @type {HTMLInputElement} */ ($('rc-lobby')).checked = state.lobby;
  $('rc-pw-state').textContent = t(state.hasRoomPassword ? 'roomPasswordIsSet' : 'roomPasswordNone');
  /** @type {HTMLButtonElement} */ ($('rc-pw-clear')).disabled = !state.hasRoomPassword;
  const waiting = host ? state.waiting.length : 0;
  const badge = $('waiting-badge');
  badge.textContent = String(waiting);
  badge.hidden = waiting === 0;
  renderKnocks();
  renderSelf();
  for (const p of state.peers.values()) renderPeer(p);
}

/** Admit/deny prompts, one per joiner in the lobby (the server's list is the truth). */
function renderKnocks() {
  const box = $('knocks');
  const list = isHost() ? state.waiting.slice(0, MAX_KNOCKS) : [];
  const want = new Set(list.map((w) => w.id));
  for (const card of Array.from(box.children)) {
    if (!want.has(/** @type {HTMLElement} */ (card).dataset.id || '')) card.remove();
  }
  let prev = null;
  for (const w of list) {
    let card = /** @type {HTMLElement|null} */ (box.querySelector(`[data-id="${CSS.escape(w.id)}"]`));
    if (!card) card = knockCard(w);
    // Oldest first, as the server lists them.
    if (prev ? prev.nextElementSibling !== card : box.firstElementChild !== card) {
      if (prev) prev.after(card); else box.prepend(card);
    }
    prev = card;
  }
  box.hidden = list.length === 0;
}

/** @param {Waiter} w */
function knockCard(w) {
  const card = document.createElement('div');
  card.className = 'knock';
  card.dataset.id = w.id;
  card.setAttribute('role', 'group');
  const text = document.createElement('p');
  text.textContent = t('knockText', { name: w.name });
  const actions = document.createElement('div');
  actions.className = 'actions';
  /** @type {[string, 'admit'|'deny', string][]} */
  const buttons = [[t('admit'), 'admit', 'primary'], [t('deny'), 'deny', 'secondary']];
  for (const [label, type, cls] of buttons) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = `${cls} knock-${type}`;
    b.textContent = label;
    b.addEventListener('click', () => {
      // Until the server's next list takes this joiner out.
      for (const x of card.querySelectorAll('button')) /** @type {HTMLButtonElement} */ (x).disabled = true;
      control({ type, id: w.id });
    });
    actions.appendChild(b);
  }
  card.append(text, actions);
  card.setAttribute('aria-label', text.textContent);
  return card;
}

/** @param {RoomStateMsg} m */
function onRoomState(m) {
  const wasHost = isHost();
  const seen = state.roomStateSeen;
  state.roomStateSeen = true;
  state.hosts = new Set(Array.isArray(m.hosts) ? m.hosts.filter((h) => typeof h === 'string') : []);
  state.locked = m.locked === true;
  state.hasRoomPassword = m.password === true;
  state.lobby = m.lobby === true;
  state.waiting = Array.isArray(m.waiting)
    ? m.waiting.filter((w) => w && typeof w.id === 'string' && typeof w.name === 'string').slice(0, MAX_KNOCKS)
    : [];
  if (seen && !wasHost && isHost()) notice(t('youHost'));
  renderRoomControl();
}

/** @param {KnockMsg} m */
function onKnock(m) {
  // The `room_state` that follows carries the full list; this keeps the prompt up
  // even before it arrives.
  if (!isHost() || typeof m.id !== 'string' || typeof m.name !== 'string') return;
  if (!state.waiting.some((w) => w.id === m.id) && state.waiting.length < MAX_KNOCKS) {
    state.waiting.push({ id: m.id, name: m.name });
  }
  renderRoomControl();
}

/** @param {boolean} [open] */
function toggleRoomPanel(open) {
  const panel = $('room-panel');
  const want = open ?? panel.hidden === true;
  if (want && !isHost()) return;
  panel.hidden = !want;
  $('btn-room').setAttribute('aria-expanded', String(want));
  $('btn-room').classList.toggle('active', want);
  if (want) closeTileMenu();
}

function closeRoomPanel() {
  if (!$('room-panel').hidden) toggleRoomPanel(false);
}

/** @type {string|null} the peer whose tile menu is open */
let menuFor = null;

/**
 * The host's menu for one participant, next to its tile's button.
 * @param {string} id
 * @param {HTMLElement} anchor
 */
function openTileMenu(id, anchor) {
  const p = state.peers.get(id);
  if (!p) return;
  closeTileMenu();
  closeRoomPanel();
  const menu = $('tile-menu');
  menu.replaceChildren();
  const name = p.name || 'Guest';
  /** @param {string} label @param {string} action @param {() => void} fn @param {string} [cls] */
  const item = (label, action, fn, cls = '') => {
    const b = document.createElement('button');
    b.type = 'button';
    b.setAttribute('role', 'menuitem');
    b.className = `menu-item ${cls}`;
    b.dataset.action = action;
    b.textContent = label;
    b.addEventListener('click', (e) => { e.stopPropagation(); fn(); });
    menu.appendChild(b);
    return b;
  };
  item(t('safetyCode'), 'safety', () => showSafety(id));
  if (isHost()) hostItems(id, name, item);
  menu.setAttribute('aria-label', t('tileMenu', { name }));
  menu.dataset.for = id;
  menu.dataset.view = 'menu';
  menu.setAttribute('role', 'menu');
  menu.hidden = false;
  menuFor = id;
  anchor.setAttribute('aria-expanded', 'true');
  placeTileMenu(anchor);
  const first = /** @type {HTMLElement|null} */ (menu.querySelector('button'));
  if (first) first.focus();
}

/**
 * A host's items in a participant's tile menu.
 * @param {string} id @param {string} name
 * @param {(label: string, action: string, fn: () => void, cls?: string) => HTMLButtonElement} item
 */
function hostItems(id, name, item) {
  const menu = $('tile-menu');
  item(t('askMute'), 'mute-audio', () => {
    control({ type: 'mute_request', id, audio: true, video: false });
    toast(t('askedMute', { name }));
    closeTileMenu();
  });
  item(t('askCamOff'), 'mute-video', () => {
    control({ type: 'mute_request', id, audio: false, video: true });
    toast(t('askedCamOff', { name }));
    closeTileMenu();
  });
  if (!state.hosts.has(id)) {
    item(t('makeHost'), 'host', () => { control({ type: 'host', id }); closeTileMenu(); });
  }
  item(t('kick'), 'kick', () => {
    // A second step, in place: removing someone is not undone by a click.
    menu.replaceChildren();
    const q = document.createElement('p');
    q.className = 'menu-question';
    q.textContent = t('kickConfirm', { name });
    menu.appendChild(q);
    item(t('remove'), 'kick-confirm', () => { control({ type: 'kick', id }); closeTileMenu(); }, 'danger').focus();
    item(t('cancel'), 'kick-cancel', () => closeTileMenu());
  }, 'danger');
}

/**
 * The tile menu shows a participant's safety code, in place of its items: the code,
 * how to use it, and a control to mark it verified.
 * @param {string} id
 */
function showSafety(id) {
  const p = state.peers.get(id);
  const menu = $('tile-menu');
  if (!p || menuFor !== id) return;
  const name = p.name || 'Guest';
  const s = state.safety.get(id);
  if (s && s.changed) s.changed = false;
  menu.replaceChildren();
  menu.dataset.view = 'safety';
  menu.setAttribute('role', 'dialog');
  const title = document.createElement('p');
  title.className = 'menu-question';
  title.textContent = t('safetyTitle', { name });
  menu.appendChild(title);
  const code = document.createElement('p');
  code.className = 'safety-code';
  code.id = 'safety-code';
  if (s) {
    code.textContent = s.code;
    code.dataset.code = s.code;
    code.setAttribute('aria-label', s.code.replace(/\d/g, '$& ').replace(/ +/g, ' ').trim());
  } else {
    code.textContent = t('safetyPending');
    code.classList.add('pending');
  }
  menu.appendChild(code);
  const help = document.createElement('p');
  help.className = 'safety-help';
  help.textContent = t('safetyHelp', { name });
  menu.appendChild(help);
  /** @param {string} label @param {string} action @param {() => void} fn */
  const item = (label, action, fn) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'menu-item';
    b.dataset.action = action;
    b.textContent = label;
    b.addEventListener('click', (e) => { e.stopPropagation(); fn(); });
    menu.appendChild(b);
    return b;
  };
  if (s) {
    const verify = item(s.verified ? t('safetyUnverify') : t('safetyVerify'), 'safety-verify', () => {
      s.verified = !s.verified;
      renderPeer(p);
      showSafety(id);
      const again = /** @type {HTMLElement|null} */ (menu.querySelector('[data-action="safety-verify"]'));
      if (again) again.focus();
    });
    verify.setAttribute('aria-pressed', String(s.verified));
  }
  const close = item(t('close'), 'safety-close', () => closeTileMenu());
  renderPeer(p);
  const anchor = /** @type {HTMLElement|null} */ ($('grid').querySelector(`[data-key="${CSS.escape(id)}"] .tile-menu-btn`));
  if (anchor) placeTileMenu(anchor);
  if (!menu.contains(document.activeElement)) close.focus();
}

/** Puts the tile menu below its button, kept inside the window. @param {HTMLElement} anchor */
function placeTileMenu(anchor) {
  const menu = $('tile-menu');
  const r = anchor.getBoundingClientRect();
  const w = menu.offsetWidth;
  const h = menu.offsetHeight;
  const left = Math.max(8, Math.min(r.right - w, window.innerWidth - w - 8));
  const top = r.bottom + 4 + h > window.innerHeight - 8 ? Math.max(8, r.top - 4 - h) : r.bottom + 4;
  menu.style.left = `${Math.round(left)}px`;
  menu.style.top = `${Math.round(top)}px`;
}

function closeTileMenu() {
  const menu = $('tile-menu');
  if (menuFor) {
    const btn = $('grid').querySelector(`[data-key="${CSS.escape(menuFor)}"] .tile-menu-btn`);
    if (btn) btn.setAttribute('aria-expanded', 'false');
  }
  menuFor = null;
  menu.hidden = true;
  delete menu.dataset.for;
  delete menu.dataset.view;
  menu.replaceChildren();
}

/** @param {WaitingMsg} m */
function onWaiting(m) {
  state.waitingId = typeof m.id === 'string' ? m.id : '';
  document.body.dataset.waiting = 'true';
  messageScreen({
    icon: 'hourglass', title: t('waitingTitle'), text: t('waitingText'),
    actions: [[t('cancel'), cancelWaiting]],
  });
}

/** Gives up waiting in the lobby: `leave` takes us out; back to the preview. */
function cancelWaiting() {
  signaling.leave();
  state.waitingId = null;
  delete document.body.dataset.waiting;
  show('preview');
  resetJoinButton();
}

/** @param {DeniedMsg} m */
function onDenied(m) {
  state.waitingId = null;
  state.ended = true;
  delete document.body.dataset.waiting;
  const reason = m.reason === 'timeout' || m.reason === 'locked' ? m.reason : 'denied';
  const [title, text] = reason === 'timeout' ? ['timeoutTitle', 'timeoutText']
    : reason === 'locked' ? ['lockedTitle', 'lockedWhileWaitingText'] : ['deniedTitle', 'notLetInText'];
  document.body.dataset.ended = `denied:${reason}`;
  messageScreen({
    icon: reason === 'timeout' ? 'hourglass' : reason === 'locked' ? 'lock' : 'cross',
    title: t(title), text: t(text),
    actions: [[t('askAgain'), () => { show('preview'); doJoin(); }, 'primary'], [t('home'), () => { location.href = '/'; }]],
  });
}

/** @param {KickedMsg} m */
function onKicked(m) {
  state.ended = true;
  endCall();
  document.body.dataset.ended = 'kicked';
  const name = typeof m.name === 'string' && m.name ? m.name : '';
  messageScreen({
    icon: 'cross', title: t('kickedTitle'), text: name ? t('kickedText', { name }) : t('kickedTextAnon'),
    actions: [[t('home'), () => { location.href = '/'; }, 'primary'], [t('rejoin'), () => location.reload()]],
  });
}

/**
 * A host asks us to turn the microphone and/or camera off: done at once (never
 * anything turned on), the others get the usual `media`, and a notice says who asked.
 * @param {MuteRequestIn} m
 */
async function onMuteRequest(m) {
  if (!state.inCall) return;
  const audio = m.audio === true;
  const video = m.video === true;
  if (!audio && !video) return;
  const name = typeof m.name === 'string' && m.name ? m.name : t('host');
  notice(t(audio && video ? 'bothOffBy' : audio ? 'mutedBy' : 'camOffBy', { name }));
  if (audio && audioTrack() && state.micOn) toggleMic();
  if (video && videoTrack() && state.camOn) await toggleCam();
}

// ---------------------------------------------------------------- peers

/** Sender limits for the current room size. */
function limits() {
  const others = Math.max(1, state.peers.size);
  const video = Math.round(Math.min(1_200_000, Math.max(200_000, CAMERA_UPLINK_BPS / others)));
  const scale = others <= 2 ? 1 : others === 3 ? 1.5 : 2;
  const screen = Math.round(Math.min(2_500_000, Math.max(300_000, SCREEN_UPLINK_BPS / others)));
  return { video: { maxBitrate: video, scale }, screen: { maxBitrate: screen } };
}

/**
 * @param {{iceServers?: RTCIceServer[], iceTransportPolicy?: RTCIceTransportPolicy}} ice
 * @returns {RTCConfiguration}
 */
function rtcConfig(ice) {
  return {
    iceServers: ice.iceServers || [],
    iceTransportPolicy: ice.iceTransportPolicy || 'all',
    // All media of a connection on one transport: one ICE agent, one allocation per
    // TURN URL (not one per media line), RTP and RTCP on one port.
    bundlePolicy: 'max-bundle',
    rtcpMuxPolicy: 'require',
    // The same certificate on every connection (safety codes stay put); given again on
    // every setConfiguration, which may not change or drop it.
    ...(state.cert ? { certificates: [state.cert] } : {}),
  };
}

/**
 * @param {string} id
 * @param {string} name
 */
function addPeer(id, name) {
  const existing = state.peers.get(id);
  if (existing) return existing;
  if (!state.myId) throw new Error('not joined');
  // In each pair the id that sorts first (byte-wise) is the polite one.
  const polite = compareBytes(state.myId, id) < 0;
  const p = new Peer(id, name, polite, rtcConfig(state.ice || { iceServers: [] }), {
    send: (m) => signaling.send(m),
    onState: (peer) => renderPeer(peer),
    onTracks: (peer) => renderPeer(peer),
    local: () => ({ stream: state.local, audio: audioTrack(), video: sendableVideo(), screen: state.screen }),
    limits,
    onSafety,
    onChannel: (peer, channel) => files.onChannel(peer, channel),
  });
  state.peers.set(id, p);
  renderPeer(p);
  renderCount();
  for (const q of state.peers.values()) q.applyLimits();
  return p;
}

/** @param {string} id */
function removePeer(id) {
  const p = state.peers.get(id);
  if (!p) return;
  if (menuFor === id) closeTileMenu();
  p.close();
  state.peers.delete(id);
  state.safety.delete(id);
  removeTile(id);
  removeTile(`${id}:screen`);
  renderCount();
  renderRecording();
  for (const q of state.peers.values()) q.applyLimits();
}

/** UTF-8 byte-wise comparison. @param {string} a @param {string} b */
function compareBytes(a, b) {
  const ea = new TextEncoder().encode(a);
  const eb = new TextEncoder().encode(b);
  for (let i = 0; i < Math.min(ea.length, eb.length); i++) {
    if (ea[i] !== eb[i]) return ea[i] - eb[i];
  }
  return ea.length - eb.length;
}

/** Asks for fresh ICE credentials ahead of their expiry. */
function scheduleIceRenewal() {
  clearTimeout(state.iceTimer);
  if (!state.iceExpires) return;
  const left = state.iceExpires * 1000 - Date.now();
  const margin = Math.max(60_000, left * 0.1);
  const wait = Math.max(5_000, left - margin);
  state.iceTimer = setTimeout(renewIce, Math.min(wait, 2 ** 31 - 1));
}

function renewIce() {
  if (state.inCall) signaling.send({ type: 'ice_request', ...(state.password ? { password: state.password } : {}) });
}

/** @param {IceConfig|undefined} ice */
function setIce(ice) {
  if (!ice || typeof ice !== 'object') return;
  state.ice = ice;
  state.iceExpires = typeof ice.expiresAt === 'number' ? ice.expiresAt : 0;
  scheduleIceRenewal();
}

// ---------------------------------------------------------------- signaling

/** @param {SignalingState} s */
function onSignalingState(s) {
  if (state.left) return;
  if (s === 'ended') {
    // Closed with 4002 or 4003: the `kicked` or `denied` before it put its screen up.
    // Without one (not expected), the close code alone says which.
    $('banner').hidden = true;
    document.body.dataset.signaling = s;
    if (state.ended) return;
    if (signaling.endCode === CLOSE_KICKED) onKicked({ type: 'kicked', by: '', name: '' });
    else onDenied({ type: 'denied', room: state.room, reason: 'denied' });
    return;
  }
  $('banner').hidden = !(s === 'reconnecting' && state.inCall);
  document.body.dataset.signaling = s;
  if (s === 'unreachable') {
    if (state.inCall) {
      // Keep trying in the background; the call itself does not need the server.
      $('banner').hidden = false;
      return;
    }
    messageScreen({
      icon: 'cross', title: t('unreachableTitle'), text: t('unreachableText'),
      actions: [[t('tryAgain'), () => { signaling.attempt = 0; show('preview'); signaling.connect(); }, 'primary']],
    });
  }
}

/** room messages that arrived before our own `joined` */
/** @type {ServerMsg[]} */
let early = [];
const ROOM_TYPES = new Set(['peer_joined', 'peer_left', 'offer', 'answer', 'candidate', 'media', 'chat']);

/** @param {ServerMsg} m */
function onMessage(m) {
  // The server may deliver another member's message before our own `joined`;
  // hold it until we know who we are.
  if (!state.inCall && ROOM_TYPES.has(m.type)) {
    if (early.length < 256) early.push(m);
    return;
  }
  switch (m.type) {
    case 'joined': return onJoined(m);
    case 'peer_joined': {
      if (typeof m.id !== 'string' || m.id === state.myId) return;
      addPeer(m.id, typeof m.name === 'string' ? m.name : '');
      return;
    }
    case 'peer_left': return removePeer(m.id);
    case 'offer':
    case 'answer': {
      if (typeof m.from !== 'string' || typeof m.sdp !== 'string' || !state.inCall) return;
      let p = state.peers.get(m.from);
      if (!p) {
        if (m.type !== 'offer') return;
        p = addPeer(m.from, '');
      }
      p.onDescription({ type: m.type, sdp: m.sdp });
      return;
    }
    case 'candidate': {
      const p = state.peers.get(m.from);
      if (p) p.onCandidate(m.candidate || null);
      return;
    }
    case 'media': {
      const p = state.peers.get(m.from);
      if (!p) return;
      p.media = { audio: !!m.audio, video: !!m.video, screen: !!m.screen, recording: m.recording === true };
      renderPeer(p);
      renderRecording();
      return;
    }
    case 'ice': {
      setIce(m.ice);
      if (state.ice) for (const p of state.peers.values()) p.setConfiguration(rtcConfig(state.ice));
      return;
    }
    case 'chat': return addChat(m);
    case 'room_state': return onRoomState(m);
    case 'knock': return onKnock(m);
    case 'waiting': return onWaiting(m);
    case 'denied': return onDenied(m);
    case 'kicked': return onKicked(m);
    case 'mute_request': {
      onMuteRequest(m).catch(() => {});
      return;
    }
    case 'room_full': {
      state.inCall = false;
      state.waitingId = null;
      delete document.body.dataset.waiting;
      closeAllPeers();
      renderRoomControl();
      messageScreen({
        icon: 'user', title: t('fullTitle'), text: t('fullText', { n: m.capacity }),
        actions: [[t('tryAgain'), () => location.reload(), 'primary'], [t('newRoomInstead'), newRoom]],
      });
      return;
    }
    case 'error': return onError(m);
    default:
  }
}

/** @param {JoinedMsg} m */
function onJoined(m) {
  const fresh = !m.resumed || m.id !== state.myId;
  state.myId = m.id;
  state.capacity = m.capacity;
  state.waitingId = null;
  delete document.body.dataset.waiting;
  // Hosts now; the rest of the room's state comes in the `room_state` that follows.
  state.hosts = new Set(Array.isArray(m.hosts) ? m.hosts.filter((h) => typeof h === 'string') : []);
  if (fresh) state.roomStateSeen = false;
  setIce(m.ice);
  /** @type {{id: string, name: string, media: MediaState|null}[]} */
  const peers = Array.isArray(m.peers) ? m.peers : [];
  if (fresh) {
    // A new identity (first join, or the resume grace ran out): start over.
    closeAllPeers();
  }
  if (!state.inCall) {
    state.inCall = true;
    show('call');
    renderControls();
    startMeter();
  }
  $('banner').hidden = true;
  const present = new Set(peers.map((p) => p.id));
  for (const id of Array.from(state.peers.keys())) if (!present.has(id)) removePeer(id);
  for (const info of peers) {
    let p = state.peers.get(info.id);
    if (!p) {
      p = addPeer(info.id, info.name);
      // There before we joined: its first frame counts from our Join.
      if (fresh && state.joinAt) p.since = state.joinAt;
      p.start();
    } else if (state.ice) {
      p.setConfiguration(rtcConfig(state.ice));
    }
    p.name = info.name;
    p.media = info.media || null;
    renderPeer(p);
  }
  renderRoomControl();
  renderCount();
  renderRecording();
  sendMedia();
  layout();
  const held = early;
  early = [];
  for (const e of held) {
    if (e.type === 'peer_joined' && (state.peers.has(e.id) || e.id === state.myId)) continue;
    onMessage(e);
  }
}

/** @param {ErrorMsg} m */
function onError(m) {
  if (m.code === 'bad_password') {
    // `scope: "room"`: the room's own password (a host set it); else the server's.
    const scope = m.scope === 'room' ? 'room' : 'server';
    const hadPassword = !!(scope === 'room' ? state.roomPassword : state.password);
    state.pwScope = scope;
    state.inCall = false;
    /** @type {HTMLInputElement} */ ($('pw-input')).value = '';
    const text = hadPassword ? t('pwWrong') : scope === 'room' ? t('roomPwText') : '';
    messageScreen({
      icon: scope === 'room' ? 'key' : 'warn', title: t(scope === 'room' ? 'roomPwTitle' : 'pwTitle'), text, password: true,
      actions: [[t('home'), () => { location.href = '/'; }]],
    });
    document.body.dataset.pwScope = scope;
  } else if (m.code === 'room_locked') {
    messageScreen({
      icon: 'lock', title: t('lockedTitle'), text: t('lockedText'),
      actions: [[t('tryAgain'), () => { show('preview'); doJoin(); }, 'primary'], [t('home'), () => { location.href = '/'; }]],
    });
  } else if (m.code === 'lobby_full') {
    messageScreen({
      icon: 'hourglass', title: t('lobbyFullTitle'), text: t('lobbyFullText'),
      actions: [[t('tryAgain'), () => { show('preview'); doJoin(); }, 'primary'], [t('home'), () => { location.href = '/'; }]],
    });
  } else if (m.code === 'not_host') {
    // Host rights are the server's to give: show its state again.
    toast(t('notHost'));
    renderRoomControl();
  } else if (m.code === 'invalid_room') {
    messageScreen({ icon: 'warn', title: t('invalidRoomTitle'), text: t('invalidRoom'), actions: [[t('newRoomInstead'), newRoom, 'primary']] });
  } else if (m.code === 'invalid_name') {
    show('preview');
    const note = $('device-note');
    note.textContent = String(m.message || '');
    note.hidden = false;
    resetJoinButton();
  } else if (m.code === 'unknown_peer' || m.code === 'rate_limited') {
    // A peer that just left, or a burst: nothing for the user to do.
  } else if (!state.inCall) {
    messageScreen({ icon: 'warn', title: t('errorTitle'), text: String(m.message || m.code), actions: [[t('tryAgain'), () => location.reload(), 'primary']] });
  }
}

function resetJoinButton() {
  const b = /** @type {HTMLButtonElement} */ ($('join-btn'));
  b.disabled = false;
  b.textContent = t('join');
}

async function doJoin() {
  state.joinAt = performance.now();
  const input = /** @type {HTMLInputElement} */ ($('name'));
  state.name = input.value.trim().slice(0, 64);
  try { localStorage.setItem(NAME_KEY, state.name); } catch { /* storage unavailable */ }
  const b = /** @type {HTMLButtonElement} */ ($('join-btn'));
  b.disabled = true;
  b.textContent = t('joining');
  state.ended = false;
  delete document.body.dataset.ended;
  // Made at page load; connections are only made after a join.
  if (!state.cert) state.cert = await pageCertificate();
  signaling.join({
    room: state.room, name: state.name,
    ...(state.password ? { password: state.password } : {}),
    ...(state.roomPassword ? { room_password: state.roomPassword } : {}),
  });
}

// ---------------------------------------------------------------- speaker detection

function pollSpeaker() {
  if (!state.inCall) return;
  /** @type {[string, number][]} */
  const levels = [];
  for (const p of state.peers.values()) {
    const tx = p.audioTx;
    if (!tx || (p.media && !p.media.audio)) continue;
    try {
      const src = tx.receiver.getSynchronizationSources();
      const lvl = src.length ? src[0].audioLevel || 0 : 0;
      levels.push([p.id, lvl]);
    } catch { /* not supported */ }
  }
  localLevel = readLocalLevel();
  levels.push(['self', localLevel * 0.5]);
  levels.sort((a, b) => b[1] - a[1]);
  const now = Date.now();
  const top = levels[0];
  if (top && top[1] > 0.04 && top[0] !== state.speaker && now - state.speakerSince > 800) {
    state.speaker = top[0];
    state.speakerSince = now;
  } else if (top && top[1] <= 0.01 && now - state.speakerSince > 2500) {
    state.speaker = null;
  }
  for (const el of $('grid').querySelectorAll('.tile')) {
    const k = /** @type {HTMLElement} */ (el).dataset.key;
    el.classList.toggle('speaking', k === state.speaker);
  }
}

function previewMeter() {
  if (!$('preview').hidden) {
    const bar = /** @type {HTMLElement} */ ($('meter').firstElementChild);
    bar.style.transform = `scaleX(${readLocalLevel().toFixed(3)})`;
  }
  requestAnimationFrame(previewMeter);
}

// ---------------------------------------------------------------- keyboard

/** @param {KeyboardEvent} e */
function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const target = /** @type {HTMLElement} */ (e.target);
  if (e.key === 'Escape' && (menuFor || !$('room-panel').hidden)) {
    closeTileMenu();
    closeRoomPanel();
    e.preventDefault();
    return;
  }
  if (target && (target.tagName === 'INPUT' || target.tagName === 'TEXTAREA' || target.tagName === 'SELECT' || target.isContentEditable)) {
    if (e.key === 'Escape' && state.chatOpen) toggleChat(false);
    return;
  }
  const k = e.key.toLowerCase();
  if (!state.inCall) {
    if (!$('preview').hidden && (k === 'm' || k === 'v')) {
      e.preventDefault();
      if (k === 'm') toggleMic(); else toggleCam();
    }
    return;
  }
  if (k === 'm') toggleMic();
  else if (k === 'v') toggleCam();
  else if (k === 's') toggleShare();
  else if (k === 'c') toggleChat();
  else if (k === 'escape' && state.chatOpen) toggleChat(false);
  else return;
  e.preventDefault();
}

// ---------------------------------------------------------------- file sharing

/**
 * Shows a file transfer's item in the chat list; one from someone else counts as
 * unread while the chat is closed, as a chat line does.
 * @param {HTMLElement} el @param {boolean} fromOther
 */
function showInChat(el, fromOther) {
  const list = $('chat-list');
  list.appendChild(el);
  $('chat-empty').hidden = true;
  list.scrollTop = list.scrollHeight;
  if (fromOther && !state.chatOpen) {
    state.unread += 1;
    renderUnread();
  }
}

const files = new FileSharing({
  peers: () => Array.from(state.peers.values()),
  show: showInChat,
  toast: (text) => toast(text, 5000),
});

/** The Send file button, its file picker, and files dropped on the call. */
function initFiles() {
  const input = /** @type {HTMLInputElement} */ ($('file-input'));
  $('btn-file').addEventListener('click', () => input.click());
  input.addEventListener('change', () => {
    if (input.files) files.sendFiles(Array.from(input.files));
    input.value = '';
  });
  const call = $('call');
  call.dataset.drop = t('dropFiles');
  /** @param {DragEvent} e */
  const carriesFiles = (e) => !!e.dataTransfer && Array.from(e.dataTransfer.types).includes('Files');
  call.addEventListener('dragover', (e) => {
    if (!state.inCall || !carriesFiles(e)) return;
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
    call.classList.add('drop-target');
  });
  call.addEventListener('dragleave', (e) => {
    if (!call.contains(/** @type {Node|null} */ (e.relatedTarget))) call.classList.remove('drop-target');
  });
  call.addEventListener('drop', (e) => {
    call.classList.remove('drop-target');
    if (!state.inCall || !e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    files.sendFiles(Array.from(e.dataTransfer.files));
  });
}

// ---------------------------------------------------------------- local recording

const recorder = new CallRecorder({ room: roomRaw, sources: recordingSources, onChange: onRecorderChange });

/**
 * What the recorder draws and mixes: the grid's tiles in their order (camera when
 * it shows, else initials), with everyone's audio (our microphone, each peer's).
 * @returns {import('./recorder.js').Source[]}
 */
function recordingSources() {
  /** @type {import('./recorder.js').Source[]} */
  const out = [];
  if (!state.inCall) return out;
  for (const node of $('grid').querySelectorAll('.tile')) {
    const el = /** @type {HTMLElement} */ (node);
    const key = el.dataset.key || '';
    const video = /** @type {HTMLVideoElement|null} */ (el.querySelector('video'));
    const showing = !!video && !!video.srcObject && !el.classList.contains('no-video');
    const peerId = key.startsWith('self') ? null : key.split(':')[0];
    const p = peerId ? state.peers.get(peerId) : undefined;
    const who = peerId ? (p && p.name) || 'Guest' : state.name || 'Guest';
    const screen = key.endsWith(':screen');
    /** @type {MediaStreamTrack[]} */
    let audio = [];
    if (!screen) audio = peerId ? (p && p.mainStream ? p.mainStream.getAudioTracks() : []) : state.local.getAudioTracks();
    out.push({
      key, name: screen ? t('screenOf', { name: who }) : who, hue: hue(peerId || state.myId || 'self'),
      video: showing ? video : null, audio,
    });
  }
  return out;
}

/**
 * The red "REC" mark on a tile, made on first use.
 * @param {HTMLElement} el @param {boolean} on
 */
function markRecording(el, on) {
  let mark = /** @type {HTMLElement|null} */ (el.querySelector('.tile-rec'));
  if (!mark && !on) return;
  if (!mark) {
    mark = document.createElement('span');
    mark.className = 'tile-rec';
    mark.setAttribute('role', 'img');
    mark.setAttribute('aria-label', t('recTile'));
    const dot = document.createElement('span');
    dot.className = 'rec-dot';
    dot.setAttribute('aria-hidden', 'true');
    const txt = document.createElement('span');
    txt.setAttribute('aria-hidden', 'true');
    txt.textContent = t('recShort');
    mark.append(dot, txt);
    el.querySelector('.tile-foot')?.prepend(mark);
  }
  if (mark.hidden !== !on) mark.hidden = !on;
  el.classList.toggle('is-recording', on);
}

/** The banner everyone sees while anyone in the call records, naming who. */
function renderRecording() {
  /** @type {string[]} */
  const names = [];
  if (state.inCall) {
    if (recorder.active) names.push(`${state.name || 'Guest'} (${t('you')})`);
    for (const p of state.peers.values()) if (p.media && p.media.recording) names.push(p.name || 'Guest');
  }
  const banner = $('rec-banner');
  const text = names.length ? t('recordingBy', { names: names.join(', ') }) : '';
  const out = $('rec-banner-text');
  // Rewritten only on a change, so a screen reader announces each change once.
  if (out.textContent !== text) out.textContent = text;
  if (banner.hidden !== !names.length) banner.hidden = !names.length;
  if (names.length) document.body.dataset.recording = 'true';
  else delete document.body.dataset.recording;
}

/** m:ss or h:mm:ss. @param {number} ms */
function clock(ms) {
  const s = Math.floor(ms / 1000);
  const two = (/** @type {number} */ n) => String(n).padStart(2, '0');
  const h = Math.floor(s / 3600);
  return h ? `${h}:${two(Math.floor(s / 60) % 60)}:${two(s % 60)}` : `${Math.floor(s / 60)}:${two(s % 60)}`;
}

/** @param {number} n */
function size(n) {
  return n >= 1e9 ? `${(n / 1e9).toFixed(1)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${Math.ceil(n / 1e3)} kB`;
}

let lastRecActive = false;

function onRecorderChange() {
  const st = recorder.status();
  const btn = $('btn-rec');
  const active = recorder.active;
  btn.setAttribute('aria-pressed', String(active));
  const label = t(active ? 'recordStop' : 'record');
  if (btn.title !== label) {
    btn.setAttribute('aria-label', label);
    btn.title = label;
  }
  /** @type {HTMLButtonElement} */ (btn).disabled = st.state === 'starting' || st.state === 'stopping' || !canRecord();
  const panel = $('rec-panel');
  panel.hidden = st.state === 'idle';
  const status = st.state === 'starting' ? t('recStarting')
    : st.state === 'recording' ? t('recOn', { time: clock(st.elapsedMs) })
      : st.state === 'paused' ? t('recPaused', { time: clock(st.elapsedMs) })
        : st.state === 'stopping' ? t('recSaving')
          : st.state === 'stopped' ? t('recReady', { time: clock(st.recordedMs), size: size(st.bytes) }) : '';
  $('rec-status').textContent = status;
  panel.dataset.state = st.state;
  const pause = /** @type {HTMLButtonElement} */ ($('rec-pause'));
  pause.hidden = st.state !== 'recording' && st.state !== 'paused';
  pause.textContent = t(st.state === 'paused' ? 'recResume' : 'recPause');
  $('rec-stop').hidden = st.state !== 'recording' && st.state !== 'paused';
  const dl = /** @type {HTMLAnchorElement} */ ($('rec-download'));
  dl.hidden = st.state !== 'stopped';
  if (st.state === 'stopped') {
    if (dl.href !== st.url) dl.href = st.url;
    dl.download = st.fileName;
  } else if (dl.getAttribute('href') !== '#') {
    dl.href = '#';
  }
  $('rec-discard').hidden = st.state !== 'stopped';
  if (st.error && st.error !== shownRecError) {
    shownRecError = st.error;
    toast(st.error === 'unsupported' ? t('recUnsupported') : t('recFailed', { why: st.error }), 6000);
  }
  // The others learn of a start or stop at once; chunks change nothing for them.
  if (active !== lastRecActive) {
    lastRecActive = active;
    sendMedia();
    renderSelf();
    renderRecording();
  }
}

let shownRecError = '';

function initRecording() {
  $('btn-rec').addEventListener('click', () => {
    if (recorder.active) recorder.stop();
    else {
      shownRecError = '';
      recorder.start();
    }
  });
  $('rec-pause').addEventListener('click', () => {
    if (recorder.state === 'paused') recorder.resume();
    else recorder.pause();
  });
  $('rec-stop').addEventListener('click', () => { recorder.stop(); });
  $('rec-download').addEventListener('click', () => { recorder.markSaved(); });
  $('rec-discard').addEventListener('click', () => { recorder.discard(); });
  onRecorderChange();
}

// ---------------------------------------------------------------- test handle

/** @type {Promise<Record<string, any>>|null} */
let statsReading = null;

/**
 * Media and connection figures for every peer (used by the browser tests). Callers
 * at the same time share one read: reads that pile up (several waits polling at
 * once, each read slow on a starved machine) back up the browser's WebRTC thread,
 * which the page then waits for in its calls to the connections.
 */
function stats() {
  if (!statsReading) statsReading = readStats().finally(() => { statsReading = null; });
  return statsReading;
}

/** One read of {@link stats}. */
async function readStats() {
  /** @type {Record<string, any>} */
  const out = {};
  const peers = Array.from(state.peers.values());
  const reports = await Promise.all(peers.map((p) => p.pc.getStats()));
  for (const [i, p] of peers.entries()) {
    const r = reports[i];
    let framesDecoded = 0;
    let audioPackets = 0;
    let screenFrames = 0;
    r.forEach((/** @type {any} */ s) => {
      if (s.type !== 'inbound-rtp') return;
      if (s.kind === 'audio') audioPackets += s.packetsReceived || 0;
      if (s.kind === 'video') {
        const mid = s.mid;
        const tx = p.pc.getTransceivers().find((x) => x.mid === mid);
        if (tx && tx === p.videoTx) framesDecoded += s.framesDecoded || 0;
        else if (tx) screenFrames += s.framesDecoded || 0;
        else framesDecoded += s.framesDecoded || 0;
      }
    });
    const path = p.pathFrom(r) || null;
    out[p.id] = {
      id: p.id, name: p.name, serial: p.serial, state: p.state, connectionState: p.pc.connectionState,
      framesDecoded, audioPackets, screenFrames, path, media: p.media,
      tilePath: p.path, restarts: p.restarts, noPathRestarts: p.noPathRestarts, iceRole: p.iceRole,
      offers: p.offers, unanswered: p.unanswered, roleFixes: p.roleFixes, renewals: p.renewals, blips: p.blips.slice(),
      disconnectedFor: p.disconnectedSince ? Date.now() - p.disconnectedSince : 0,
      firstFrameMs: p.firstFrameAt ? Math.round(p.firstFrameAt - p.since) : null,
      sinceJoin: p.since === state.joinAt,
    };
  }
  return out;
}

/** The page's test handle, `window.meshmeet` (docs/CLIENT.md). */
const testHandle = {
  get id() { return state.myId; },
  get inCall() { return state.inCall; },
  get peers() { return state.peers; },
  get chatLog() { return state.chatLog.slice(); },
  get signaling() { return signaling; },
  get limits() { return limits(); },
  get localVideoState() { return videoTrack()?.readyState || 'none'; },
  /** room control as the page knows it (hosts, lock, password, lobby, waiting list) */
  get room() {
    return {
      hosts: Array.from(state.hosts), host: isHost(), locked: state.locked, password: state.hasRoomPassword,
      lobby: state.lobby, waiting: state.waiting.slice(), waitingId: state.waitingId,
    };
  },
  /** notices shown about hosts' requests, oldest first */
  get notices() { return state.notices.slice(); },
  /** safety codes by peer id, as the tile menus show them */
  get safety() {
    return Object.fromEntries(Array.from(state.safety, ([id, s]) => [id, { code: s.code, verified: s.verified, changed: s.changed }]));
  },
  /** the local recorder: state, format, storage, chunks, bytes, recorded time, file */
  get recording() { return recorder.status(); },
  recorder: {
    start: () => recorder.start(), pause: () => recorder.pause(), resume: () => recorder.resume(),
    stop: () => recorder.stop(), discard: () => recorder.discard(),
  },
  stats,
  /** Closes the signaling socket as a network drop would; it resumes (after holdMs). */
  dropSocket(/** @type {number} */ holdMs) { signaling.drop(holdMs); },
  toggleMic, toggleCam, toggleShare, leave, renewIce,
  /** @param {string} id */
  restartIce(id) { return state.peers.get(id)?.restartIce() ?? false; },
  /** @param {string} text */
  chat(text) { signaling.send({ type: 'chat', text }); },
  /**
   * Puts a new certificate on every connection (each is replaced), as someone in the
   * middle swapping certificates would look to the other sides.
   */
  async renewCertificate() {
    state.cert = await newPageCertificate();
    for (const p of state.peers.values()) {
      p.config = rtcConfig(state.ice || { iceServers: [] });
      p.renew('new certificate', true);
    }
  },
  /** file sharing (files.js): `maxBytes`, `summary()`, `send(file, name)`, `saved` */
  get files() { return files; },
};
/** @type {Window & {meshmeet?: typeof testHandle}} */ (window).meshmeet = testHandle;

// ---------------------------------------------------------------- start

function init() {
  pageCertificate();
  translate();
  placeIcons();
  $('room-name').textContent = state.room;
  document.title = `${state.room} · meshmeet`;
  const nameInput = /** @type {HTMLInputElement} */ ($('name'));
  try { nameInput.value = localStorage.getItem(NAME_KEY) || ''; } catch { /* storage unavailable */ }
  nameInput.addEventListener('input', updatePreview);
  $('pv-mic').addEventListener('click', toggleMic);
  $('pv-cam').addEventListener('click', toggleCam);
  $('btn-mic').addEventListener('click', toggleMic);
  $('btn-cam').addEventListener('click', toggleCam);
  $('btn-share').addEventListener('click', toggleShare);
  $('btn-chat').addEventListener('click', () => toggleChat());
  $('chat-close').addEventListener('click', () => toggleChat(false));
  $('btn-leave').addEventListener('click', leave);
  initFiles();
  initRecording();
  $('copy-link').addEventListener('click', copyLink);
  $('copy-link-top').addEventListener('click', copyLink);
  $('cam-select').addEventListener('change', (e) => switchDevice('video', /** @type {HTMLSelectElement} */ (e.target).value));
  $('mic-select').addEventListener('change', (e) => switchDevice('audio', /** @type {HTMLSelectElement} */ (e.target).value));
  $('join-form').addEventListener('submit', (e) => { e.preventDefault(); doJoin(); });
  $('chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = /** @type {HTMLInputElement} */ ($('chat-input'));
    const text = input.value.trim();
    if (!text) return;
    signaling.send({ type: 'chat', text: text.slice(0, 2000) });
    input.value = '';
  });
  $('pw-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const value = /** @type {HTMLInputElement} */ ($('pw-input')).value;
    if (state.pwScope === 'room') state.roomPassword = value;
    else state.password = value;
    show('preview');
    doJoin();
  });
  $('btn-room').addEventListener('click', (e) => { e.stopPropagation(); toggleRoomPanel(); });
  $('room-panel-close').addEventListener('click', () => toggleRoomPanel(false));
  $('room-panel').addEventListener('click', (e) => e.stopPropagation());
  $('rc-lock').addEventListener('change', (e) => {
    control({ type: 'lock', locked: /** @type {HTMLInputElement} */ (e.target).checked });
  });
  $('rc-lobby').addEventListener('change', (e) => {
    control({ type: 'lobby', on: /** @type {HTMLInputElement} */ (e.target).checked });
  });
  $('rc-pw-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = /** @type {HTMLInputElement} */ ($('rc-pw'));
    const password = input.value;
    // The server's rules: 1 to 128 characters (empty would clear), no control characters.
    if (!password || Array.from(password).length > 128 || /\p{Cc}/u.test(password)) {
      input.focus();
      return;
    }
    control({ type: 'room_password', password });
    input.value = '';
    toast(t('passwordSet'));
  });
  $('rc-pw-clear').addEventListener('click', () => {
    control({ type: 'room_password', password: '' });
    toast(t('passwordCleared'));
  });
  // A click elsewhere closes the tile menu and the room panel.
  document.addEventListener('click', (e) => {
    const menu = $('tile-menu');
    if (menuFor && !menu.contains(/** @type {Node} */ (e.target))) closeTileMenu();
    closeRoomPanel();
  });
  document.addEventListener('keydown', onKey);
  window.addEventListener('resize', layout);
  if ('ResizeObserver' in window) new ResizeObserver(() => layout()).observe($('grid'));
  window.addEventListener('pagehide', () => {
    if (state.inCall) {
      signaling.leave();
      closeAllPeers();
    }
  });
  // Back from the back/forward cache after leaving on pagehide: start afresh.
  window.addEventListener('pageshow', (e) => { if (e.persisted) location.reload(); });
  navigator.mediaDevices?.addEventListener?.('devicechange', () => { fillDeviceLists(); });
  show('preview');
  renderControls();
  signaling.connect();
  /** @type {{audio?: string, video?: string}} */
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(DEVICE_KEY) || '{}'); } catch { /* none */ }
  openLocalMedia(saved).catch(() => openLocalMedia()).then(() => {
    document.body.dataset.ready = 'true';
    startMeter();
  });
  requestAnimationFrame(previewMeter);
  speakerLoop();
}

/**
 * Polls the speaking levels every SPEAKER_POLL_MS, or less often when a poll was
 * slow: reading a receiver's levels waits for the browser's WebRTC thread, which a
 * starved machine backs up, and the page's thread waits with it.
 */
function speakerLoop() {
  const started = performance.now();
  try {
    pollSpeaker();
  } finally {
    const took = performance.now() - started;
    setTimeout(speakerLoop, Math.min(SPEAKER_POLL_MAX_MS, Math.max(SPEAKER_POLL_MS, 4 * took)));
  }
}

init();
