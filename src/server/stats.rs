//! Per-operation request counters (`GET /__kvfs/stats`), read by tests and benchmarks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Entries kept in the operation log: enough for a test's job, bounded for a long-running server.
const LOG_ENTRIES: usize = 1000;

/// The 13 API operations (both bulk delete routes count as `bulk_delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    ListNamespaces,
    CreateNamespace,
    GetNamespace,
    RenameNamespace,
    DeleteNamespace,
    ListKeys,
    GetValue,
    PutValue,
    DeleteValue,
    GetMetadata,
    BulkWrite,
    BulkDelete,
    BulkGet,
}

impl Op {
    pub const ALL: [Op; 13] = [
        Op::ListNamespaces,
        Op::CreateNamespace,
        Op::GetNamespace,
        Op::RenameNamespace,
        Op::DeleteNamespace,
        Op::ListKeys,
        Op::GetValue,
        Op::PutValue,
        Op::DeleteValue,
        Op::GetMetadata,
        Op::BulkWrite,
        Op::BulkDelete,
        Op::BulkGet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::ListNamespaces => "list_namespaces",
            Op::CreateNamespace => "create_namespace",
            Op::GetNamespace => "get_namespace",
            Op::RenameNamespace => "rename_namespace",
            Op::DeleteNamespace => "delete_namespace",
            Op::ListKeys => "list_keys",
            Op::GetValue => "get_value",
            Op::PutValue => "put_value",
            Op::DeleteValue => "delete_value",
            Op::GetMetadata => "get_metadata",
            Op::BulkWrite => "bulk_write",
            Op::BulkDelete => "bulk_delete",
            Op::BulkGet => "bulk_get",
        }
    }

    /// Prefix of this operation's "namespace not found" message.
    pub fn verb(self) -> &'static str {
        match self {
            Op::ListNamespaces => "list namespaces",
            Op::CreateNamespace => "create namespace",
            Op::GetNamespace => "get namespace",
            Op::RenameNamespace => "rename namespace",
            Op::DeleteNamespace => "delete namespace",
            Op::ListKeys => "list keys",
            Op::GetValue => "get",
            Op::PutValue => "put",
            Op::DeleteValue => "delete",
            Op::GetMetadata => "metadata",
            Op::BulkWrite => "bulk put",
            Op::BulkDelete => "bulk delete",
            Op::BulkGet => "bulk get",
        }
    }
}

#[derive(Default)]
pub struct Stats {
    ops: [AtomicU64; 13],
    total: AtomicU64,
    /// The latest operations in arrival order, with their namespace segment (`GET
    /// /__kvfs/log`): tests assert order, e.g. a rename's put before its delete.
    log: Mutex<VecDeque<(Op, String)>>,
}

impl Stats {
    /// Counts one /client/v4 request; `op` is None for a route that matched no operation.
    pub fn count(&self, op: Option<Op>) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Some(op) = op {
            self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends one operation to the log, dropping the oldest beyond `LOG_ENTRIES`.
    pub fn log(&self, op: Op, ns: &str) {
        let mut log = self.log.lock().unwrap();
        if log.len() == LOG_ENTRIES {
            log.pop_front();
        }
        log.push_back((op, ns.to_string()));
    }

    pub fn reset(&self) {
        for c in &self.ops {
            c.store(0, Ordering::Relaxed);
        }
        self.total.store(0, Ordering::Relaxed);
        self.log.lock().unwrap().clear();
    }

    /// `[{"op": NAME, "namespace": ID}, ...]`, oldest first; `namespace` is "" for account-level
    /// operations.
    pub fn log_snapshot(&self) -> serde_json::Value {
        let log = self.log.lock().unwrap();
        log.iter()
            .map(|(op, ns)| serde_json::json!({"op": op.name(), "namespace": ns}))
            .collect()
    }

    /// Every operation (zeros included) and `total`.
    pub fn snapshot(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for op in Op::ALL {
            m.insert(
                op.name().into(),
                self.ops[op as usize].load(Ordering::Relaxed).into(),
            );
        }
        m.insert("total".into(), self.total.load(Ordering::Relaxed).into());
        serde_json::Value::Object(m)
    }
}
