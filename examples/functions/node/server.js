// node: a Node.js function (http module only) -- builds a deterministic JSON document
// (~350 KB, xorshift32-seeded), JSON round trips it and hashes the canonical text.
//   GET /health -> 200 "ok";  GET /run -> 200 "<sha256 hex>";  anything else -> 404
// HTTP/1.0 clients get one request per connection; no per-request logging.
'use strict';
const http = require('http');
const crypto = require('crypto');

const NAME = 'node';
const WORDS = ['alpha', 'bravo', 'charlie', 'delta', 'echo', 'foxtrot', 'golf', 'hotel',
  'india', 'juliett', 'kilo', 'lima', 'mike', 'november', 'oscar', 'papa'];

function makeDocument() {
  let s = 2463534242; // xorshift32 state
  const next = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s; };
  const items = [];
  for (let i = 0; i < 2000; i++) {
    items.push({
      id: i,
      name: WORDS[next() % 16] + '-' + WORDS[next() % 16],
      active: next() % 3 !== 0,
      score: next() % 100000,
      tags: [WORDS[next() % 16], WORDS[next() % 16], WORDS[next() % 16]],
      pos: { x: next() % 4096, y: next() % 4096 },
      history: Array.from({ length: 6 }, () => next() % 1000000),
    });
  }
  return { version: 3, generator: 'trenv-functions', items };
}

function run() {
  let text = JSON.stringify(makeDocument());
  for (let i = 0; i < 3; i++) text = JSON.stringify(JSON.parse(text), null, 1);
  const canonical = JSON.stringify(JSON.parse(text));
  return crypto.createHash('sha256').update(canonical).digest('hex');
}

function reply(res, status, body) {
  const buf = Buffer.from(body);
  res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': buf.length });
  res.end(buf);
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?', 1)[0];
  if (req.method === 'GET' && path === '/health') return reply(res, 200, 'ok');
  if (req.method === 'GET' && path === '/run') {
    let body;
    try { body = run(); } catch (e) { console.error(e); return reply(res, 500, 'error: ' + e.message); }
    return reply(res, 200, body);
  }
  return reply(res, 404, 'not found');
});

if (require.main === module) {
  run(); // warm up / self-check before we report ready
  const port = parseInt(process.env.PORT || '8080', 10);
  server.listen(port, '0.0.0.0', 1024, () => console.log(`listening on 0.0.0.0:${port} (${NAME})`));
  for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
}
module.exports = { run };
