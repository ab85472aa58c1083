//! Wording shared by messages and logs.

/// `n` and the noun, singular for one: "1 change", "2 changes".
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn singular_for_one() {
        assert_eq!(super::count(1u32, "write"), "1 write");
        assert_eq!(super::count(0u32, "write"), "0 writes");
        assert_eq!(super::count(2u64, "delete"), "2 deletes");
    }
}
