// Test worker: pid_server.js that also leaves processes behind, as careless apps do:
// a child `sleep` in its process group, and a `detached: true` shell (a session of its own)
// with its own `sleep`, a great-grandchild. Each pid is appended to $PIDS_FILE.
// Default signal handling (no SIGTERM handler). Optional env:
//   EXIT_AFTER_MS  exit with code 3 after this long (a crash that leaves its children)
'use strict';
const net = require('net');
const fs = require('fs');
const { spawn } = require('child_process');

const port = Number(process.env.PORT);
const file = process.env.PIDS_FILE;

const child = spawn('sleep', ['1000'], { stdio: 'ignore' });
const detached = spawn('sh', ['-c', 'sleep 1000 & echo "grandchild $!" >> "$PIDS_FILE"; wait'], {
  detached: true,
  stdio: 'ignore',
});
detached.unref();
fs.appendFileSync(file, `worker ${process.pid}\nchild ${child.pid}\ndetached ${detached.pid}\n`);

const server = net.createServer((socket) => {
  socket.on('error', () => {});
  socket.write(String(process.pid) + '\n');
  socket.pipe(socket);
});
server.listen(port, '127.0.0.1');

if (process.env.EXIT_AFTER_MS) {
  setTimeout(() => process.exit(3), Number(process.env.EXIT_AFTER_MS));
}
