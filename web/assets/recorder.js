// Local recording of the call, in this browser only: a canvas that composites the
// call's tiles (each participant's camera, or its initials and name when the camera
// is off) in a grid that follows who is in the call, plus one mix of everyone's
// audio, recorded by MediaRecorder in the first format the browser offers (WebM in
// Chromium and Firefox). The file is written in chunks to the origin's private file
// system where the browser allows it, so a long recording is not held in memory, and
// is removed once it is discarded or the page goes (files a crashed page left behind
// are swept at the next start). Nothing is uploaded anywhere. docs/CLIENT.md
// ("Recording") describes it.

/** Formats tried in order; the first `MediaRecorder.isTypeSupported` accepts is used. */
export const RECORD_TYPES = [
  'video/webm;codecs=vp8,opus',
  'video/webm;codecs=vp9,opus',
  'video/webm',
  'video/mp4;codecs=avc1,mp4a',
  'video/mp4',
];
/** One chunk of the file every this many milliseconds (`MediaRecorder.start(timeslice)`). */
export const TIMESLICE_MS = 1000;
/** Frames drawn per second. */
const FPS = 15;
const WIDTH = 1280;
const HEIGHT = 720;
const GAP = 8;
const VIDEO_BPS = 2_500_000;
const AUDIO_BPS = 128_000;
/** Names of this client's files in the origin's private file system start with this. */
export const FILE_PREFIX = 'meshmeet-recording-';
/** A file of ours nobody holds a lock on and untouched this long is a crashed page's. */
const STALE_MS = 60_000;

/**
 * One tile to draw, in the order shown: `video` when its camera shows, `audio` its
 * live audio tracks (the local microphone, a peer's received audio).
 * @typedef {{key: string, name: string, hue: number, video: HTMLVideoElement|null, audio: MediaStreamTrack[]}} Source
 *
 * @typedef {'idle'|'starting'|'recording'|'paused'|'stopping'|'stopped'} RecState
 *
 * Where the chunks go: a file in the origin's private file system, or Blob parts in
 * memory.
 * @typedef {{kind: 'opfs', dir: FileSystemDirectoryHandle, name: string, handle: FileSystemFileHandle,
 *   writable: FileSystemWritableFileStream, release: () => void}
 *   | {kind: 'memory', parts: Blob[]}} Store
 */

/**
 * The first of {@link RECORD_TYPES} the browser records, or '' if none (or no
 * MediaRecorder at all).
 * @param {(type: string) => boolean} [isSupported]
 */
export function pickMimeType(isSupported) {
  const check = isSupported ||
    ((/** @type {string} */ type) => typeof MediaRecorder !== 'undefined' && MediaRecorder.isTypeSupported(type));
  for (const type of RECORD_TYPES) {
    try {
      if (check(type)) return type;
    } catch { /* a browser that throws for a type does not record it */ }
  }
  return '';
}

/** Whether this browser can record at all. */
export function canRecord() {
  return typeof MediaRecorder !== 'undefined' && typeof HTMLCanvasElement.prototype.captureStream === 'function' &&
    typeof AudioContext !== 'undefined' && pickMimeType() !== '';
}

/**
 * The download's file name: room and local date and time.
 * @param {string} room @param {Date} when @param {string} mimeType
 */
export function fileName(room, when, mimeType) {
  const p = (/** @type {number} */ n) => String(n).padStart(2, '0');
  const date = `${when.getFullYear()}-${p(when.getMonth() + 1)}-${p(when.getDate())}`;
  const time = `${p(when.getHours())}-${p(when.getMinutes())}-${p(when.getSeconds())}`;
  const safeRoom = Array.from(room).filter((c) => /[\p{L}\p{N}._-]/u.test(c)).join('') || 'call';
  const ext = mimeType.startsWith('video/mp4') ? 'mp4' : 'webm';
  return `meshmeet-${safeRoom}-${date}_${time}.${ext}`;
}

/**
 * Removes files of ours that no page is using (no lock held on them) and, without the
 * Web Locks API, that have not been written to for a while: what a crashed or closed
 * page left behind.
 * @param {FileSystemDirectoryHandle} dir
 */
