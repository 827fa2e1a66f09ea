// Plain node http2 server (no framework) for the end-to-end suite: h2c with prior knowledge,
// or TLS with ALPN h2 when TLS_CERT and TLS_KEY name PEM files. Same routes as node_server.js.
const http2 = require("http2");
const { handle, tlsOptions } = require("./node_server");

const tls = tlsOptions();
const server = tls ? http2.createSecureServer(tls, handle) : http2.createServer(handle);
server.listen(Number(process.env.PORT || 3000), "127.0.0.1");
