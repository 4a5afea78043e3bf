// An HTTP worker for balancer: listens on 127.0.0.1:$PORT and says which process answered.
// On SIGTERM it stops accepting, lets in-flight requests finish, and exits (the worker contract).
'use strict';
const http = require('http');

const port = Number(process.env.PORT || 3000);
const instance = process.env.BALANCER_INSTANCE || '0';

const server = http.createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  const body = JSON.stringify({ pid: process.pid, instance, app: process.env.BALANCER_APP, url: req.url });
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(body + '\n');
});

server.listen(port, '127.0.0.1', () => {
  console.log(`node worker ${instance} (pid ${process.pid}) listening on 127.0.0.1:${port}`);
});

process.on('SIGTERM', () => {
  console.log(`node worker ${instance} (pid ${process.pid}) stopping`);
  server.close(() => process.exit(0));
  // Idle keep-alive sockets would hold close() open; end them.
  server.closeIdleConnections();
});
