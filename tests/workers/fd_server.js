// Test worker for the reuseport policy: accepts on the inherited socket (fd 3, systemd's
// LISTEN_FDS contract), greets each connection with
// "<pid> LISTEN_FDS=<n> LISTEN_PID=<pid> LISTEN_FDNAMES=<names>\n", then echoes.
'use strict';
const net = require('net');

const greeting = `${process.pid} LISTEN_FDS=${process.env.LISTEN_FDS} ` +
  `LISTEN_PID=${process.env.LISTEN_PID} LISTEN_FDNAMES=${process.env.LISTEN_FDNAMES}\n`;

const server = net.createServer((socket) => {
  socket.on('error', () => {});
  socket.write(greeting);
  socket.pipe(socket);
});
server.listen({ fd: 3 });

process.on('SIGTERM', () => server.close(() => process.exit(0)));
