// Test worker for the HTTP/1.1 wire tests: an HTTP server on 127.0.0.1:$PORT whose routes
// produce each kind of response framing. `<id>` below is "<instance>/<pid>".
//   /chunked      → two res.write()s then res.end(): Transfer-Encoding: chunked, naming <id>
//   /length?n=N   → N bytes of (i * 31 + 7) % 256 with a Content-Length (HEAD: the length only)
//   /no-content   → 204
//   /not-modified → 304 with an ETag
//   /close-after  → "closed by <id>" with Connection: close (the worker closes the connection)
//   POST /echo    → "<bytes> <sha256 hex>" of the request body
//   /trailers     → chunked "trailer body <id>" ending with an X-Checksum trailer
//   /hints        → a 103 Early Hints, then "hinted <id>"
//   anything else → "ok <id>"
// Default signal handling: SIGTERM ends it.
'use strict';
const http = require('http');
const crypto = require('crypto');
const answerBodySum = require('./body_sum');

const id = `${process.env.BALANCER_INSTANCE}/${process.pid}`;

// The byte at offset i of every /length body; the tests compute the same.
function pattern(n) {
  const buf = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) buf[i] = (i * 31 + 7) % 256;
  return buf;
}

const server = http.createServer((req, res) => {
  req.on('error', () => {});
  res.on('error', () => {});
  const url = new URL(req.url, 'http://worker');
  if (url.pathname === '/echo') {
    answerBodySum(req, res);
    return;
  }
  req.resume();
  switch (url.pathname) {
    case '/chunked':
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write(`first chunk from ${id}\n`);
      // Later writes go out as chunks of their own.
      setImmediate(() => {
        res.write(`second chunk from ${id}\n`);
        res.end();
      });
      return;
    case '/length': {
      const body = pattern(Number(url.searchParams.get('n') || 0));
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.length });
      res.end(body);
      return;
    }
    case '/no-content':
      res.writeHead(204, { 'x-worker': id });
      res.end();
      return;
    case '/not-modified':
      res.writeHead(304, { etag: '"wire-v1"', 'x-worker': id });
      res.end();
      return;
    case '/close-after': {
      const body = `closed by ${id}`;
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length, connection: 'close' });
      res.end(body);
      return;
    }
    case '/trailers': {
      const body = `trailer body ${id}`;
      res.writeHead(200, { 'content-type': 'text/plain', trailer: 'x-checksum' });
      res.write(body.slice(0, 8));
      res.write(body.slice(8));
      res.addTrailers({ 'x-checksum': crypto.createHash('sha256').update(body).digest('hex') });
      res.end();
      return;
    }
    case '/hints':
      res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style' });
      setTimeout(() => {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(`hinted ${id}`);
      }, 20);
      return;
    default:
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end(`ok ${id}`);
  }
});

server.listen(Number(process.env.PORT), '127.0.0.1');
