const express = require("express");

const router = express.Router();
router.get("/users/me", (req, res) => res.json({ user: "me" }));
router.get("/users/:id", (req, res) => res.json({ user: req.params.id }));
router.get("/orders/:id(\\d+)", (req, res) => res.json({ order: req.params.id }));

module.exports = router;
