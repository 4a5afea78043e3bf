// Test worker: a UDP server on 127.0.0.1:$PORT answering every datagram with "<pid> <payload>".
// On SIGTERM it closes its socket and exits.
'use strict';
const dgram = require('dgram');

const prefix = Buffer.from(`${process.pid} `);
const socket = dgram.createSocket({ type: 'udp4', recvBufferSize: 1 << 20 });

socket.on('message', (msg, peer) => {
  socket.send(Buffer.concat([prefix, msg]), peer.port, peer.address);
});
socket.on('error', () => {});
socket.bind(Number(process.env.PORT), '127.0.0.1');

process.on('SIGTERM', () => socket.close(() => process.exit(0)));
