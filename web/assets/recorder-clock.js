// The recorder's frame clock, in a worker: a page's own timers slow to once a second
// (or less) while its tab is hidden, a worker's do not, so a recording keeps its
// frame rate when the call is in the background. After {ms} arrives it posts "tick";
// the page answers "done" once it has drawn the frame, and the next tick comes `ms`
// after the last one (at once if drawing took longer). One tick at a time: a page
// slower than the clock gets fewer frames, never a backlog of ticks. {ms: 0} stops it.

/** The worker's global scope (typed here as a page's, hence `any`). */
const scope = /** @type {any} */ (self);
let ms = 0;
let last = 0;
/** @type {ReturnType<typeof setTimeout>|undefined} */
let timer;

function tick() {
  if (!ms) return;
  last = Date.now();
  scope.postMessage('tick');
}

scope.onmessage = (/** @type {MessageEvent} */ e) => {
  clearTimeout(timer);
  if (e.data === 'done') {
    if (ms) timer = setTimeout(tick, Math.max(0, last + ms - Date.now()));
    return;
  }
  ms = Math.max(10, Number(e.data && e.data.ms) || 0);
  if (!(e.data && e.data.ms > 0)) ms = 0;
  tick();
};
