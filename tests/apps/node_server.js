// Plain node http server (no framework) for the end-to-end suite; keeps connections alive.
const http = require("http");

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = JSON.stringify({ path: req.url, received: Buffer.concat(chunks).toString() });
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
    res.end(body);
  });
});
server.keepAliveTimeout = 30000;
server.listen(Number(process.env.PORT || 3000), "127.0.0.1");
