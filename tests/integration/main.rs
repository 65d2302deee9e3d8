//! The integration suite: one test binary, real loopback sockets on port 0, and the same
//! simulated Miralix box the demo uses as the upstream.

mod audio;
mod cli;
mod deploy;
mod fleet;
mod hostile;
mod memory;
mod observability;
mod proxy;
mod recordings;
mod resilience;
mod security;
mod serving;
mod status;
mod structure;
mod support;
mod surface;
mod upstream;
