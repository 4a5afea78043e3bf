// Test worker that knows nothing of balancer: a TCP server on a hard-coded port (APP_PORT, so
// the test can pick a free one; never $PORT), bound on every address (`::`, dual-stack, Node's
// default), that greets each connection with "<pid>\n" and then echoes. Optionally also binds
// an unrelated "admin" port (ADMIN_PORT) that answers "admin <pid>\n".
'use strict';
const net = require('net');

const greet = (prefix) => (socket) => {
  socket.on('error', () => {});
  socket.write(prefix + String(process.pid) + '\n');
  socket.pipe(socket);
};
const server = net.createServer(greet(''));
server.listen(Number(process.env.APP_PORT));
if (process.env.ADMIN_PORT) {
  net.createServer(greet('admin ')).listen(Number(process.env.ADMIN_PORT), '127.0.0.1');
}
process.on('SIGTERM', () => server.close(() => process.exit(0)));
