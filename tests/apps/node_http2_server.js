// Plain node http2 server (no framework) for the end-to-end suite: h2c with prior knowledge,
// or TLS with ALPN h2 when TLS_CERT and TLS_KEY name PEM files.
const fs = require("fs");
const http2 = require("http2");

const BIG_BODY_BYTES = 2 * 1024 * 1024;

function bigBody() {
  const body = Buffer.alloc(BIG_BODY_BYTES);
  for (let i = 0; i < body.length; i++) body[i] = (i * 7) % 251;
  return body;
}

function handle(req, res) {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    if (req.url === "/big") {
      res.writeHead(200, { "content-type": "application/octet-stream" });
      res.end(bigBody());
      return;
    }
    if (req.url.startsWith("/slow")) {
      return; // never answered: the client resets the stream
    }
    const body = JSON.stringify({ path: req.url, received: Buffer.concat(chunks).toString() });
    res.writeHead(200, { "content-type": "application/json", "x-stream": String(req.stream.id) });
    res.end(body);
  });
}

const server = process.env.TLS_CERT
  ? http2.createSecureServer(
      { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) },
      handle,
    )
  : http2.createServer(handle);
server.listen(Number(process.env.PORT || 3000), "127.0.0.1");
