// Test worker: pid_server.js's protocol (greets each connection with "<pid>\n", then echoes)
// while its heap outside V8 grows steadily, like a leak. Env:
//   GROW_MB     MiB allocated (and written, so they are resident) every 100 ms (default 8)
//   GROW_CAP_MB stop growing past this many MiB (default 160), to stay bounded
//   ONCE_MARK   a file path: the first start creates it; a later start finding it exits 1
//               at once (a replacement that can never become ready)
'use strict';
const fs = require('fs');
const net = require('net');

const mark = process.env.ONCE_MARK;
if (mark) {
  if (fs.existsSync(mark)) process.exit(1);
  fs.writeFileSync(mark, String(process.pid));
}

const step = Number(process.env.GROW_MB || 8);
const cap = Number(process.env.GROW_CAP_MB || 160);
const leak = [];
const grow = setInterval(() => {
  if (leak.length * step >= cap) return clearInterval(grow);
  leak.push(Buffer.alloc(step * 1024 * 1024, 1));
}, 100);

const server = net.createServer((socket) => {
  socket.on('error', () => {});
  socket.write(String(process.pid) + '\n');
  socket.pipe(socket);
});
server.listen(Number(process.env.PORT), '127.0.0.1');

process.on('SIGTERM', () => {
  clearInterval(grow);
  server.close(() => process.exit(0));
});
