// Line icons (24x24, stroked), built as DOM nodes so the strict CSP needs no inline markup.

/** @type {Record<string, string[]>} path data per icon */
const PATHS = {
  mic: ['M12 3a3 3 0 0 0-3 3v6a3 3 0 0 0 6 0V6a3 3 0 0 0-3-3z', 'M19 11a7 7 0 0 1-14 0', 'M12 18v3', 'M8 21h8'],
  micOff: ['M9 9v3a3 3 0 0 0 5.1 2.1', 'M15 9.3V6a3 3 0 0 0-5.7-1.3', 'M17.5 15.5A7 7 0 0 0 19 11', 'M5 11a7 7 0 0 0 10.6 6', 'M12 18v3', 'M8 21h8', 'M3 3l18 18'],
  cam: ['M3 7h12a1 1 0 0 1 1 1v8a1 1 0 0 1-1 1H3a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1z', 'M16 10.5l6-3.5v10l-6-3.5'],
  camOff: ['M10 7h5a1 1 0 0 1 1 1v5', 'M16 10.5l6-3.5v10l-4-2.3', 'M15.7 16.7A1 1 0 0 1 15 17H3a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1h3', 'M3 3l18 18'],
  screen: ['M3 4h18a1 1 0 0 1 1 1v11a1 1 0 0 1-1 1H3a1 1 0 0 1-1-1V5a1 1 0 0 1 1-1z', 'M8 21h8', 'M12 17v4', 'M12 14V8', 'M9 11l3-3 3 3'],
  screenOff: ['M3 4h18a1 1 0 0 1 1 1v11a1 1 0 0 1-1 1H3a1 1 0 0 1-1-1V5a1 1 0 0 1 1-1z', 'M8 21h8', 'M12 17v4', 'M9 8l6 6', 'M15 8l-6 6'],
  chat: ['M21 12a8 8 0 0 1-11.6 7.1L4 21l1.9-5.4A8 8 0 1 1 21 12z'],
  leave: ['M10 20H6a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2h4', 'M15 16l4-4-4-4', 'M19 12H9'],
  link: ['M10 14a4 4 0 0 0 5.7 0l3-3a4 4 0 0 0-5.7-5.7l-1 1', 'M14 10a4 4 0 0 0-5.7 0l-3 3a4 4 0 0 0 5.7 5.7l1-1'],
  close: ['M6 6l12 12', 'M18 6L6 18'],
  send: ['M4 12l16-8-6 16-2-7z', 'M12 13l8-9'],
  logo: ['M5 4.5a2.5 2.5 0 1 1 0 5 2.5 2.5 0 0 1 0-5z', 'M19 4.5a2.5 2.5 0 1 1 0 5 2.5 2.5 0 0 1 0-5z',
    'M12 15.5a2.5 2.5 0 1 1 0 5 2.5 2.5 0 0 1 0-5z', 'M6.3 9.3l4.4 6.4', 'M17.7 9.3l-4.4 6.4', 'M7.5 7h9'],
  user: ['M12 12a4 4 0 1 0 0-8 4 4 0 0 0 0 8z', 'M4 21a8 8 0 0 1 16 0'],
  check: ['M5 12l5 5 9-10'],
  warn: ['M12 3l10 18H2z', 'M12 10v5', 'M12 18v.01'],
  cross: ['M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18z', 'M9 9l6 6', 'M15 9l-6 6'],
  lock: ['M6 11h12a1 1 0 0 1 1 1v8a1 1 0 0 1-1 1H6a1 1 0 0 1-1-1v-8a1 1 0 0 1 1-1z', 'M8 11V7a4 4 0 0 1 8 0v4'],
  key: ['M8 11a4 4 0 1 0 0 8 4 4 0 0 0 0-8z', 'M11 12l9-9', 'M17 6l3 3', 'M15 8l2 2'],
  door: ['M5 21V4a1 1 0 0 1 1-1h12a1 1 0 0 1 1 1v17', 'M3 21h18', 'M15 12v.01'],
  crown: ['M3 7l4.5 4L12 5l4.5 6L21 7l-2 11H5z'],
  more: ['M12 5v.01', 'M12 12v.01', 'M12 19v.01'],
  sliders: ['M4 6h10', 'M18 6h2', 'M16 4v4', 'M4 12h4', 'M12 12h8', 'M10 10v4', 'M4 18h12', 'M20 18h0', 'M18 16v4'],
  file: ['M14 3H7a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h10a2 2 0 0 0 2-2V8z', 'M14 3v5h5', 'M12 18v-6', 'M9 15l3-3 3 3'],
  hourglass: ['M6 3h12', 'M6 21h12', 'M7 3c0 5 5 6 5 9s-5 4-5 9', 'M17 3c0 5-5 6-5 9s5 4 5 9'],
};

const NS = 'http://www.w3.org/2000/svg';

/**
 * An SVG icon element.
 * @param {string} name
 * @returns {SVGSVGElement}
 */
export function icon(name) {
  const svg = /** @type {SVGSVGElement} */ (document.createElementNS(NS, 'svg'));
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('class', 'icon');
  for (const d of PATHS[name] || []) {
    const p = document.createElementNS(NS, 'path');
    p.setAttribute('d', d);
    svg.appendChild(p);
  }
  return svg;
}

/**
 * Replaces the icon inside an element (the first svg child) with another.
 * @param {Element} el
 * @param {string} name
 */
export function setIcon(el, name) {
  const old = el.querySelector('svg.icon');
  const fresh = icon(name);
  if (old) old.replaceWith(fresh);
  else el.prepend(fresh);
}

/** Fills every element carrying data-icon with its icon. */
export function placeIcons(root = document) {
  for (const el of root.querySelectorAll('[data-icon]')) {
    setIcon(el, /** @type {HTMLElement} */ (el).dataset.icon || '');
  }
}
