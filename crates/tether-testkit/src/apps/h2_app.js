// An h2c (HTTP/2 without TLS, prior knowledge) app: answers "NAME PATH X-DEV".
// Usage: node h2_app.js NAME PORT
const http2 = require('http2');
const [name, port] = process.argv.slice(2);
http2.createServer((req, res) => res.end(`${name} ${req.url} ${req.headers['x-dev'] || '-'}`)).listen(Number(port));
