// Test worker with two listeners: HTTP on $PORT (answers its pid and both port variables as
// JSON) and UDP on $DNS_PORT (answers "<pid> <payload>").
'use strict';
const http = require('http');
const dgram = require('dgram');

const ports = { PORT: process.env.PORT, DNS_PORT: process.env.DNS_PORT };
http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ pid: process.pid, ...ports }) + '\n');
}).listen(Number(ports.PORT), '127.0.0.1');

const udp = dgram.createSocket('udp4');
udp.on('message', (msg, peer) => udp.send(Buffer.concat([Buffer.from(`${process.pid} `), msg]), peer.port, peer.address));
udp.bind(Number(ports.DNS_PORT), '127.0.0.1');

process.on('SIGTERM', () => process.exit(0));
