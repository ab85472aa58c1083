//! Wire types of the Workers KV REST API v4 (the 14 operations `kvfs serve` answers and the client sends).
//!
//! Field order follows what Cloudflare sends, so serialized JSON reads like the real API.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// One entry of `errors` / `messages` in the envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiMessage {
    pub code: u32,
    pub message: String,
}

/// The envelope every JSON response is wrapped in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub result: Option<T>,
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub errors: Vec<ApiMessage>,
    #[serde(default)]
    pub messages: Vec<ApiMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_info: Option<Json>,
}

/// A namespace as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub supports_url_encoding: bool,
}

/// `result_info` of the namespace listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageInfo {
    #[serde(default)]
    pub page: u64,
    #[serde(default)]
    pub per_page: u64,
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub total_count: u64,
}

/// `result_info` of the key listing; `cursor` is empty on the last page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CursorInfo {
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub cursor: String,
}

/// One key of a listing. `expiration` and `metadata` are present only when set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Json>,
}

/// Body of create / rename namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TitleBody {
    pub title: String,
}

/// One pair of a bulk write (`PUT .../bulk`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkWriteItem {
    pub key: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base64: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_ttl: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Json>,
}

/// Result of bulk write and bulk delete. `unsuccessful_keys` should be retried.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkResult {
    #[serde(default)]
    pub successful_key_count: u64,
    #[serde(default)]
    pub unsuccessful_keys: Vec<String>,
}

/// Body of bulk get (`POST .../bulk/get`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkGetBody {
    pub keys: Vec<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(
        rename = "withMetadata",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub with_metadata: Option<bool>,
}

/// One value of a bulk get with `withMetadata: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkGetEntry {
    pub value: Json,
    #[serde(default)]
    pub metadata: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<u64>,
}
