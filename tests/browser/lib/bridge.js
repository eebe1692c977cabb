// Runs inside another network namespace (see lib/restricted.js): serves a TCP port of
// that namespace's loopback on a Unix socket, which processes in any namespace can
// connect to. Usage: node lib/bridge.js SOCKET_PATH PORT. Prints "ready" once
// listening; ends when killed, or with the namespace.

import { createServer, connect } from 'node:net';
import { rmSync } from 'node:fs';

const [path, port] = process.argv.slice(2);
if (!path || !Number(port)) {
  console.error('usage: node lib/bridge.js SOCKET_PATH PORT');
  process.exit(2);
}
rmSync(path, { force: true });
const server = createServer((c) => {
  const up = connect(Number(port), '127.0.0.1');
  c.pipe(up).pipe(c);
  const end = () => { c.destroy(); up.destroy(); };
  c.on('error', end);
  up.on('error', end);
  c.on('close', end);
  up.on('close', end);
});
server.listen(path, () => process.stdout.write('ready\n'));
