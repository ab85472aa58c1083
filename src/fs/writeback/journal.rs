//! The write-back journal: one row per key with a change not yet confirmed by the server.
//! SQLite in WAL mode; a row is committed before close() returns, so a crash of the daemon
//! loses nothing that close acknowledged. Only the latest change of a key is kept. A small
//! value is stored in its row (`value`); a larger one in the staging file the row names.

use rusqlite::{params, Connection};
use serde_json::Value as Json;
use std::path::Path;
use std::sync::Mutex;

/// What is pending for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Write the staged content named `blob` (see `blob::Blob`).
    Put {
        blob: String,
        len: u64,
        metadata: Option<Json>,
        expiration: Option<u64>,
    },
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ns: String,
    pub key: String,
    /// Increases with every change, so an upload only retires the version it sent.
    pub seq: u64,
    pub op: Op,
    /// The key may exist on the server (a delete must be sent; a put replaces something).
    pub remote: bool,
    /// Why the server refused this change for good (e.g. over a limit); not retried.
    pub error: Option<String>,
}

pub struct Journal {
    conn: Mutex<Connection>,
}

impl Journal {
    pub fn open(path: &Path) -> rusqlite::Result<Journal> {
        let conn = Connection::open(path)?;
        // NORMAL in WAL: a commit survives the death of the process; fsync() uploads anyway.
        // EXCLUSIVE: only this mount opens the cache dir (it is flock'ed), so each commit skips
        // the file-lock calls and the shared-memory index (a sixth of a `cp -r`'s daemon CPU).
        conn.execute_batch(
            "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS pending (
                ns TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
                op TEXT NOT NULL, blob TEXT, len INTEGER, metadata TEXT, expiration INTEGER,
                remote INTEGER NOT NULL, error TEXT, value BLOB,
                PRIMARY KEY (ns, key));",
        )?;
        // Journals of earlier versions have no `value` column: their values are all in files.
        let has_value: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('pending') WHERE name = 'value'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_value {
            conn.execute_batch("ALTER TABLE pending ADD COLUMN value BLOB")?;
        }
        Ok(Journal {
            conn: Mutex::new(conn),
        })
    }

    /// Every pending row, oldest change first, with the value stored inline if it is.
    pub fn load(&self) -> rusqlite::Result<Vec<(Row, Option<Vec<u8>>)>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT ns, key, seq, op, blob, len, metadata, expiration, remote, error, value
             FROM pending ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            let op: String = r.get(3)?;
            let op = if op == "put" {
                let metadata: Option<String> = r.get(6)?;
                Op::Put {
                    blob: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    len: r.get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
                    metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
                    expiration: r.get::<_, Option<i64>>(7)?.map(|e| e as u64),
                }
            } else {
                Op::Delete
            };
            let row = Row {
                ns: r.get(0)?,
                key: r.get(1)?,
                seq: r.get::<_, i64>(2)? as u64,
                op,
                remote: r.get::<_, i64>(8)? != 0,
                error: r.get(9)?,
            };
            Ok((row, r.get(10)?))
        })?;
        rows.collect()
    }

    pub fn max_seq(&self) -> rusqlite::Result<u64> {
        let conn = self.conn.lock().unwrap();
        conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM pending", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
    }

    /// Records a change, replacing any earlier one of the same key; `inline` is a put's value
    /// when it is stored in the row instead of a staging file.
    pub fn upsert(&self, row: &Row, inline: Option<&[u8]>) -> rusqlite::Result<()> {
        let conn = self.conn.lock().unwrap();
        let (op, blob, len, metadata, expiration) = match &row.op {
            Op::Put {
                blob,
                len,
                metadata,
                expiration,
            } => (
                "put",
                Some(blob.as_str()),
                Some(*len as i64),
                metadata.as_ref().map(|m| m.to_string()),
                expiration.map(|e| e as i64),
            ),
            Op::Delete => ("delete", None, None, None, None),
        };
        conn.prepare_cached("INSERT OR REPLACE INTO pending (ns, key, seq, op, blob, len, metadata, expiration, remote, error, value)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)").and_then(|mut st| st.execute(params![
                row.ns,
                row.key,
                row.seq as i64,
                op,
                blob,
                len,
                metadata,
                expiration,
                row.remote as i64,
                row.error,
                inline
            ]))?;
        Ok(())
    }

    /// Drops the row of a key (whatever its version).
    pub fn remove(&self, ns: &str, key: &str) -> rusqlite::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.prepare_cached("DELETE FROM pending WHERE ns = ?1 AND key = ?2")
            .and_then(|mut st| st.execute(params![ns, key]))?;
        Ok(())
    }

    /// Retires rows the server confirmed, each only if no newer change replaced it.
    pub fn complete(&self, done: &[(String, String, u64)]) -> rusqlite::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM pending WHERE ns = ?1 AND key = ?2 AND seq = ?3")?;
            for (ns, key, seq) in done {
                stmt.execute(params![ns, key, *seq as i64])?;
            }
        }
        tx.commit()
    }

    pub fn set_error(&self, ns: &str, key: &str, seq: u64, error: &str) -> rusqlite::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.prepare_cached(
            "UPDATE pending SET error = ?4 WHERE ns = ?1 AND key = ?2 AND seq = ?3",
        )
        .and_then(|mut st| st.execute(params![ns, key, seq as i64, error]))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, seq: u64) -> Row {
        Row {
            ns: "n".into(),
            key: key.into(),
            seq,
            op: Op::Put {
                blob: format!("b{seq}"),
                len: 3,
                metadata: Some(serde_json::json!({"a": 1})),
                expiration: Some(9),
            },
            remote: false,
            error: None,
        }
    }

    #[test]
    fn keeps_the_latest_change_per_key_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite3");
        let j = Journal::open(&path).unwrap();
        j.upsert(&put("a", 1), None).unwrap();
        j.upsert(&put("b", 2), Some(b"inline")).unwrap();
        j.upsert(
            &Row {
                op: Op::Delete,
                remote: true,
                ..put("a", 3)
            },
            None,
        )
        .unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        let rows = j.load().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], (put("b", 2), Some(b"inline".to_vec())));
        assert_eq!((&rows[1].0.op, &rows[1].1), (&Op::Delete, &None));
        assert_eq!(j.max_seq().unwrap(), 3);
        // Completing an older version leaves the newer change in place.
        j.complete(&[("n".into(), "a".into(), 1), ("n".into(), "b".into(), 2)])
            .unwrap();
        let rows = j.load().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0.seq, 3);
        j.set_error("n", "a", 3, "too big").unwrap();
        assert_eq!(j.load().unwrap()[0].0.error.as_deref(), Some("too big"));
    }

    /// A journal written before values were stored inline opens, and keeps its rows.
    #[test]
    fn a_journal_of_an_earlier_version_gains_the_value_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite3");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE pending (
                ns TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
                op TEXT NOT NULL, blob TEXT, len INTEGER, metadata TEXT, expiration INTEGER,
                remote INTEGER NOT NULL, error TEXT,
                PRIMARY KEY (ns, key));
             INSERT INTO pending VALUES ('n', 'k', 4, 'put', 's1-1', 3, NULL, NULL, 0, NULL);",
        )
        .unwrap();
        drop(old);
        let j = Journal::open(&path).unwrap();
        let rows = j.load().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0.seq, 4);
        assert_eq!(rows[0].1, None, "its value is in the staging file");
        j.upsert(&put("x", 5), Some(b"v")).unwrap();
        assert_eq!(j.load().unwrap()[1].1.as_deref(), Some(&b"v"[..]));
    }
}
