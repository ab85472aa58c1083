//! Write-back: the journal of pending changes, and how they are packed into requests.
//! The uploader that drives them lives with the filesystem core (`fs/upload.rs`).

pub mod journal;

/// Packs items of the given sizes, in order, into batches of at most `max_items` items and
/// `max_bytes` bytes. An item larger than `max_bytes` gets a batch of its own.
pub fn plan_batches(sizes: &[u64], max_items: usize, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if !cur.is_empty() && (cur.len() >= max_items || bytes + size > max_bytes) {
            batches.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(i);
        bytes += size;
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::plan_batches;

    #[test]
    fn batches_respect_count_and_bytes() {
        assert!(plan_batches(&[], 10, 100).is_empty());
        assert_eq!(
            plan_batches(&[1; 25], 10, 100),
            vec![
                (0..10).collect::<Vec<_>>(),
                (10..20).collect(),
                (20..25).collect()
            ]
        );
        assert_eq!(
            plan_batches(&[60, 60, 30, 200, 1], 10, 100),
            vec![vec![0], vec![1, 2], vec![3], vec![4]]
        );
        // 10,000 small values: one bulk write.
        assert_eq!(plan_batches(&vec![100; 10_000], 10_000, 16 << 20).len(), 1);
    }
}
