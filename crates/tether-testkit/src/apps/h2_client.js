// Six concurrent requests on ONE h2c connection, even ones marked "x-dev: alice"; prints each
// answer in request order. Bounded: exits with an error after 10 s.
// Usage: node h2_client.js URL
const http2 = require('http2');
const session = http2.connect(process.argv[2]);
setTimeout(() => { console.log('ERROR timeout'); process.exit(1); }, 10000).unref();
const requests = [];
for (let i = 0; i < 6; i++) {
  const headers = { ':path': `/r${i}` };
  if (i % 2 === 0) headers['x-dev'] = 'alice';
  requests.push(new Promise((resolve, reject) => {
    const stream = session.request(headers);
    let body = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => { body += chunk; });
    stream.on('end', () => resolve(body));
    stream.on('error', reject);
    stream.end();
  }));
}
Promise.all(requests)
  .then((bodies) => { bodies.forEach((b) => console.log(b)); session.close(); })
  .catch((e) => { console.log('ERROR ' + e.message); process.exit(1); });
