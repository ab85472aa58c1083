//! Workers KV limits, checked by the server (to answer as Cloudflare does) and by the mount
//! (to fail early with the right errno instead of after an upload).

/// Longest key name, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value: 25 MiB.
pub const MAX_VALUE_BYTES: usize = 25 * 1024 * 1024;
/// Largest metadata, as serialized JSON.
pub const MAX_METADATA_BYTES: usize = 1024;
/// Shortest `expiration_ttl`, and the least distance of `expiration` from now, in seconds.
pub const MIN_EXPIRATION_TTL: u64 = 60;
/// Largest `expiration` and `expiration_ttl`: below JavaScript's largest safe integer (2^53 - 1)
/// with room to add a TTL to the clock, so that every expiration echoed back is exact for
/// JavaScript clients.
pub const MAX_EXPIRATION: i64 = 9_000_000_000_000_000;
/// Most pairs in one bulk write or keys in one bulk delete.
pub const MAX_BULK_ITEMS: usize = 10_000;
/// Largest bulk request body: 100 MB.
pub const MAX_BULK_BODY_BYTES: usize = 100_000_000;
/// Most keys in one bulk get.
pub const MAX_BULK_GET_KEYS: usize = 100;
/// Most value bytes one bulk get may return: 25 MB.
pub const MAX_BULK_GET_BYTES: usize = 25 * 1024 * 1024;
/// Key listing page size bounds and default.
pub const MIN_LIST_LIMIT: u32 = 10;
pub const MAX_LIST_LIMIT: u32 = 1000;
pub const DEFAULT_LIST_LIMIT: u32 = 1000;
/// Most namespaces one account may hold, as on Cloudflare.
pub const MAX_NAMESPACES: u64 = 1000;
/// Longest namespace title, in characters.
pub const MAX_TITLE_CHARS: usize = 512;
/// Namespace listing page size bounds and default.
pub const MAX_PER_PAGE: u32 = 1000;
pub const DEFAULT_PER_PAGE: u32 = 20;

/// Why a key name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    Dots(String),
    TooLong(usize),
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Empty => write!(f, "Key names must not be empty"),
            KeyError::Dots(k) => {
                write!(f, "Illegal key name \"{k}\". Please use a different name.")
            }
            KeyError::TooLong(n) => write!(
                f,
                "UTF-8 encoded length of {n} exceeds key length limit of {MAX_KEY_BYTES}."
            ),
        }
    }
}

/// Checks a key name against KV's rules: 1–512 bytes, not `.` or `..`.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key == "." || key == ".." {
        return Err(KeyError::Dots(key.to_string()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(key.len()));
    }
    Ok(())
}

/// The message for a value over the limit.
pub fn value_too_large(len: usize) -> String {
    format!("Value length of {len} exceeds limit of {MAX_VALUE_BYTES}.")
}

/// The message for metadata over the limit.
pub fn metadata_too_large(len: usize) -> String {
    format!("Metadata length of {len} exceeds limit of {MAX_METADATA_BYTES}.")
}

/// Checks serialized metadata size; returns the message when too large.
pub fn check_metadata(serialized: &str) -> Result<(), String> {
    if serialized.len() > MAX_METADATA_BYTES {
        return Err(metadata_too_large(serialized.len()));
    }
    Ok(())
}

/// Checks an `expiration_ttl`.
pub fn check_expiration_ttl(ttl: i64) -> Result<(), String> {
    if ttl < MIN_EXPIRATION_TTL as i64 {
        return Err(format!(
            "Invalid expiration_ttl of {ttl}. Expiration TTL must be at least {MIN_EXPIRATION_TTL}."
        ));
    }
    if ttl > MAX_EXPIRATION {
        return Err(format!(
            "Invalid expiration_ttl of {ttl}. Expiration TTL must be at most {MAX_EXPIRATION}."
        ));
    }
    Ok(())
}

