//! Path and query encoding, exactly as JavaScript's `encodeURIComponent` (what Cloudflare's own
//! clients send and what `supports_url_encoding` namespaces decode).

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but `A-Z a-z 0-9 - _ . ! ~ * ' ( )`.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// `encodeURIComponent(s)`.
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// A query string (`?a=1&b=2`, or "" when empty) with every value encoded as a component, so a
/// `+` or `&` in a prefix or cursor reaches the server intact.
pub fn query_string(params: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in params.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(name);
        out.push('=');
        out.push_str(&encode_component(value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_encode_uri_component() {
        // Expected values from node: encodeURIComponent(...)
        assert_eq!(encode_component("a/b"), "a%2Fb");
        assert_eq!(encode_component("AZaz09-_.!~*'()"), "AZaz09-_.!~*'()");
        assert_eq!(encode_component(" "), "%20");
        assert_eq!(
            encode_component("+&=?#%:@$,;[]{}|\\^`\"<>"),
            "%2B%26%3D%3F%23%25%3A%40%24%2C%3B%5B%5D%7B%7D%7C%5C%5E%60%22%3C%3E"
        );
        assert_eq!(encode_component("é"), "%C3%A9");
        assert_eq!(encode_component("日本"), "%E6%97%A5%E6%9C%AC");
        assert_eq!(encode_component("😀"), "%F0%9F%98%80");
        assert_eq!(encode_component("\n\t\0"), "%0A%09%00");
        assert_eq!(encode_component("\u{7f}"), "%7F");
        assert_eq!(encode_component(".."), "..");
    }

    #[test]
    fn every_ascii_byte() {
        for b in 0u8..128 {
            let s = (b as char).to_string();
            let unreserved = b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b);
            let want = if unreserved {
                s.clone()
            } else {
                format!("%{b:02X}")
            };
            assert_eq!(encode_component(&s), want, "byte {b}");
        }
    }

    #[test]
    fn query() {
        assert_eq!(query_string(&[]), "");
        assert_eq!(
            query_string(&[("prefix", "a b+c/".into()), ("limit", "10".into())]),
            "?prefix=a%20b%2Bc%2F&limit=10"
        );
    }
}
