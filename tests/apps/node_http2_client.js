// Drives many concurrent streams over ONE HTTP/2 session, then resets one stream:
//   node node_http2_client.js URL STREAMS
// Each stream POSTs its own body to /echo/<n>; prints one JSON line per stream, then
// {"reset": true} once the /slow stream was cancelled. TLS certificates are not verified.
const http2 = require("http2");

const [url, streams] = [process.argv[2], Number(process.argv[3] || 20)];
const session = http2.connect(url, { rejectUnauthorized: false });
session.on("error", (error) => {
  console.error(error);
  process.exit(1);
});

function post(n) {
  return new Promise((resolve, reject) => {
    const stream = session.request({
      ":method": "POST",
      ":path": `/echo/${n}?n=${n}`,
      "content-type": "application/json",
    });
    const chunks = [];
    stream.on("data", (chunk) => chunks.push(chunk));
    stream.on("end", () => resolve(Buffer.concat(chunks).toString()));
    stream.on("error", reject);
    stream.end(JSON.stringify({ stream: n, filler: "x".repeat(100 * n) }));
  });
}

(async () => {
  const bodies = await Promise.all(Array.from({ length: streams }, (_, n) => post(n)));
  for (const body of bodies) console.log(body);
  const slow = session.request({ ":method": "GET", ":path": "/slow" });
  slow.on("error", () => {});
  slow.on("close", () => {
    console.log(JSON.stringify({ reset: true }));
    session.close();
  });
  setTimeout(() => slow.close(http2.constants.NGHTTP2_CANCEL), 200);
})();