async function sweep(dir) {
  /** @type {Set<string>} */
  let held = new Set();
  const locks = navigator.locks;
  if (locks) {
    try {
      const q = await locks.query();
      held = new Set([...(q.held || []), ...(q.pending || [])].map((l) => l.name || ''));
    } catch { /* treat as none held */ }
  }
  /** @type {string[]} */
  const names = [];
  // @ts-ignore: async iteration of a directory handle is not in every DOM typing
  for await (const [name, handle] of dir.entries()) {
    if (!name.startsWith(FILE_PREFIX) || handle.kind !== 'file' || held.has(name)) continue;
    if (!locks) {
      try {
        const f = await /** @type {FileSystemFileHandle} */ (handle).getFile();
        if (Date.now() - f.lastModified < STALE_MS) continue;
      } catch { continue; }
    }
    names.push(name);
  }
  for (const name of names) await dir.removeEntry(name).catch(() => {});
}

/**
 * A file in the origin's private file system to write the chunks to, or null where
 * the browser has none (or no writable streams on the page's thread).
 * @returns {Promise<Store|null>}
 */
async function openFileStore() {
  if (!navigator.storage || typeof navigator.storage.getDirectory !== 'function') return null;
  /** @type {FileSystemDirectoryHandle} */
  let dir;
  try {
    dir = await navigator.storage.getDirectory();
  } catch {
    return null;
  }
  await sweep(dir).catch(() => {});
  const name = `${FILE_PREFIX}${Date.now()}-${Math.random().toString(16).slice(2, 10)}`;
  // Held while the file is in use, so another page's sweep leaves it alone.
  let release = () => {};
  if (navigator.locks) {
    await new Promise((granted) => {
      navigator.locks.request(name, () => new Promise((done) => {
        release = () => done(undefined);
        granted(undefined);
      })).catch(() => granted(undefined));
    });
  }
  try {
    const handle = await dir.getFileHandle(name, { create: true });
    if (typeof handle.createWritable !== 'function') throw new Error('no writable streams here');
    const writable = await handle.createWritable();
    return { kind: 'opfs', dir, name, handle, writable, release };
  } catch {
    await dir.removeEntry(name).catch(() => {});
    release();
    return null;
  }
}

/** How long opening the stored file may take before the chunks go to memory instead. */
const STORE_WAIT_MS = 5000;

/**
 * {@link openFileStore}, or null if it takes longer than `ms` (some browsers leave
 * the storage calls unanswered); a file opened too late is removed.
 * @param {number} ms @returns {Promise<Store|null>}
 */
function openFileStoreWithin(ms) {
  return new Promise((resolve) => {
    let late = false;
    const timer = setTimeout(() => { late = true; resolve(null); }, ms);
    openFileStore().then(async (store) => {
      clearTimeout(timer);
      if (!late) return resolve(store);
      if (store && store.kind === 'opfs') {
        await store.writable.abort().catch(() => {});
        await store.dir.removeEntry(store.name).catch(() => {});
        store.release();
      }
    }, () => { clearTimeout(timer); resolve(null); });
  });
}

/** Draws a participant's initials on its hue, for a tile without camera. */
function drawAvatar(/** @type {CanvasRenderingContext2D} */ ctx, /** @type {Source} */ s,
  /** @type {number} */ x, /** @type {number} */ y, /** @type {number} */ w, /** @type {number} */ h) {
  ctx.fillStyle = '#1d212a';
  ctx.fillRect(x, y, w, h);
  const r = Math.min(w, h) * 0.18;
  ctx.fillStyle = `hsl(${s.hue} 45% 38%)`;
  ctx.beginPath();
  ctx.arc(x + w / 2, y + h / 2, r, 0, Math.PI * 2);
  ctx.fill();
  ctx.fillStyle = '#fff';
  ctx.font = `600 ${Math.round(r * 0.8)}px system-ui, sans-serif`;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  ctx.fillText(initialsOf(s.name), x + w / 2, y + h / 2);
}

/** @param {string} name */
function initialsOf(name) {
  const parts = name.trim().split(/\s+/).filter(Boolean);
  if (!parts.length) return '?';
  const chars = parts.length > 1 ? [parts[0], parts[parts.length - 1]] : [parts[0]];
  return chars.map((p) => Array.from(p)[0] || '').join('').toUpperCase();
}

/** Draws a video frame to fill the box (cropped, not stretched). */
function drawCover(/** @type {CanvasRenderingContext2D} */ ctx, /** @type {HTMLVideoElement} */ v,
  /** @type {number} */ x, /** @type {number} */ y, /** @type {number} */ w, /** @type {number} */ h) {
  const vw = v.videoWidth;
  const vh = v.videoHeight;
  const scale = Math.max(w / vw, h / vh);
  const sw = w / scale;
  const sh = h / scale;
  ctx.drawImage(v, (vw - sw) / 2, (vh - sh) / 2, sw, sh, x, y, w, h);
}

