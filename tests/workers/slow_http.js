// Test worker: an HTTP server on 127.0.0.1:$PORT answering every request with its instance
// number. The instance named by SLOW_INSTANCE answers each request only after SLOW_MS
// milliseconds: a slow worker next to fast ones, for least_conn.
'use strict';
const http = require('http');

const instance = process.env.BALANCER_INSTANCE;
const slow = instance === process.env.SLOW_INSTANCE ? Number(process.env.SLOW_MS || 0) : 0;

const server = http.createServer((req, res) => {
  req.resume();
  setTimeout(() => res.end(instance), req.url === '/health' ? 0 : slow);
});
server.listen(Number(process.env.PORT), '127.0.0.1');
process.on('SIGTERM', () => server.close(() => process.exit(0)));
