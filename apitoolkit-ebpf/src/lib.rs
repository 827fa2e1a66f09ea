#![no_std]
// The kernel programs live in the binary target; this library target lets the agent declare a
// build dependency on the crate so cargo rebuilds the agent when the programs change.