/** The name label at a tile's bottom left. */
function drawName(/** @type {CanvasRenderingContext2D} */ ctx, /** @type {string} */ name,
  /** @type {number} */ x, /** @type {number} */ y, /** @type {number} */ h) {
  const size = Math.max(14, Math.round(h * 0.06));
  ctx.font = `500 ${size}px system-ui, sans-serif`;
  ctx.textAlign = 'left';
  ctx.textBaseline = 'middle';
  const text = name.length > 40 ? `${name.slice(0, 39)}…` : name;
  const tw = ctx.measureText(text).width;
  const pad = size * 0.5;
  ctx.fillStyle = 'rgba(10, 12, 16, .65)';
  ctx.fillRect(x + 8, y + h - size * 2 - 8, tw + pad * 2, size * 1.8);
  ctx.fillStyle = '#fff';
  ctx.fillText(text, x + 8 + pad, y + h - size * 1.1 - 8);
}

/**
 * Records the call: start, pause, resume, stop, then a file to download (or discard).
 * `onChange` is called on every state change and every chunk written.
 */
export class CallRecorder {
  /**
   * @param {{room: string, sources: () => Source[], onChange: () => void}} opts
   */
  constructor(opts) {
    this.room = opts.room;
    this.sources = opts.sources;
    this.onChange = opts.onChange;
    /** @type {RecState} */
    this.state = 'idle';
    this.mimeType = '';
    /** where the chunks go: 'opfs' (a file) or 'memory' */
    this.storage = '';
    this.chunks = 0;
    this.bytes = 0;
    /** active (not paused) time covered by the chunks written so far, ms */
    this.recordedMs = 0;
    /** the finished file's object URL and download name, once stopped */
    this.url = '';
    this.fileName = '';
    /** @type {Blob|null} */
    this.file = null;
    /** the file was offered for saving (the download control used) */
    this.saved = false;
    /** why the last recording stopped early or could not start, if it did */
    this.error = '';
    /** @type {MediaRecorder|null} */
    this.recorder = null;
    /** @type {Store|null} */
    this.store = null;
    /** @type {Promise<void>} writes in order */
    this.writing = Promise.resolve();
    /** @type {HTMLCanvasElement|null} */
    this.canvas = null;
    /** @type {CanvasRenderingContext2D|null} */
    this.ctx = null;
    /** @type {AudioContext|null} */
    this.audio = null;
    /** @type {MediaStreamAudioDestinationNode|null} */
    this.mix = null;
    /** @type {Map<MediaStreamTrack, MediaStreamAudioSourceNode>} */
    this.inputs = new Map();
    /** @type {Worker|null} */
    this.clock = null;
    /** @type {ReturnType<typeof setInterval>|undefined} */
    this.fallbackTimer = undefined;
    /** active time before the current stretch, and when that stretch began */
    this.activeMs = 0;
    this.activeSince = 0;
    /** @type {Promise<void>|null} */
    this.stopping = null;
    /** the MediaRecorder fired `stop` (it fires once) */
    this.recStopped = false;
    window.addEventListener('beforeunload', (e) => {
      if (this.active || (this.state === 'stopped' && !this.saved)) {
        e.preventDefault();
        e.returnValue = '';
      }
    });
    // The page goes: its file goes too (a crashed page's is swept at the next start).
    window.addEventListener('pagehide', () => { this.removeFile(); });
  }

  /** Recording or paused: a recording is in progress (the others are told). */
  get active() {
    return this.state === 'starting' || this.state === 'recording' || this.state === 'paused' || this.state === 'stopping';
  }

  /** Active time so far, ms (pauses not counted). */
  get elapsedMs() {
    return this.activeMs + (this.state === 'recording' ? performance.now() - this.activeSince : 0);
  }

  /** What the test handle and the UI show. */
  status() {
    return {
      state: this.state, mimeType: this.mimeType, storage: this.storage, chunks: this.chunks, bytes: this.bytes,
      recordedMs: Math.round(this.recordedMs), elapsedMs: Math.round(this.elapsedMs), url: this.url,
      fileName: this.fileName, saved: this.saved, error: this.error,
    };
  }

