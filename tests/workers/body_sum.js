// Shared by the Node test workers: answers "<bytes> <sha256 hex>" of a request's body, hashed
// as it streams in, so a test can check that a body arrived whole without echoing it.
'use strict';
const crypto = require('crypto');

module.exports = function answerBodySum(req, res) {
  const hash = crypto.createHash('sha256');
  let bytes = 0;
  req.on('data', (chunk) => {
    bytes += chunk.length;
    hash.update(chunk);
  });
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`${bytes} ${hash.digest('hex')}`);
  });
};
