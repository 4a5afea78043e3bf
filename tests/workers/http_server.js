// Test worker: an HTTP server on 127.0.0.1:$PORT for the HTTP proxy tests.
//   GET  /pid      → its pid
//   GET  /headers  → JSON { pid, headers } (the request headers it received)
//   GET  /slow?ms= → its pid, after that many milliseconds
//   POST /sum      → "<bytes> <sha256 hex>" of the body, hashed as it streams in
//   GET  /health   → ok
//   Upgrade: websocket → a minimal RFC 6455 echo (text/binary frames back unmasked, close
//   answered), hand-written because no WebSocket package is installed.
// On SIGTERM it stops accepting, finishes in-flight requests and exits.
'use strict';
const http = require('http');
const crypto = require('crypto');
const answerBodySum = require('./body_sum');

const port = Number(process.env.PORT);
const pid = String(process.pid);

const server = http.createServer((req, res) => {
  req.on('error', () => {});
  res.on('error', () => {});
  const url = new URL(req.url, 'http://worker');
  if (req.method === 'POST' && url.pathname === '/sum') {
    answerBodySum(req, res);
    return;
  }
  req.resume();
  switch (url.pathname) {
    case '/headers':
      res.writeHead(200, { 'content-type': 'application/json', 'x-worker-secret': 'hidden', connection: 'x-worker-secret' });
      res.end(JSON.stringify({ pid, headers: req.headers }));
      return;
    case '/slow':
      setTimeout(() => res.end(pid), Number(url.searchParams.get('ms') || 100));
      return;
    default:
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end(url.pathname === '/health' ? 'ok' : pid);
  }
});

server.on('upgrade', (req, socket, head) => {
  socket.on('error', () => {});
  const key = req.headers['sec-websocket-key'];
  if ((req.headers.upgrade || '').toLowerCase() !== 'websocket' || !key) {
    socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    return;
  }
  const accept = crypto
    .createHash('sha1')
    .update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11')
    .digest('base64');
  socket.write(
    'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
      `Sec-WebSocket-Accept: ${accept}\r\nX-Worker-Pid: ${pid}\r\n\r\n`,
  );
  let buf = head && head.length ? Buffer.from(head) : Buffer.alloc(0);
  const onData = (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    for (;;) {
      if (buf.length < 2) return;
      const opcode = buf[0] & 0x0f;
      const masked = (buf[1] & 0x80) !== 0;
      let len = buf[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (buf.length < 4) return;
        len = buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (buf.length < 10) return;
        len = Number(buf.readBigUInt64BE(2));
        off = 10;
      }
      const maskOff = off;
      if (masked) off += 4;
      if (buf.length < off + len) return;
      const payload = Buffer.from(buf.subarray(off, off + len));
      if (masked) {
        for (let i = 0; i < len; i++) payload[i] ^= buf[maskOff + (i % 4)];
      }
      buf = buf.subarray(off + len);
      socket.write(frame(opcode, payload));
      if (opcode === 0x8) {
        socket.end();
        return;
      }
    }
  };
  socket.on('data', onData);
});

// An unmasked, final frame (server to client).
function frame(opcode, payload) {
  let header;
  if (payload.length < 126) {
    header = Buffer.from([0x80 | opcode, payload.length]);
  } else if (payload.length < 65536) {
    header = Buffer.alloc(4);
    header[0] = 0x80 | opcode;
    header[1] = 126;
    header.writeUInt16BE(payload.length, 2);
  } else {
    header = Buffer.alloc(10);
    header[0] = 0x80 | opcode;
    header[1] = 127;
    header.writeBigUInt64BE(BigInt(payload.length), 2);
  }
  return Buffer.concat([header, payload]);
}

server.listen(port, '127.0.0.1');

process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