  /** Starts a new recording (a finished one not yet discarded is discarded). */
  async start() {
    if (this.active) return;
    if (this.state === 'stopped') await this.discard();
    const mimeType = pickMimeType();
    if (!mimeType || !canRecord()) {
      this.error = 'unsupported';
      this.onChange();
      return;
    }
    this.state = 'starting';
    this.error = '';
    this.saved = false;
    this.chunks = 0;
    this.bytes = 0;
    this.recordedMs = 0;
    this.activeMs = 0;
    this.mimeType = mimeType;
    this.fileName = fileName(this.room, new Date(), mimeType);
    this.onChange();
    try {
      const canvas = document.createElement('canvas');
      canvas.width = WIDTH;
      canvas.height = HEIGHT;
      const ctx = canvas.getContext('2d');
      if (!ctx) throw new Error('no 2d canvas');
      this.canvas = canvas;
      this.ctx = ctx;
      this.draw();
      const audio = new AudioContext();
      this.audio = audio;
      this.mix = audio.createMediaStreamDestination();
      // Not awaited: a context may wait for the page's focus to run, and the mix
      // starts as soon as it does.
      audio.resume().catch(() => {});
      this.syncAudio();
      const video = canvas.captureStream(FPS).getVideoTracks()[0];
      const stream = new MediaStream([video, ...this.mix.stream.getAudioTracks()]);
      this.store = (await openFileStoreWithin(STORE_WAIT_MS)) || { kind: 'memory', parts: [] };
      this.storage = this.store.kind;
      if (this.state !== 'starting') throw new Error('stopped while starting');
      const rec = new MediaRecorder(stream, { mimeType, videoBitsPerSecond: VIDEO_BPS, audioBitsPerSecond: AUDIO_BPS });
      this.recorder = rec;
      this.recStopped = false;
      rec.addEventListener('dataavailable', (e) => this.onChunk(e.data));
      rec.addEventListener('stop', () => { this.recStopped = true; });
      rec.addEventListener('error', () => {
        this.error = 'recorder';
        this.stop();
      });
      this.startClock();
      rec.start(TIMESLICE_MS);
      this.activeSince = performance.now();
      this.state = 'recording';
    } catch (e) {
      this.error = this.error || String(/** @type {Error} */ (e).message || e);
      await this.teardown();
      await this.removeFile();
      this.state = 'idle';
    }
    this.onChange();
  }

  pause() {
    if (this.state !== 'recording' || !this.recorder) return;
    this.recorder.pause();
    this.activeMs += performance.now() - this.activeSince;
    this.state = 'paused';
    this.onChange();
  }

  resume() {
    if (this.state !== 'paused' || !this.recorder) return;
    this.recorder.resume();
    this.activeSince = performance.now();
    this.state = 'recording';
    this.onChange();
  }

  /**
   * Stops the recording and makes the file ready to download. Returns once it is.
   * @returns {Promise<void>}
   */
  stop() {
    if (this.stopping) return this.stopping;
    if (this.state === 'starting') {
      // start() notices and cleans up.
      this.state = 'idle';
      this.onChange();
      return Promise.resolve();
    }
    if (this.state !== 'recording' && this.state !== 'paused') return Promise.resolve();
    const rec = /** @type {MediaRecorder} */ (this.recorder);
    if (this.state === 'recording') this.activeMs += performance.now() - this.activeSince;
    this.state = 'stopping';
    this.onChange();
    this.stopping = (async () => {
      // The last chunk comes before `stop`.
      if (!this.recStopped) {
        const stopped = new Promise((r) => rec.addEventListener('stop', r, { once: true }));
        try { rec.stop(); } catch { /* already inactive: its `stop` is on the way */ }
        await stopped;
      }
      await this.writing;
      await this.teardown();
      try {
        this.file = await this.finish();
        this.url = URL.createObjectURL(this.file);
        this.state = 'stopped';
      } catch (e) {
        this.error = this.error || String(/** @type {Error} */ (e).message || e);
        await this.removeFile();
        this.state = 'idle';
      }
      this.stopping = null;
      this.onChange();
    })();
    return this.stopping;
  }

  /** The download was offered: the file stays until discarded or the page goes. */
  markSaved() {
    this.saved = true;
    this.onChange();
  }

  /** Drops the finished recording: its URL and its file. */
  async discard() {
    if (this.active) return;
    await this.removeFile();
    this.state = 'idle';
    this.onChange();
  }

  /** @param {Blob} blob */
  onChunk(blob) {
    if (!blob || !blob.size || !this.store) return;
    const store = this.store;
    const at = this.elapsedMs;
    this.writing = this.writing.then(async () => {
      if (store.kind === 'opfs') await store.writable.write(blob);
      else store.parts.push(blob);
      this.chunks += 1;
      this.bytes += blob.size;
      this.recordedMs = Math.max(this.recordedMs, at);
      this.onChange();
    }).catch((e) => {
      // Out of space, or the file went: keep what was written, stop here.
      this.error = `write: ${String(/** @type {Error} */ (e).message || e)}`;
      queueMicrotask(() => { this.stop(); });
    });
  }

