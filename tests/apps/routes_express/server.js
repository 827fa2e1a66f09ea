// Express app whose routes the agent reads from its source: a Router in another file mounted
// under /api, and a static route next to a parameter (/api/users/me vs /api/users/:id).
const express = require("express");
const users = require("./routes/users");

const app = express();
app.use("/api", users);
app.get("/health", (req, res) => res.json({ ok: true }));

app.listen(Number(process.env.PORT), "127.0.0.1");