/// Checks an absolute `expiration` against the current time `now` (UNIX seconds).
pub fn check_expiration(expiration: i64, now: u64) -> Result<(), String> {
    if expiration < (now + MIN_EXPIRATION_TTL) as i64 {
        return Err(format!(
            "Invalid expiration of {expiration}. Expiration times must be at least {MIN_EXPIRATION_TTL} seconds in the future."
        ));
    }
    if expiration > MAX_EXPIRATION {
        return Err(format!(
            "Invalid expiration of {expiration}. Expiration times must be at most {MAX_EXPIRATION}."
        ));
    }
    Ok(())
}

/// Why KV refuses one write (a single put or one pair of a bulk write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    Key(KeyError),
    ValueTooLarge(usize),
    /// Serialized metadata over [`MAX_METADATA_BYTES`]; the message says how long.
    MetadataTooLarge(String),
    /// `expiration_ttl` under [`MIN_EXPIRATION_TTL`].
    ExpirationTtl(String),
    /// `expiration` less than [`MIN_EXPIRATION_TTL`] seconds ahead.
    Expiration(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Key(e) => e.fmt(f),
            WriteError::ValueTooLarge(n) => f.write_str(&value_too_large(*n)),
            WriteError::MetadataTooLarge(m)
            | WriteError::ExpirationTtl(m)
            | WriteError::Expiration(m) => f.write_str(m),
        }
    }
}

/// A write as KV stores it: metadata serialized compactly, expiration made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedWrite {
    pub metadata: Option<String>,
    pub expiration: Option<i64>,
}

/// Checks a value's size.
pub fn check_value(len: usize) -> Result<(), WriteError> {
    if len > MAX_VALUE_BYTES {
        return Err(WriteError::ValueTooLarge(len));
    }
    Ok(())
}

/// Serializes metadata compactly and checks its size; JSON null means none.
pub fn metadata_text(meta: Option<&serde_json::Value>) -> Result<Option<String>, WriteError> {
    match meta {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(m) => {
            let s = m.to_string();
            check_metadata(&s).map_err(WriteError::MetadataTooLarge)?;
            Ok(Some(s))
        }
    }
}

/// The absolute expiration of a write from `expiration` / `expiration_ttl` at time `now`
/// (UNIX seconds): the TTL wins, as in KV.
pub fn absolute_expiration(
    abs: Option<i64>,
    ttl: Option<i64>,
    now: i64,
) -> Result<Option<i64>, WriteError> {
    if let Some(ttl) = ttl {
        check_expiration_ttl(ttl).map_err(WriteError::ExpirationTtl)?;
        return Ok(Some(now.saturating_add(ttl)));
    }
    if let Some(abs) = abs {
        check_expiration(abs, now.max(0) as u64).map_err(WriteError::Expiration)?;
        return Ok(Some(abs));
    }
    Ok(None)
}

/// Everything KV checks of one write, in the order the API checks a bulk-write pair: key,
/// value size, metadata size, expiration. The one validation of the server routes and the
/// in-process backends, so they refuse the same input for the same reason.
pub fn check_write(
    key: &str,
    value_len: usize,
    metadata: Option<&serde_json::Value>,
    expiration: Option<i64>,
    expiration_ttl: Option<i64>,
    now: i64,
) -> Result<CheckedWrite, WriteError> {
    check_key(key).map_err(WriteError::Key)?;
    check_value(value_len)?;
    Ok(CheckedWrite {
        metadata: metadata_text(metadata)?,
        expiration: absolute_expiration(expiration, expiration_ttl, now)?,
    })
}

/// Whether `id` has the form of a namespace id: 32 lowercase hex characters.
pub fn is_namespace_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a namespace title: not empty, at most [`MAX_TITLE_CHARS`] characters.
pub fn check_title(title: &str) -> Result<(), String> {
    if title.is_empty() {
        return Err("a namespace title is required".into());
    }
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(format!(
            "namespace title must be at most {MAX_TITLE_CHARS} characters"
        ));
    }
    Ok(())
}

