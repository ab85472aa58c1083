//! kvfs: Cloudflare Workers KV as a filesystem, and a local Workers KV API server.

pub mod api;
pub mod cli;
pub mod client;
pub mod server;
