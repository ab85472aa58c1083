//! The keys of one listing, in listing order, held compactly: a listing of a namespace holds
//! every key below it, so a walk of a million keys holds a million of these entries. Names sit
//! one after another in chunks of a few hundred (one string and one end offset each, ~4 bytes
//! besides the name's), and each key's expiration and metadata only in chunks where a key has
//! some. A `BTreeMap<Box<str>, Listed>` cost ~100 bytes per key (its nodes half full when
//! built in order, and an allocation per name).

use super::remote::Listed;

/// Entries a chunk grows to before it is split in two (appending in order fills them whole).
const CHUNK: usize = 512;

/// The entry of a key with neither expiration nor metadata.
static PLAIN: Listed = Listed::PLAIN;

#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    chunks: Vec<Chunk>,
    len: usize,
}

#[derive(Debug, Clone, Default)]
struct Chunk {
    /// The names, one after another, in order.
    names: String,
    /// Where each name ends in `names`.
    ends: Vec<u32>,
    /// Each name's entry, by position; empty while every one is plain.
    listed: Vec<Listed>,
}

impl Chunk {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1] as usize
        }
    }

    fn name(&self, i: usize) -> &str {
        &self.names[self.start(i)..self.ends[i] as usize]
    }

    fn listed(&self, i: usize) -> &Listed {
        self.listed.get(i).unwrap_or(&PLAIN)
    }

    fn last(&self) -> Option<&str> {
        self.len().checked_sub(1).map(|i| self.name(i))
    }

    /// The position of `name`, or where it would go.
    fn find(&self, name: &str) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.name(mid).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    fn insert_at(&mut self, i: usize, name: &str, listed: Listed) {
        let start = self.start(i);
        let n = name.len() as u32;
        self.names.insert_str(start, name);
        for e in &mut self.ends[i..] {
            *e += n;
        }
        self.ends.insert(i, start as u32 + n);
        if self.listed.is_empty() && listed == PLAIN {
            return;
        }
        if self.listed.is_empty() {
            self.listed = vec![Listed::PLAIN; self.len() - 1];
        }
        self.listed.insert(i, listed);
    }

    fn set(&mut self, i: usize, listed: Listed) -> Listed {
        if self.listed.is_empty() {
            if listed == PLAIN {
                return Listed::PLAIN;
            }
            self.listed = vec![Listed::PLAIN; self.len()];
        }
        std::mem::replace(&mut self.listed[i], listed)
    }

    fn remove_at(&mut self, i: usize) -> Listed {
        let (start, end) = (self.start(i), self.ends[i] as usize);
        self.names.replace_range(start..end, "");
        self.ends.remove(i);
        for e in &mut self.ends[i..] {
            *e -= (end - start) as u32;
        }
        if self.listed.is_empty() {
            Listed::PLAIN
        } else {
            self.listed.remove(i)
        }
    }

    /// Moves the entries from `at` on into a new chunk.
    fn split_off(&mut self, at: usize) -> Chunk {
        let cut = self.start(at);
        let names = self.names.split_off(cut);
        let ends = self.ends.split_off(at);
        let ends = ends.into_iter().map(|e| e - cut as u32).collect();
        let listed = if self.listed.is_empty() {
            Vec::new()
        } else {
            self.listed.split_off(at)
        };
        Chunk {
            names,
            ends,
            listed,
        }
    }
}

