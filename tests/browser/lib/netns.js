// Runs a command (the test runner) inside a fresh private network namespace, then
// removes the namespace:
//
//   node lib/netns.js node --test tests/*.test.js
//
// The namespace holds lo and one veth pair whose two ends both stay inside it; one
// end has HOST_IP and carries the default route. Browsers gather no host candidates on
// loopback, and without a default route Firefox gathers none at all; with this route,
// packets to any other address go into the veth and die at its unaddressed other end,
// so nothing the tests do can leave the machine.
//
// The test runner, the server, Xvfb and the browsers all run inside the namespace:
// the browsers' remote-control endpoints (WebDriver BiDi for Firefox) listen on the
// namespace's own loopback, where the test process can reach them.

import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const HOST_IP = '10.213.0.1';
const PREFIX = 'mmtest';

/** @param {string[]} args */
function ip(...args) {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Removes namespaces left behind by runs that were killed (their owner is gone). */
function removeStale() {
  let list = '';
  try { list = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }); } catch { return; }
  for (const line of list.split('\n')) {
    const m = line.match(new RegExp(`^(${PREFIX}-(\\d+))\\b`));
    if (!m || Number(m[2]) === process.pid) continue;
    try { process.kill(Number(m[2]), 0); continue; } catch { /* owner is gone */ }
    try { ip('netns', 'del', m[1]); } catch { /* raced */ }
  }
}

/** Creates the namespace and returns its name. */
export function createNetns() {
  removeStale();
  const name = `${PREFIX}-${process.pid}`;
  ip('netns', 'add', name);
  try {
    const ex = (/** @type {string[]} */ ...a) => ip('netns', 'exec', name, ...a);
    ex('ip', 'link', 'set', 'lo', 'up');
    ex('ip', 'link', 'add', 'mm0', 'type', 'veth', 'peer', 'name', 'mm1');
    ex('ip', 'addr', 'add', `${HOST_IP}/24`, 'dev', 'mm0');
    ex('ip', 'link', 'set', 'mm1', 'up');
    ex('ip', 'link', 'set', 'mm0', 'up');
    ex('ip', 'route', 'add', 'default', 'dev', 'mm0');
    // IPv4 only: keeps the candidate set small and predictable.
    try { ex('sysctl', '-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1'); } catch { /* no IPv6 */ }
  } catch (e) {
    destroyNetns(name);
    throw e;
  }
  return name;
}

/**
 * Ends whatever still runs in the namespace (a server or browser left behind by a
 * test process that died), then removes it.
 * @param {string} name
 */
export function destroyNetns(name) {
  let pids = '';
  try { pids = execFileSync('ip', ['netns', 'pids', name], { encoding: 'utf8' }); } catch { /* gone */ }
  for (const pid of pids.split('\n').map(Number).filter((n) => n > 0)) {
    try { process.kill(pid, 'SIGKILL'); } catch { /* exited meanwhile */ }
  }
  try { ip('netns', 'del', name); } catch { /* already gone */ }
}

/**
 * Runs argv inside a new namespace; resolves with its exit code.
 * @param {string[]} argv
 */
export function runInNetns(argv) {
  const name = createNetns();
  const child = spawn('ip', ['netns', 'exec', name, ...argv], {
    stdio: 'inherit',
    env: { ...process.env, MESHMEET_NETNS: name },
  });
  // Ctrl+C reaches the child through the terminal; a SIGTERM to this process is
  // passed on. Either way the namespace goes once the child has exited.
  const forward = (/** @type {NodeJS.Signals} */ sig) => { child.kill(sig); };
  process.on('SIGINT', () => {});
  process.on('SIGTERM', forward);
  process.on('SIGHUP', forward);
  return new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      destroyNetns(name);
      resolve(code ?? (signal ? 128 + 15 : 1));
    });
    child.on('error', (e) => {
      console.error(`cannot run ${argv[0]} in the namespace: ${e.message}`);
      destroyNetns(name);
      resolve(1);
    });
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const argv = process.argv.slice(2);
  if (argv.length === 0) {
    console.error('usage: node lib/netns.js COMMAND [ARGS...]');
    process.exit(2);
  }
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    console.error('the browser tests create a network namespace: run them as root');
    process.exit(2);
  }
  process.exitCode = await runInNetns(argv);
}
