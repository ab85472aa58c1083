//! kvfs: Cloudflare Workers KV as a filesystem, and a local Workers KV API server.

pub mod api;
pub mod backend;
pub mod cache;
pub mod cli;
pub mod client;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod paths;
pub mod server;
pub mod text;