impl KeyMap {
    pub fn new() -> KeyMap {
        KeyMap::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `name` if any does (the last one starting at or before it).
    fn chunk_of(&self, name: &str) -> usize {
        let after = self.chunks.partition_point(|c| c.name(0) <= name);
        after.saturating_sub(1)
    }

    fn position(&self, name: &str) -> Option<(usize, usize)> {
        let c = self.chunk_of(name);
        let i = self.chunks.get(c)?.find(name).ok()?;
        Some((c, i))
    }

    pub fn get(&self, name: &str) -> Option<&Listed> {
        self.position(name).map(|(c, i)| self.chunks[c].listed(i))
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Adds or replaces `name`'s entry. Names given in listing order are appended.
    pub fn insert(&mut self, name: &str, listed: Listed) -> Option<Listed> {
        let in_order = self
            .chunks
            .last()
            .is_none_or(|c| c.last().is_none_or(|l| l < name));
        if in_order {
            if self.chunks.last().is_none_or(|c| c.len() >= CHUNK) {
                self.chunks.push(Chunk::default());
            }
            let c = self.chunks.last_mut().unwrap();
            c.insert_at(c.len(), name, listed);
            self.len += 1;
            return None;
        }
        let ci = self.chunk_of(name);
        let c = &mut self.chunks[ci];
        match c.find(name) {
            Ok(i) => Some(c.set(i, listed)),
            Err(i) => {
                c.insert_at(i, name, listed);
                self.len += 1;
                if c.len() >= 2 * CHUNK {
                    let half = c.split_off(CHUNK);
                    self.chunks.insert(ci + 1, half);
                }
                None
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Listed> {
        let (c, i) = self.position(name)?;
        let listed = self.chunks[c].remove_at(i);
        if self.chunks[c].len() == 0 {
            self.chunks.remove(c);
        }
        self.len -= 1;
        Some(listed)
    }

    /// Every entry in listing order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            map: self,
            chunk: 0,
            i: 0,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// The entries from `name` on (with it, if `with`), in listing order.
    pub fn from(&self, name: &str, with: bool) -> Iter<'_> {
        let chunk = self.chunk_of(name);
        let i = match self.chunks.get(chunk).map(|c| c.find(name)) {
            Some(Ok(i)) if with => i,
            Some(Ok(i)) => i + 1,
            Some(Err(i)) => i,
            None => 0,
        };
        Iter {
            map: self,
            chunk,
            i,
        }
    }
}

/// Entries of a [`KeyMap`] in listing order.
pub struct Iter<'a> {
    map: &'a KeyMap,
    chunk: usize,
    i: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a Listed);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let c = self.map.chunks.get(self.chunk)?;
            if self.i < c.len() {
                self.i += 1;
                return Some((c.name(self.i - 1), c.listed(self.i - 1)));
            }
            self.chunk += 1;
            self.i = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn listed(e: u64) -> Listed {
        Listed::new((e != 0).then_some(e), None)
    }

    /// Random inserts, replacements and removals against a `BTreeMap`, across chunk splits.
    #[test]
    fn behaves_as_an_ordered_map() {
        let mut m = KeyMap::new();
        let mut model: BTreeMap<String, Listed> = BTreeMap::new();
        // In order first (a listing's pages), then anywhere.
        for i in 0..3000u64 {
            let k = format!("k{i:05}");
            m.insert(&k, listed(i % 7));
            model.insert(k, listed(i % 7));
        }
        let mut x: u64 = 12345;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = format!("k{:05}{}", x % 4000, if x % 3 == 0 { "/a" } else { "" });
            match x % 5 {
                0 | 1 => assert_eq!(m.remove(&k), model.remove(&k), "{k}"),
                _ => assert_eq!(
                    m.insert(&k, listed(x % 3)),
                    model.insert(k.clone(), listed(x % 3)),
                    "{k}"
                ),
            }
        }
        assert_eq!(m.len(), model.len());
        let all: Vec<(&str, &Listed)> = m.iter().collect();
        let want: Vec<(&str, &Listed)> = model.iter().map(|(k, v)| (k.as_str(), v)).collect();
        assert_eq!(all, want);
        for probe in ["k0", "k01234", "k01234/a", "k02000", "k9", ""] {
            let from: Vec<&str> = m.from(probe, true).map(|(k, _)| k).take(5).collect();
            let want: Vec<&str> = model
                .range(probe.to_string()..)
                .map(|(k, _)| k.as_str())
                .take(5)
                .collect();
            assert_eq!(from, want, "from {probe}");
            let after: Vec<&str> = m.from(probe, false).map(|(k, _)| k).take(5).collect();
            let want: Vec<&str> = model
                .range::<str, _>((std::ops::Bound::Excluded(probe), std::ops::Bound::Unbounded))
                .map(|(k, _)| k.as_str())
                .take(5)
                .collect();
            assert_eq!(after, want, "after {probe}");
            assert_eq!(m.get(probe), model.get(probe));
        }
        for k in model.keys() {
            assert!(m.contains_key(k));
        }
    }
}
