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
    Ok(())
}

/// Checks an absolute `expiration` against the current time `now` (UNIX seconds).
pub fn check_expiration(expiration: i64, now: u64) -> Result<(), String> {
    if expiration < (now + MIN_EXPIRATION_TTL) as i64 {
        return Err(format!(
            "Invalid expiration of {expiration}. Expiration times must be at least {MIN_EXPIRATION_TTL} seconds in the future."
        ));
    }
    Ok(())
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
}
