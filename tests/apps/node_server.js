// Plain node http(s) server (no framework) for the end-to-end suite; keeps connections alive.
// HTTPS when TLS_CERT and TLS_KEY name PEM files. `handle` also serves node_http2_server.js.
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
    if (req.url.startsWith("/slow")) {
      return; // never answered: the client gives up (an HTTP/2 client resets the stream)
    }
    const body = JSON.stringify({ path: req.url, received: Buffer.concat(chunks).toString() });
    const headers = { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) };
    if (req.stream) headers["X-Stream"] = String(req.stream.id); // HTTP/2
    res.writeHead(200, headers);
    res.end(body);
  });
}

/// Certificate options when TLS_CERT and TLS_KEY are set.
function tlsOptions() {
  return process.env.TLS_CERT
    ? { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) }
    : null;
}

module.exports = { handle, tlsOptions };

if (require.main === module) {
  const tls = tlsOptions();
  const server = tls ? https.createServer(tls, handle) : http.createServer(handle);
  server.keepAliveTimeout = 30000;
  server.listen(Number(process.env.PORT || 3000), "127.0.0.1");
}
