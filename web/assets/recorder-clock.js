// The recorder's frame clock, in a worker: a page's own timers slow to once a second
// (or less) while its tab is hidden, a worker's do not, so a recording keeps its
// frame rate when the call is in the background. Posts "tick" every `ms`
// milliseconds after {ms} arrives; {ms: 0} stops it.

/** The worker's global scope (typed here as a page's, hence `any`). */
const scope = /** @type {any} */ (self);
/** @type {ReturnType<typeof setInterval>|undefined} */
let timer;

scope.onmessage = (/** @type {MessageEvent} */ e) => {
  clearInterval(timer);
  const ms = Number(e.data && e.data.ms) || 0;
  if (ms > 0) timer = setInterval(() => scope.postMessage('tick'), Math.max(10, ms));
};
