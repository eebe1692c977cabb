// Landing page: start a new room with a readable random name, or join one by name.

import { t, translate } from './i18n.js';
import { placeIcons } from './icons.js';

const ADJECTIVES = ['amber', 'bold', 'brave', 'bright', 'calm', 'clever', 'cosy', 'crisp', 'eager', 'gentle',
  'golden', 'happy', 'jolly', 'kind', 'lively', 'lucky', 'mellow', 'merry', 'misty', 'noble', 'quick', 'quiet',
  'rapid', 'silver', 'sunny', 'swift', 'tidy', 'vivid', 'warm', 'witty'];
const NOUNS = ['badger', 'beacon', 'brook', 'cedar', 'comet', 'coral', 'falcon', 'fern', 'harbor', 'heron',
  'island', 'lagoon', 'maple', 'meadow', 'otter', 'panda', 'pebble', 'pine', 'planet', 'river', 'robin',
  'sparrow', 'summit', 'tiger', 'tulip', 'valley', 'willow', 'wren', 'yak', 'zebra'];
const RESERVED = new Set(['api', 'assets', 'check', 'healthz', 'metrics', 'ws', 'favicon.ico', 'robots.txt']);
const ROOM_RE = /^[\p{L}\p{N}][\p{L}\p{N}\p{M}_.-]{0,63}$/u;

/** @param {number} n */
function pick(n) {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0] % n;
}

/** A readable random room name, e.g. "swift-otter-417". */
export function randomRoom() {
  return `${ADJECTIVES[pick(ADJECTIVES.length)]}-${NOUNS[pick(NOUNS.length)]}-${100 + pick(900)}`;
}

/** @param {string} name */
export function validRoom(name) {
  const n = name.normalize('NFC').toLowerCase();
  return ROOM_RE.test(n) && Array.from(n).length <= 64 && !RESERVED.has(n);
}

/** @param {string} name */
function go(name) {
  location.href = `/${encodeURIComponent(name)}`;
}

translate();
placeIcons();
const roomInput = /** @type {HTMLInputElement} */ (document.getElementById('room'));
const err = /** @type {HTMLElement} */ (document.getElementById('room-error'));
/** @type {HTMLElement} */ (document.getElementById('new-room')).addEventListener('click', () => go(randomRoom()));
/** @type {HTMLElement} */ (document.getElementById('join-form')).addEventListener('submit', (e) => {
  e.preventDefault();
  let name = roomInput.value.trim();
  // Accept a pasted invite link too.
  try {
    if (/^https?:\/\//i.test(name)) name = decodeURIComponent(new URL(name).pathname.replace(/^\/+/, ''));
  } catch { /* not a link */ }
  if (!validRoom(name)) {
    err.textContent = t('invalidRoom');
    err.hidden = false;
    roomInput.setAttribute('aria-invalid', 'true');
    roomInput.focus();
    return;
  }
  go(name);
});
roomInput.addEventListener('input', () => { err.hidden = true; roomInput.removeAttribute('aria-invalid'); });
if (new URLSearchParams(location.search).has('new')) go(randomRoom());
else roomInput.focus();
