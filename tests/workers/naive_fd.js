// Test worker for the reuseport policy with Node's default signal handling (no SIGTERM
// handler: SIGTERM kills it at once). Accepts on fd 3 and answers each connection with
// "<pid>\n" after $DELAY_MS (default 100), then closes it: connection-per-request traffic
// always has requests in flight.
'use strict';
const net = require('net');

const delay = Number(process.env.DELAY_MS || 100);
const server = net.createServer((socket) => {
  socket.on('error', () => {});
  setTimeout(() => socket.end(`${process.pid}\n`), delay);
});
server.listen({ fd: 3 });
