// Plain node http(s) server (no framework) for the end-to-end suite; keeps connections alive.
// HTTPS when TLS_CERT and TLS_KEY name PEM files.
const fs = require("fs");
const http = require("http");
const https = require("https");

const BIG_BODY_BYTES = 2 * 1024 * 1024;

function bigBody() {
  const body = Buffer.alloc(BIG_BODY_BYTES);
  for (let i = 0; i < body.length; i++) body[i] = i % 256;
  return body;
}

function handle(req, res) {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    if (req.url === "/big") {
      const body = bigBody();
      res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": body.length });
      res.end(body);
      return;
    }
    const body = JSON.stringify({ path: req.url, received: Buffer.concat(chunks).toString() });
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
    res.end(body);
  });
}

const server = process.env.TLS_CERT
  ? https.createServer(
      { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) },
      handle,
    )
  : http.createServer(handle);
server.keepAliveTimeout = 30000;
server.listen(Number(process.env.PORT || 3000), "127.0.0.1");
