// One HTTP/2 session that outlives the agent's start: a request, then "ready" on stdout, then
// after a line on stdin two more requests on the same connection (their HPACK tables already
// hold entries the agent never saw). Usage: node node_http2_session.js URL
const http2 = require("http2");
const readline = require("readline");

const session = http2.connect(process.argv[2], { rejectUnauthorized: false });
const headers = { "x-session": "s-123", "x-tenant": "acme" };

function get(path) {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ":path": path, ...headers });
    const chunks = [];
    stream.on("data", (chunk) => chunks.push(chunk));
    stream.on("end", () => resolve(Buffer.concat(chunks).toString()));
    stream.on("error", reject);
    stream.end();
  });
}

(async () => {
  await get("/before");
  console.log("ready");
  await new Promise((resolve) => readline.createInterface({ input: process.stdin }).once("line", resolve));
  console.log(await get("/later/1"));
  console.log(await get("/later/2"));
  session.close();
})();
