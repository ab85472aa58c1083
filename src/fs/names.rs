//! How key names map to paths: `/` separates directories; keys that cannot be a path are hidden.

/// Longest file name segment most tools accept.
pub const MAX_SEGMENT_BYTES: usize = 255;

/// True when every `/`-separated segment of `key` can be a file name: not empty (`a//b`,
/// leading or trailing `/`), not `.` or `..`, at most 255 bytes.
pub fn representable(key: &str) -> bool {
    key.split('/').all(valid_segment)
}

/// True when `name` can be one path segment.
pub fn valid_segment(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_SEGMENT_BYTES
        && !name.contains('\0')
}

/// Joins a directory path (no trailing `/`, "" for the namespace root) and a child name.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The listing prefix for a directory path: "" for the namespace root, else `dir/`.
pub fn dir_prefix(dir: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    }
}

/// The immediate child of `dir` that `key` lies under, and whether it is a directory.
/// None when `key` is not below `dir`.
pub fn child_of<'a>(dir_prefix: &str, key: &'a str) -> Option<(&'a str, bool)> {
    let rest = key.strip_prefix(dir_prefix)?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], true)),
        None => Some((rest, false)),
    }
}

/// A namespace title shown as a directory name, or None when it must be shown by id.
pub fn title_as_name(title: &str) -> Option<&str> {
    (!title.contains('/') && valid_segment(title) && !title.contains('\0')).then_some(title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representable_keys() {
        assert!(representable("a/b/c"));
        assert!(representable("with space/%?/ünï"));
        assert!(!representable("a//b"));
        assert!(!representable("/a"));
        assert!(!representable("a/"));
        assert!(!representable("a/./b"));
        assert!(!representable("../a"));
        assert!(!representable(&"x".repeat(256)));
        assert!(representable(&format!(
            "{}/{}",
            "x".repeat(255),
            "y".repeat(255)
        )));
    }

    #[test]
    fn children() {
        assert_eq!(child_of("", "a/b"), Some(("a", true)));
        assert_eq!(child_of("", "a"), Some(("a", false)));
        assert_eq!(child_of("a/", "a/b/c"), Some(("b", true)));
        assert_eq!(child_of("a/", "ab"), None);
        assert_eq!(join("", "x"), "x");
        assert_eq!(join("a/b", "x"), "a/b/x");
        assert_eq!(dir_prefix("a"), "a/");
    }

    #[test]
    fn titles() {
        assert_eq!(title_as_name("My NS"), Some("My NS"));
        assert_eq!(title_as_name("a/b"), None);
        assert_eq!(title_as_name(".."), None);
    }
}