  /** The finished file: the stored file, or the parts held in memory. */
  async finish() {
    const store = this.store;
    if (!store) throw new Error('nothing recorded');
    if (store.kind === 'opfs') {
      await store.writable.close();
      const f = await store.handle.getFile();
      return new Blob([f], { type: this.mimeType.split(';')[0] });
    }
    return new Blob(store.parts, { type: this.mimeType.split(';')[0] });
  }

  /** Removes the stored file and the object URL (the memory copy goes with them). */
  async removeFile() {
    if (this.url) URL.revokeObjectURL(this.url);
    this.url = '';
    this.file = null;
    const store = this.store;
    this.store = null;
    if (store && store.kind === 'opfs') {
      await store.writable.abort?.().catch(() => {});
      await store.dir.removeEntry(store.name).catch(() => {});
      store.release();
    }
  }

  /** Stops drawing and mixing and lets the devices' copies go. */
  async teardown() {
    this.stopClock();
    if (this.recorder) {
      for (const tr of this.recorder.stream.getTracks()) tr.stop();
      this.recorder = null;
    }
    for (const node of this.inputs.values()) node.disconnect();
    this.inputs.clear();
    this.mix = null;
    const audio = this.audio;
    this.audio = null;
    if (audio) await audio.close().catch(() => {});
    this.canvas = null;
    this.ctx = null;
  }

  startClock() {
    const tick = () => {
      this.draw();
      this.syncAudio();
    };
    try {
      const w = new Worker('/assets/recorder-clock.js');
      w.onmessage = () => {
        if (this.clock !== w) return;
        try {
          tick();
        } finally {
          w.postMessage('done');
        }
      };
      this.clock = w;
      w.postMessage({ ms: Math.round(1000 / FPS) });
    } catch {
      this.fallbackTimer = setInterval(tick, Math.round(1000 / FPS));
    }
  }

  stopClock() {
    if (this.clock) {
      this.clock.terminate();
      this.clock = null;
    }
    clearInterval(this.fallbackTimer);
  }

  /** Draws one frame: every tile in a grid of the current participants. */
  draw() {
    const ctx = this.ctx;
    if (!ctx) return;
    const list = this.sources();
    ctx.fillStyle = '#0f1115';
    ctx.fillRect(0, 0, WIDTH, HEIGHT);
    const n = Math.max(1, list.length);
    const cols = Math.ceil(Math.sqrt(n));
    const rows = Math.ceil(n / cols);
    const w = (WIDTH - GAP * (cols + 1)) / cols;
    const h = (HEIGHT - GAP * (rows + 1)) / rows;
    list.forEach((s, i) => {
      const row = Math.floor(i / cols);
      const inRow = row === rows - 1 ? n - row * cols : cols;
      // A short last row is centred.
      const offset = ((cols - inRow) * (w + GAP)) / 2;
      const x = GAP + offset + (i % cols) * (w + GAP);
      const y = GAP + row * (h + GAP);
      const v = s.video;
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, y, w, h);
      ctx.clip();
      if (v && v.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA && v.videoWidth > 0) {
        try {
          drawCover(ctx, v, x, y, w, h);
        } catch {
          drawAvatar(ctx, s, x, y, w, h);
        }
      } else {
        drawAvatar(ctx, s, x, y, w, h);
      }
      drawName(ctx, s.name, x, y, h);
      ctx.restore();
    });
  }

  /** Mixes exactly the live audio tracks of the current participants. */
  syncAudio() {
    const audio = this.audio;
    const mix = this.mix;
    if (!audio || !mix) return;
    /** @type {Set<MediaStreamTrack>} */
    const want = new Set();
    for (const s of this.sources()) {
      for (const tr of s.audio) if (tr.readyState === 'live') want.add(tr);
    }
    for (const [tr, node] of this.inputs) {
      if (!want.has(tr)) {
        node.disconnect();
        this.inputs.delete(tr);
      }
    }
    for (const tr of want) {
      if (this.inputs.has(tr)) continue;
      try {
        const node = audio.createMediaStreamSource(new MediaStream([tr]));
        node.connect(mix);
        this.inputs.set(tr, node);
      } catch { /* a track the context cannot take: left out */ }
    }
  }
}
