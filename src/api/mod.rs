//! The Workers KV REST API's shapes and limits, shared by the client and the local server.

pub mod limits;
pub mod types;

pub use types::*;
