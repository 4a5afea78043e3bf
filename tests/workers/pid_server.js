// Test worker: a TCP server on 127.0.0.1:$PORT that greets each connection with "<pid>\n" and
// then echoes what it receives. Optional env:
//   READY_DELAY_MS  wait this long before listening (slow start)
//   GREETING        text to send instead of the pid
'use strict';
const net = require('net');

const port = Number(process.env.PORT);
const delay = Number(process.env.READY_DELAY_MS || 0);

const server = net.createServer((socket) => {
  socket.on('error', () => {});
  socket.write((process.env.GREETING || String(process.pid)) + '\n');
  socket.pipe(socket);
});

setTimeout(() => server.listen(port, '127.0.0.1'), delay);

process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
});