/// Checks a key listing's `limit`.
pub fn check_list_limit(limit: i64) -> Result<(), String> {
    if limit < MIN_LIST_LIMIT as i64 {
        return Err(format!("limit argument must be at least {MIN_LIST_LIMIT}"));
    }
    if limit > MAX_LIST_LIMIT as i64 {
        return Err(format!("limit argument must be at most {MAX_LIST_LIMIT}"));
    }
    Ok(())
}

/// The opaque cursor of a key listing: the last key returned, base64url. The next page starts
/// after it.
pub fn encode_cursor(last_key: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_key)
}

/// The key a cursor from [`encode_cursor`] stands for; None when it is not one.
pub fn decode_cursor(cursor: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
}

/// The message for a bulk get answer over [`MAX_BULK_GET_BYTES`].
pub fn bulk_get_too_large(total: usize) -> String {
    format!("Total value length of {total} exceeds limit of {MAX_BULK_GET_BYTES}.")
}

/// Current UNIX time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules() {
        assert_eq!(check_key(""), Err(KeyError::Empty));
        assert_eq!(check_key(".."), Err(KeyError::Dots("..".into())));
        assert!(check_key("a/./b").is_ok());
        assert!(check_key(&"x".repeat(512)).is_ok());
        assert_eq!(check_key(&"x".repeat(513)), Err(KeyError::TooLong(513)));
        assert_eq!(
            KeyError::TooLong(600).to_string(),
            "UTF-8 encoded length of 600 exceeds key length limit of 512."
        );
    }

    #[test]
    fn expiration_rules() {
        assert!(check_expiration_ttl(59).is_err());
        assert!(check_expiration_ttl(60).is_ok());
        assert!(check_expiration(1_000_059, 1_000_000).is_err());
        assert!(check_expiration(1_000_060, 1_000_000).is_ok());
    }

    #[test]
    fn write_rules() {
        let meta = serde_json::json!({"a": 1});
        let ok = check_write("k", 3, Some(&meta), Some(2_000_000), Some(120), 1_000_000).unwrap();
        // The TTL wins over the absolute expiration; metadata is stored compact.
        assert_eq!(ok.expiration, Some(1_000_120));
        assert_eq!(ok.metadata.as_deref(), Some(r#"{"a":1}"#));
        let null = serde_json::Value::Null;
        let none = check_write("k", 0, Some(&null), None, None, 0).unwrap();
        assert_eq!(
            none,
            CheckedWrite {
                metadata: None,
                expiration: None
            }
        );
        assert_eq!(
            check_write("..", 0, None, None, None, 0),
            Err(WriteError::Key(KeyError::Dots("..".into())))
        );
        assert_eq!(
            check_write("k", MAX_VALUE_BYTES + 1, None, None, None, 0),
            Err(WriteError::ValueTooLarge(MAX_VALUE_BYTES + 1))
        );
        let big = serde_json::json!("x".repeat(MAX_METADATA_BYTES));
        assert!(matches!(
            check_write("k", 0, Some(&big), None, None, 0),
            Err(WriteError::MetadataTooLarge(_))
        ));
        assert!(matches!(
            check_write("k", 0, None, None, Some(59), 0),
            Err(WriteError::ExpirationTtl(_))
        ));
        assert!(matches!(
            check_write("k", 0, None, Some(1_000_059), None, 1_000_000),
            Err(WriteError::Expiration(_))
        ));
    }

    #[test]
    fn listing_rules() {
        assert!(check_list_limit(9).is_err());
        assert!(check_list_limit(10).is_ok());
        assert!(check_list_limit(1000).is_ok());
        assert!(check_list_limit(1001).is_err());
        let c = encode_cursor("ké/y".as_bytes());
        assert_eq!(decode_cursor(&c).as_deref(), Some("ké/y".as_bytes()));
        assert_eq!(decode_cursor("not a cursor!"), None);
        assert!(is_namespace_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_namespace_id("0123456789ABCDEF0123456789abcdef"));
        assert!(check_title("").is_err());
        assert!(check_title(&"é".repeat(MAX_TITLE_CHARS)).is_ok());
        assert!(check_title(&"é".repeat(MAX_TITLE_CHARS + 1)).is_err());
    }
}
