//! The attribute store through the core's read paths: a cache dir whose rows hold the FNV-1a
//! digests of an older kvfs keeps every mtime when the same values are read again (a large
//! value too, digested as it streams in), and each row takes the XXH3 digest.

mod core;

use crate::core::{read_file, resolve, Core};
use kvfs::fs::attrs::{digest, value_digest};
use rusqlite::{params, Connection};
use std::time::{Duration, UNIX_EPOCH};

/// (digest, digest_kind) of each key's row, by key.
fn rows(c: &Core) -> Vec<(String, u64, Option<i64>)> {
    let conn = Connection::open(c.cfg.cache_dir.join("attrs.sqlite3")).unwrap();
    let mut st = conn
        .prepare("SELECT key, digest, digest_kind FROM attrs ORDER BY key")
        .unwrap();
    st.query_map([], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[tokio::test]
async fn rows_of_an_older_version_keep_their_mtimes_when_their_values_are_read() {
    let mut c = Core::new("t");
    // Over the cache's spill size: read alone, digested as it arrives into a cache file.
    let big: Vec<u8> = (0..(3 << 20) + 7).map(|i| (i % 253) as u8).collect();
    let values: [(&str, &[u8]); 3] = [("small", b"s1"), ("big", &big), ("edited", b"e1")];
    for (key, value) in values {
        c.backend.poke(&c.ns, key, value.to_vec()).unwrap();
        assert_eq!(read_file(c.fs(), key).await.unwrap(), value);
    }
    // What an older kvfs left: FNV-1a digests, no digest kind, mtimes of its own.
    let old = 1_000_000_000i64;
    c.close();
    {
        let conn = Connection::open(c.cfg.cache_dir.join("attrs.sqlite3")).unwrap();
        for (key, value) in values {
            let n = conn
                .execute(
                    "UPDATE attrs SET digest = ?1, digest_kind = NULL, mtime = ?2, ctime = ?2
                     WHERE key = ?3",
                    params![digest(value) as i64, old * 1_000_000_000, key],
                )
                .unwrap();
            assert_eq!(n, 1, "{key} has a row");
        }
    }
    c.backend.poke(&c.ns, "edited", b"e2".to_vec()).unwrap();
    // Every value read alone, as a large one always is.
    c.backend.set_bulk_get_too_large(true);
    c.reopen();
    let old_mtime = UNIX_EPOCH + Duration::from_secs(old as u64);
    for (key, value) in [("small", &b"s1"[..]), ("big", &big), ("edited", b"e2")] {
        assert_eq!(read_file(c.fs(), key).await.unwrap(), value);
        let mtime = resolve(c.fs(), key).await.unwrap().mtime;
        assert_eq!(mtime == old_mtime, key != "edited", "{key}: {mtime:?}");
    }
    let xxh3 = |key: &str, v: &[u8]| (key.to_string(), value_digest(v), Some(1));
    c.close();
    assert_eq!(
        rows(&c),
        [
            xxh3("big", &big),
            xxh3("edited", b"e2"),
            xxh3("small", b"s1")
        ]
    );
    // Next mount: compared by XXH3 alone, the mtimes stay.
    c.reopen();
    assert_eq!(read_file(c.fs(), "big").await.unwrap(), big);
    assert_eq!(resolve(c.fs(), "big").await.unwrap().mtime, old_mtime);
}
