//! The read path: what the store holds, as this mount last saw it. Namespace and key listings
//! (fresh for `--metadata-ttl`), the value cache, the bulk-get lookahead, and in-flight sharing
//! so that concurrent requests for the same thing wait for one fetch.
//!
//! It knows nothing of this mount's pending changes; the core lays those over what it returns.

use super::attrs::{AttrStore, ValueHasher};
use super::names::{self, representable};
use super::{FsError, FsResult};
use crate::api::limits::{now_secs, MAX_BULK_GET_KEYS};
use crate::api::{KeyInfo, Namespace};
use crate::backend::{ErrorKind, Fetched, KeyLister, KvBackend, ValueStream};
use crate::cache::{CacheKey, CacheStats, Spill, Value, ValueCache, SPILL_BYTES};
use bytes::Bytes;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info};

/// Most keys asked for in one bulk get (the API's limit).
const LOOKAHEAD: usize = MAX_BULK_GET_KEYS;
/// Bytes of values fetched ahead of a reader and not reached by it yet, at most (estimated
/// from the values fetched so far): where values are large, fewer batches run ahead.
const AHEAD_BYTES: u64 = 32 << 20;
/// Batches fetched ahead at once when the mount does not say (`--max-requests` less one).
const DEFAULT_AHEAD: usize = 15;

/// A reader going through a namespace's listing in order (`ls -lR`, rsync, `cat *`), and the
/// bulk gets running ahead of it. Each step in order (a miss past what was fetched, or a
/// batch fetched ahead reached) doubles how many batches run ahead, up to the mount's request
/// concurrency; whenever the reader reaches a batch, the next ones start, so the fetches stay
/// ahead of it instead of draining and starting again at its next miss. A reader that jumps
/// back gets no more than its own batch.
#[derive(Default)]
struct Walk {
    /// Tells this walk from the one that replaces it while batches are being started.
    id: u64,
    /// The last key fetched for this reader: the next batch starts after it.
    frontier: String,
    /// Steps in order so far.
    run: u32,
    /// The first key of each batch fetched ahead that the reader has not reached, oldest first.
    ahead: VecDeque<String>,
    /// The directory (listing prefix) of the reader's last step.
    dir: String,
    /// Whether the reader went on from one directory into the next in listing order, as
    /// `ls -lR` and rsync do: until it has, no batch starts past the end of its directory (so
    /// `ls -l` of one directory fetches at most the rest of one batch from the next).
    crossed: bool,
    /// Set when the listing had nothing more to fetch ahead; cleared by the next step.
    done: bool,
    /// Mean size of the values of the last batch fetched, for `AHEAD_BYTES`.
    mean_len: u64,
    /// A thread is starting batches for this walk (others leave it to it).
    starting: bool,
}

impl Walk {
    /// How many batches may run ahead of the reader now.
    fn depth(&self, max_ahead: usize) -> usize {
        if self.run == 0 {
            return 0;
        }
        let grown = 1usize << (self.run - 1).min(16);
        let per_batch = self.mean_len.max(1) * LOOKAHEAD as u64;
        let by_bytes = (AHEAD_BYTES / per_batch).max(1) as usize;
        grown.min(max_ahead).min(by_bytes)
    }
}
/// Values fetched ahead, one GET each, of a reader going in order through a directory of
/// values too large to share a bulk get: its reading of one overlaps the fetching of the next.
const LARGE_AHEAD: usize = 2;

/// How long a walk may keep using one listing, in `--metadata-ttl`s from its fetch.
const MAX_WALK_TTLS: u32 = 10;

/// What a listing holds of one key; its name is the map's key, not repeated here (a listing
/// of a large namespace holds one of these per key).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listed {
    /// Seconds since the epoch; 0: none.
    expiration: u64,
    metadata: Option<Box<Json>>,
}

impl Listed {
    /// A key with neither expiration nor metadata.
    pub const PLAIN: Listed = Listed {
        expiration: 0,
        metadata: None,
    };

    pub fn new(expiration: Option<u64>, metadata: Option<Json>) -> Listed {
        Listed {
            expiration: expiration.unwrap_or(0),
            metadata: metadata.map(Box::new),
        }
    }

    pub fn expiration(&self) -> Option<u64> {
        (self.expiration != 0).then_some(self.expiration)
    }

    pub fn metadata(&self) -> Option<&Json> {
        self.metadata.as_deref()
    }

    /// The API's form of this entry, named `name`.
    pub fn info(&self, name: &str) -> KeyInfo {
        KeyInfo {
            name: name.to_string(),
            expiration: self.expiration(),
            metadata: self.metadata().cloned(),
        }
    }

    pub fn expired(&self) -> bool {
        self.expiration().is_some_and(|e| e <= now_secs())
    }
}

impl From<KeyInfo> for Listed {
    fn from(k: KeyInfo) -> Listed {
        Listed::new(k.expiration, k.metadata)
    }
}

pub use super::keymap::KeyMap;
pub type Keys = Arc<KeyMap>;

/// The keys of a listing from `start` on, in listing order.
pub fn keys_from<'a>(keys: &'a KeyMap, start: &str) -> super::keymap::Iter<'a> {
    keys.from(start, true)
}

struct Listing {
    prefix: String,
    keys: Keys,
    at: Instant,
    /// The walk through it: the furthest part read so far in listing order (a directory
    /// prefix, or a name's `path/`), and when the walk stepped there.
    front: String,
    stepped: Instant,
}

impl Listing {
    /// Whether the part `focus` of this listing may be read now as fresh; `step` says the read
    /// is of a whole directory (readdir), which is how a walk moves on: the directory read is
    /// where the walk is. For `--metadata-ttl` after its fetch, any part may be read, and any
    /// directory read is a step (a walk may start anywhere). After that, only by a walk: a
    /// directory after the last one read (in listing order) is a step, and while the last step
    /// was less than `--metadata-ttl` ago, names not yet read (after the last directory read)
    /// and the directories leading to that one may be looked up too; never once the listing
    /// is `MAX_WALK_TTLS` of them old. Anything else needs a new listing.
    fn usable(&mut self, focus: &str, step: bool, ttl: Duration, now: Instant) -> bool {
        let age = now.saturating_duration_since(self.at);
        if age >= ttl * MAX_WALK_TTLS {
            return false;
        }
        let walking = now.saturating_duration_since(self.stepped) < ttl;
        let ahead = focus > self.front.as_str();
        if step {
            // A directory read again after the TTL (`watch ls`) is no step: it lists again.
            let ok = age < ttl || (ahead && walking);
            if ok {
                self.front = focus.to_string();
                self.stepped = now;
            }
            return ok;
        }
        age < ttl || (walking && (ahead || self.front.starts_with(focus)))
    }
}

/// Guarded by `Remote::state`.
#[derive(Default)]
struct State {
    /// Key listings per namespace, by prefix; a listing covers every prefix below its own.
    listings: HashMap<String, Vec<Listing>>,
    /// The namespaces shown at the root, by directory name, and when they were listed.
    namespaces: Option<(Instant, Arc<BTreeMap<String, Namespace>>)>,
    /// Keys left out of listings because they cannot be paths, logged once each.
    hidden: HashSet<CacheKey>,
    /// Keys whose value is not UTF-8 (bulk get cannot carry them): always fetched with GET.
    binary: HashSet<CacheKey>,
    /// Directories (namespace, prefix) whose values are too large to share a bulk get.
    no_lookahead: HashSet<CacheKey>,
    /// Per namespace: the reader walking its listing, if any.
    walks: HashMap<String, Walk>,
    /// Per namespace: the last key read in a directory of large values (`read_ahead_large`).
    large_order: HashMap<String, String>,
    /// The id of the last walk started.
    next_walk: u64,
}

pub struct Remote {
    backend: Arc<dyn KvBackend>,
    cache: ValueCache,
    /// Every value fetched is observed, so mtimes follow values across runs.
    attrs: Arc<AttrStore>,
    ttl: Duration,
    state: Mutex<State>,
    flights: Arc<Flights>,
    /// `--posix-metadata`: empty-directory markers (`dir/`) are shown, so not counted hidden.
    markers: bool,
    /// Most bulk gets fetching ahead at once, all walks together: `--max-requests` less one,
    /// which the reader's own request takes.
    max_ahead: usize,
    /// Bulk gets fetching ahead now.
    ahead_in_flight: Arc<AtomicUsize>,
}

impl Remote {
    pub fn new(
        backend: Arc<dyn KvBackend>,
        cache: ValueCache,
        attrs: Arc<AttrStore>,
        ttl: Duration,
    ) -> Remote {
        Remote {
            backend,
            cache,
            attrs,
            ttl,
            state: Mutex::new(State::default()),
            flights: Arc::default(),
            markers: false,
            max_ahead: DEFAULT_AHEAD,
            ahead_in_flight: Arc::default(),
        }
    }

    /// Lets the read-ahead use up to `max_requests` requests at once, with the reader's own.
    pub fn fetching_ahead(mut self, max_requests: usize) -> Remote {
        self.max_ahead = max_requests.saturating_sub(1).max(1);
        self
    }

    /// Shows empty-directory markers (`--posix-metadata`) instead of counting them hidden.
    pub fn showing_markers(mut self, on: bool) -> Remote {
        self.markers = on;
        self
    }

    pub fn backend(&self) -> &dyn KvBackend {
        &*self.backend
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.ttl
    }

    /// Whether a value fetched at `at` is fresh (the value cache keeps std's clock).
    fn fresh_std(&self, at: std::time::Instant) -> bool {
        at.elapsed() < self.ttl
    }

    // ---- namespaces -------------------------------------------------------------------------

    /// The namespaces shown at the root, by directory name.
    pub async fn namespaces(&self) -> FsResult<Arc<BTreeMap<String, Namespace>>> {
        let _flight = self.flights.enter(("".into(), "\0namespaces".into())).await;
        {
            let st = self.state.lock().unwrap();
            if let Some((at, map)) = &st.namespaces {
                if self.fresh(*at) {
                    return Ok(map.clone());
                }
            }
        }
        let list = self.backend.list_namespaces().await?;
        let mut map = BTreeMap::new();
        for ns in list {
            // A title that cannot be a file name is shown by the namespace's id.
            let name = names::title_as_name(&ns.title)
                .unwrap_or(&ns.id)
                .to_string();
            map.insert(name, ns);
        }
        let map = Arc::new(map);
        self.state.lock().unwrap().namespaces = Some((Instant::now(), map.clone()));
        Ok(map)
    }

    /// The namespaces, if a fresh listing of them is cached.
    pub fn cached_namespaces(&self) -> Option<Arc<BTreeMap<String, Namespace>>> {
        let st = self.state.lock().unwrap();
        let (at, map) = st.namespaces.as_ref()?;
        self.fresh(*at).then(|| map.clone())
    }

    pub fn namespaces_age(&self) -> Duration {
        let st = self.state.lock().unwrap();
        st.namespaces
            .as_ref()
            .map_or(Duration::MAX, |(at, _)| at.elapsed())
    }

    pub fn forget_namespaces(&self) {
        self.state.lock().unwrap().namespaces = None;
    }

    /// Forgets everything cached of a namespace (it was deleted).
    pub fn forget_ns(&self, ns: &str) {
        self.state.lock().unwrap().listings.remove(ns);
    }

    // ---- listings ---------------------------------------------------------------------------

    /// Keys under `prefix`, from a fresh cached listing of it or of an ancestor, else fetched.
    pub async fn listing(&self, ns: &str, prefix: &str) -> FsResult<Keys> {
        self.listing_for(ns, prefix, prefix).await
    }

    /// [`listing`](Self::listing) of a directory being read whole (readdir): a walk's step
    /// (see [`Listing::usable`]).
    pub async fn listing_step(&self, ns: &str, prefix: &str) -> FsResult<Keys> {
        self.fetch_listing(ns, prefix, prefix, true).await
    }

    /// [`listing`](Self::listing) read for the part `focus` of it (a name looked up, as
    /// `prefix` + name + `/`), which a walk may read past `--metadata-ttl`.
    pub async fn listing_for(&self, ns: &str, prefix: &str, focus: &str) -> FsResult<Keys> {
        self.fetch_listing(ns, prefix, focus, false).await
    }

    async fn fetch_listing(
        &self,
        ns: &str,
        prefix: &str,
        focus: &str,
        step: bool,
    ) -> FsResult<Keys> {
        if let Some(l) = self.cached_listing_for(ns, prefix, focus, step) {
            return Ok(l);
        }
        let _flight = self
            .flights
            .enter((ns.into(), format!("\0list:{prefix}")))
            .await;
        if let Some(l) = self.cached_listing_for(ns, prefix, focus, step) {
            return Ok(l);
        }
        let mut lister = KeyLister::new(&*self.backend, ns, prefix);
        let mut keys = KeyMap::new();
        while let Some(page) = lister.next_page().await? {
            for mut k in page {
                let name = std::mem::take(&mut k.name);
                keys.insert(&name, Listed::from(k));
            }
        }
        let keys = Arc::new(keys);
        let mut st = self.state.lock().unwrap();
        for k in keys.keys() {
            let marker = self.markers && super::posix::marker_dir(k).is_some();
            if !representable(k) && !marker && st.hidden.insert((ns.to_string(), k.to_string())) {
                info!("namespace {ns}: key {k:?} cannot be shown as a path and is left out");
            }
        }
        let v = st.listings.entry(ns.to_string()).or_default();
        // A listing of `prefix` supersedes listings of prefixes below it.
        v.retain(|l| !l.prefix.starts_with(prefix));
        let now = Instant::now();
        v.push(Listing {
            prefix: prefix.to_string(),
            keys: keys.clone(),
            at: now,
            front: focus.to_string(),
            stepped: now,
        });
        // The most specific listing first: it is the freshest of those covering a part.
        v.sort_by_key(|l| std::cmp::Reverse(l.prefix.len()));
        Ok(keys)
    }

    /// A fresh listing covering `prefix`: of `prefix` itself or of an ancestor prefix.
    pub fn cached_listing(&self, ns: &str, prefix: &str) -> Option<Keys> {
        self.cached_listing_for(ns, prefix, prefix, false)
    }

    fn cached_listing_for(&self, ns: &str, prefix: &str, focus: &str, step: bool) -> Option<Keys> {
        let mut st = self.state.lock().unwrap();
        let now = Instant::now();
        let v = st.listings.get_mut(ns)?;
        // Listings no walk may use any more go, so what they hold is freed.
        let limit = self.ttl * MAX_WALK_TTLS;
        v.retain(|l| now.saturating_duration_since(l.at) < limit);
        for l in v.iter_mut() {
            if prefix.starts_with(&l.prefix) && l.usable(focus, step, self.ttl, now) {
                return Some(l.keys.clone());
            }
        }
        None
    }

    /// Keys held by cached listings, over all namespaces (for `kvfs status` and tests).
    pub fn listed_count(&self) -> usize {
        let st = self.state.lock().unwrap();
        st.listings.values().flatten().map(|l| l.keys.len()).sum()
    }

    /// The key's listing entry if it exists remotely (and has not expired).
    pub async fn key_info(&self, ns: &str, key: &str) -> FsResult<Option<KeyInfo>> {
        let listing = self.listing(ns, &parent_prefix(key)).await?;
        Ok(listing
            .get(key)
            .filter(|k| !k.expired())
            .map(|k| k.info(key)))
    }

    /// Records a key this mount wrote, in every cached listing that covers it.
    pub fn record_put(&self, ns: &str, info: KeyInfo) {
        let mut st = self.state.lock().unwrap();
        if let Some(v) = st.listings.get_mut(ns) {
            for l in v.iter_mut().filter(|l| info.name.starts_with(&l.prefix)) {
                let listed = Listed::new(info.expiration, info.metadata.clone());
                Arc::make_mut(&mut l.keys).insert(&info.name, listed);
            }
        }
    }

    /// Records a key this mount deleted (or found gone).
    pub fn record_delete(&self, ns: &str, key: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(v) = st.listings.get_mut(ns) {
            for l in v.iter_mut().filter(|l| key.starts_with(&l.prefix)) {
                if l.keys.contains_key(key) {
                    Arc::make_mut(&mut l.keys).remove(key);
                }
            }
        }
    }

    pub fn hidden_count(&self) -> usize {
        self.state.lock().unwrap().hidden.len()
    }

    // ---- values -----------------------------------------------------------------------------

    /// A cached value while it is fresh (and not expired); `count` says whether this is a hit
    /// to count (a read) or a peek.
    pub fn fresh_value(&self, ns: &str, key: &str, count: bool) -> Option<Arc<Value>> {
        let ck = (ns.to_string(), key.to_string());
        let now = now_secs();
        let v = if count {
            self.cache.get(&ck, now)
        } else {
            self.cache.peek(&ck, now)
        }?;
        self.fresh_std(v.fetched).then_some(v)
    }

    /// Any cached value of the key, fresh or not (e.g. to carry it along a rename).
    pub fn cached_value(&self, ns: &str, key: &str) -> Option<Arc<Value>> {
        self.cache.peek(&(ns.to_string(), key.to_string()), 0)
    }

    pub fn cache_value(&self, ns: &str, key: &str, bytes: Bytes, expiration: Option<u64>) {
        let _ = self
            .cache
            .insert((ns.to_string(), key.to_string()), bytes, expiration);
    }

    /// Caches a large value from the file it is in (the staging file it was uploaded from).
    pub fn cache_file(
        &self,
        ns: &str,
        key: &str,
        file: &std::fs::File,
        len: u64,
        expiration: Option<u64>,
    ) {
        let ck = (ns.to_string(), key.to_string());
        let spilled = self.cache.spill().and_then(|mut spill| {
            spill.copy_from(file, len)?;
            Ok(spill)
        });
        match spilled {
            Ok(spill) => {
                self.cache.insert_spilled(ck, spill, expiration);
            }
            // Read again when it is read.
            Err(e) => {
                debug!("caching {key:?} from its staging file: {e}");
                self.cache.remove(&ck);
            }
        }
    }

    pub fn uncache_value(&self, ns: &str, key: &str) {
        self.cache.remove(&(ns.to_string(), key.to_string()));
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The remote value of `key`, from the cache while fresh, else fetched together with the
    /// next uncached keys of the listing (one bulk get, in the order `ls -l` and rsync visit
    /// them), and, for a reader going through the listing in order, the batches after it in
    /// the background (see [`Walk`]). `local` says which keys are not to be fetched with it
    /// (this mount holds changes of them).
    pub async fn value(
        self: &Arc<Self>,
        ns: &str,
        key: &str,
        local: &(dyn Fn(&str) -> bool + Sync),
    ) -> FsResult<Arc<Value>> {
        let fresh = self.fresh_value(ns, key, true);
        // Also before waiting for a batch on its way: the ones after it start now.
        self.step(ns, key, local);
        self.read_ahead_large(ns, key, local);
        if let Some(v) = fresh {
            return Ok(v);
        }
        let ck: CacheKey = (ns.to_string(), key.to_string());
        let _flight = self.flights.enter(ck.clone()).await;
        if let Some(v) = self.fresh_value(ns, key, false) {
            return Ok(v);
        }
        let binary = self.state.lock().unwrap().binary.contains(&ck);
        let mut batch = vec![key.to_string()];
        // The other keys of the batch are in flight too: a read of one waits for this fetch.
        let mut _flights = Vec::new();
        if !binary {
            if let Some(listing) = self.lookahead_listing(ns, key).await? {
                for k in self.next_uncached(ns, &listing, key, LOOKAHEAD - 1, local) {
                    if let Some(f) = self.flights.try_enter((ns.to_string(), k.clone())) {
                        _flights.push(f);
                        batch.push(k);
                    }
                }
                self.missed(ns, key, &batch, &listing, local);
            }
        }
        if batch.len() > 1 {
            match self.backend.bulk_get(ns, &batch).await {
                Ok(values) => {
                    if self.store_fetched(ns, values)?.contains(key) {
                        self.record_delete(ns, key);
                        return Err(FsError::NotFound);
                    }
                    if let Some(v) = self.fresh_value(ns, key, false) {
                        return Ok(v);
                    }
                }
                // Over 25 MB in one answer, or any other trouble: fall back to a plain GET.
                Err(e) => {
                    debug!("bulk get of {} keys failed, using GET: {e}", batch.len());
                    self.note_bulk_get_error(ns, key, &e);
                }
            }
        }
        self.get_alone(ck).await
    }

    /// A value read alone (GET) into the cache. A large one goes from the response into a cache
    /// file piece by piece, digested as it arrives, rather than whole into memory first; a
    /// body cut off on its way is asked for again, a few times.
    async fn get_alone(&self, ck: CacheKey) -> FsResult<Arc<Value>> {
        const ATTEMPTS: usize = 3;
        let (ns, key) = (ck.0.as_str(), ck.1.as_str());
        let mut attempt = 1;
        let (got, expiration) = loop {
            let mut stream = match self.backend.get_value_stream(ns, key).await {
                Err(e) if e.kind == ErrorKind::NotFound => {
                    self.record_delete(ns, key);
                    return Err(FsError::NotFound);
                }
                other => other?,
            };
            match self.receive(&mut stream).await {
                Ok(got) => break (got, stream.expiration),
                Err(FsError::Backend(e))
                    if e.kind == ErrorKind::Unavailable && attempt < ATTEMPTS =>
                {
                    debug!("{e}; asking again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(match got {
            Got::Spilled(spill, value) => {
                self.attrs.observe_digest(ns, key, value, || spill.bytes());
                self.cache.insert_spilled(ck, spill, expiration)
            }
            Got::Whole(bytes) => {
                self.attrs.observe(ns, key, &bytes, false);
                self.cache.insert(ck, bytes, expiration)?
            }
        })
    }

    /// The value's pieces: into a cache file (with their digest) when the store announced a
    /// large value, else joined in memory.
    async fn receive(&self, stream: &mut ValueStream) -> FsResult<Got> {
        if stream.len.is_some_and(|n| n > SPILL_BYTES as u64) {
            let mut spill = self.cache.spill()?;
            let mut digest = Box::new(ValueHasher::default());
            while let Some(chunk) = stream.next_chunk().await? {
                digest.update(&chunk);
                spill.write(&chunk)?;
            }
            return Ok(Got::Spilled(spill, digest.finish()));
        }
        let mut pieces: Vec<Bytes> = Vec::new();
        while let Some(chunk) = stream.next_chunk().await? {
            pieces.push(chunk);
        }
        Ok(Got::Whole(match pieces.len() {
            1 => pieces.pop().unwrap_or_default(),
            _ => Bytes::from(pieces.concat()),
        }))
    }

    /// In a directory of large values (each read with its own GET), a reader going through the
    /// listing in order, hits included, gets the next `LARGE_AHEAD` values fetched in the
    /// background, so that reading one overlaps fetching the next (as a walk's bulk gets do).
    /// Their flights are entered first: a read of one waits for its fetch instead of asking
    /// again. Only a cached listing is used: a hit must cost no request.
    fn read_ahead_large(
        self: &Arc<Self>,
        ns: &str,
        key: &str,
        local: &(dyn Fn(&str) -> bool + Sync),
    ) {
        let prefix = parent_prefix(key);
        let in_order = {
            let mut st = self.state.lock().unwrap();
            if !st.no_lookahead.contains(&(ns.to_string(), prefix.clone())) {
                return;
            }
            let last = st.large_order.entry(ns.to_string()).or_default();
            let in_order = !last.is_empty() && key > last.as_str();
            *last = key.to_string();
            in_order
        };
        let Some(listing) = in_order.then(|| self.cached_listing(ns, &prefix)).flatten() else {
            return;
        };
        let now = now_secs();
        let next = listing
            .from(key, false)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, info)| {
                parent_prefix(k) == prefix && !info.expired() && representable(k) && !local(k)
            })
            .take(LARGE_AHEAD);
        for (k, _) in next {
            let ck = (ns.to_string(), k.to_string());
            let cached = self
                .cache
                .peek(&ck, now)
                .is_some_and(|v| self.fresh_std(v.fetched));
            if cached || self.state.lock().unwrap().binary.contains(&ck) {
                continue;
            }
            let Some(flight) = self.flights.try_enter(ck.clone()) else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.get_alone(ck).await {
                    debug!("read-ahead of a large value: {e}");
                }
                drop(flight);
            });
        }
    }

    /// The value of `key` if it is at hand without a request of its own: cached and fresh,
    /// or on its way in a fetch already running (then waited for). A lookup asks this for the
    /// size, and it counts as a step of a reader walking the listing, as a read does.
    pub async fn value_at_hand(
        self: &Arc<Self>,
        ns: &str,
        key: &str,
        local: &(dyn Fn(&str) -> bool + Sync),
    ) -> Option<Arc<Value>> {
        let fresh = self.fresh_value(ns, key, false);
        let ck: CacheKey = (ns.to_string(), key.to_string());
        if fresh.is_none() && !self.flights.busy(&ck) {
            return None;
        }
        self.step(ns, key, local);
        if fresh.is_some() {
            return fresh;
        }
        drop(self.flights.enter(ck).await);
        self.fresh_value(ns, key, false)
    }

    /// Caches what a bulk get brought; returns the keys it found missing.
    fn store_fetched(
        &self,
        ns: &str,
        values: HashMap<String, Fetched>,
    ) -> FsResult<HashSet<String>> {
        let mut missing = HashSet::new();
        let (mut bytes_seen, mut values_seen) = (0u64, 0u64);
        let mut found = Vec::with_capacity(values.len());
        for (k, v) in values {
            match v {
                Fetched::Missing => {
                    missing.insert(k);
                }
                // Read alone, with GET, when it is read.
                Fetched::FetchAlone => {
                    self.state
                        .lock()
                        .unwrap()
                        .binary
                        .insert((ns.to_string(), k));
                }
                Fetched::Value {
                    bytes, expiration, ..
                } => {
                    bytes_seen += bytes.len() as u64;
                    values_seen += 1;
                    found.push((k, bytes, expiration));
                }
            }
        }
        self.attrs
            .observe_all(ns, found.iter().map(|(k, b, _)| (k.as_str(), &b[..])));
        for (k, bytes, expiration) in found {
            self.cache
                .insert((ns.to_string(), k), bytes, expiration)
                .map_err(FsError::from)?;
        }
        if let Some(mean) = bytes_seen.checked_div(values_seen) {
            if let Some(w) = self.state.lock().unwrap().walks.get_mut(ns) {
                w.mean_len = mean;
            }
        }
        Ok(missing)
    }

    fn note_bulk_get_error(&self, ns: &str, key: &str, e: &crate::backend::BackendError) {
        if e.kind == ErrorKind::TooLarge {
            // Values here are large: one GET each costs less than a refused bulk get.
            let dir = (ns.to_string(), parent_prefix(key));
            let mut st = self.state.lock().unwrap();
            st.no_lookahead.insert(dir);
            // The reader is at `key`: its next key is a step in order.
            st.large_order.insert(ns.to_string(), key.to_string());
        }
    }

    /// The listing to fetch ahead in for a miss of `key`, unless its directory's values are
    /// too large to share a bulk get.
    async fn lookahead_listing(&self, ns: &str, key: &str) -> FsResult<Option<Keys>> {
        let prefix = parent_prefix(key);
        let large = self
            .state
            .lock()
            .unwrap()
            .no_lookahead
            .contains(&(ns.to_string(), prefix.clone()));
        if large {
            return Ok(None);
        }
        Ok(Some(self.listing(ns, &prefix).await?))
    }

    /// Up to `n` keys after `after` in listing order that a bulk get may fetch: live, shown as
    /// paths, not cached, not being fetched, not binary, not in a directory of large values,
    /// and without local changes. Listing order crosses into the next directories, as
    /// `ls -lR` and rsync go on.
    fn next_uncached(
        &self,
        ns: &str,
        listing: &Keys,
        after: &str,
        n: usize,
        local: &(dyn Fn(&str) -> bool + Sync),
    ) -> Vec<String> {
        let now = now_secs();
        let mut out = Vec::new();
        for (k, info) in listing.from(after, false) {
            if out.len() >= n {
                break;
            }
            if info.expired() || !representable(k) {
                continue;
            }
            let ck = (ns.to_string(), k.to_string());
            if self
                .cache
                .peek(&ck, now)
                .is_some_and(|v| self.fresh_std(v.fetched))
                || self.flights.busy(&ck)
            {
                continue;
            }
            {
                let st = self.state.lock().unwrap();
                let large = st
                    .no_lookahead
                    .contains(&(ns.to_string(), parent_prefix(k)));
                if st.binary.contains(&ck) || large {
                    continue;
                }
            }
            if local(k) {
                continue;
            }
            out.push(k.to_string());
        }
        out
    }

    /// A miss of `key`, fetched now in `batch`. A miss past what the namespace's walk fetched
    /// is a step in order; any other starts a new walk. Then the batches after `batch` start,
    /// as many as the walk has earned.
    fn missed(
        self: &Arc<Self>,
        ns: &str,
        key: &str,
        batch: &[String],
        listing: &Keys,
        local: &(dyn Fn(&str) -> bool + Sync),
    ) {
        let dir = parent_dir(key);
        {
            let mut st = self.state.lock().unwrap();
            st.next_walk += 1;
            let id = st.next_walk;
            let w = st.walks.entry(ns.to_string()).or_default();
            if !w.frontier.is_empty() && key > w.frontier.as_str() {
                w.run += 1;
                // Every batch ahead starts at or before the frontier: all are behind the reader.
                w.ahead.clear();
                if dir != w.dir {
                    w.crossed = true;
                    w.dir = dir.to_string();
                }
            } else {
                *w = Walk {
                    id,
                    dir: dir.to_string(),
                    ..Walk::default()
                };
            }
            w.frontier = batch.last().cloned().unwrap_or_default();
            w.done = false;
        }
        self.fetch_ahead(ns, listing, local);
    }

    /// Notes that the reader walking `ns` got to `key` (a read, or a lookup with the value at
    /// hand): reaching a batch fetched ahead, or going on into the next directory, starts the
    /// batches after. Cheap when there is nothing to start: it is called for every read.
    fn step(self: &Arc<Self>, ns: &str, key: &str, local: &(dyn Fn(&str) -> bool + Sync)) {
        let dir = parent_dir(key);
        {
            let mut st = self.state.lock().unwrap();
            let Some(w) = st.walks.get_mut(ns) else {
                return;
            };
            // Past the frontier is a miss (`missed` decides); a walk of one miss has no ahead.
            if w.run == 0 || key > w.frontier.as_str() {
                return;
            }
            let mut moved = false;
            while w.ahead.front().is_some_and(|first| key >= first.as_str()) {
                w.ahead.pop_front();
                moved = true;
            }
            if moved {
                w.run += 1;
            }
            if dir != w.dir {
                if dir > w.dir.as_str() {
                    w.crossed = true;
                }
                w.dir = dir.to_string();
                moved = true;
            }
            if moved {
                w.done = false;
            }
            if w.done
                || w.starting
                || w.ahead.len() >= w.depth(self.max_ahead)
                || self.ahead_in_flight.load(Ordering::Relaxed) >= self.max_ahead
            {
                return;
            }
        }
        if let Some(listing) = self.cached_listing(ns, dir) {
            self.fetch_ahead(ns, &listing, local);
        }
    }

    /// Starts bulk gets after the walk's frontier in the background until as many batches as
    /// its depth run ahead of the reader (and no more than `max_ahead` of all walks are in
    /// flight). Their keys are marked in flight first, so a read of one waits for its batch
    /// instead of asking again, and request counts stay those of a walk.
    fn fetch_ahead(
        self: &Arc<Self>,
        ns: &str,
        listing: &Keys,
        local: &(dyn Fn(&str) -> bool + Sync),
    ) {
        let id = {
            let mut st = self.state.lock().unwrap();
            match st.walks.get_mut(ns) {
                Some(w) if !w.starting => {
                    w.starting = true;
                    w.id
                }
                _ => return,
            }
        };
        loop {
            let (after, dir, crossed) = {
                let st = self.state.lock().unwrap();
                let Some(w) = st.walks.get(ns).filter(|w| w.id == id) else {
                    return;
                };
                let room = w.ahead.len() < w.depth(self.max_ahead)
                    && self.ahead_in_flight.load(Ordering::Relaxed) < self.max_ahead;
                if !room {
                    break;
                }
                (w.frontier.clone(), w.dir.clone(), w.crossed)
            };
            let keys = self.next_uncached(ns, listing, &after, LOOKAHEAD, local);
            let (Some(first), Some(last)) = (keys.first().cloned(), keys.last().cloned()) else {
                self.walk_done(ns, id);
                break;
            };
            if !crossed && !first.starts_with(&dir) {
                self.walk_done(ns, id);
                break;
            }
            let flights: Vec<Flight> = keys
                .iter()
                .filter_map(|k| self.flights.try_enter((ns.to_string(), k.clone())))
                .collect();
            {
                let mut st = self.state.lock().unwrap();
                let Some(w) = st.walks.get_mut(ns).filter(|w| w.id == id) else {
                    return;
                };
                w.frontier = last;
                if !flights.is_empty() {
                    w.ahead.push_back(first);
                }
            }
            if flights.is_empty() {
                continue;
            }
            let keys: Vec<String> = flights.iter().map(|f| f.key.1.clone()).collect();
            self.ahead_in_flight.fetch_add(1, Ordering::Relaxed);
            let (me, ns) = (self.clone(), ns.to_string());
            tokio::spawn(async move {
                match me.backend.bulk_get(&ns, &keys).await {
                    Ok(values) => {
                        if let Err(e) = me.store_fetched(&ns, values) {
                            debug!("read-ahead of {} keys: {e}", keys.len());
                        }
                    }
                    Err(e) => {
                        debug!("read-ahead of {} keys failed: {e}", keys.len());
                        me.note_bulk_get_error(&ns, &keys[0], &e);
                    }
                }
                me.ahead_in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(flights);
            });
        }
        let mut st = self.state.lock().unwrap();
        if let Some(w) = st.walks.get_mut(ns).filter(|w| w.id == id) {
            w.starting = false;
        }
    }

    /// The walk `id` of `ns` found nothing more to fetch ahead until its reader's next step.
    fn walk_done(&self, ns: &str, id: u64) {
        let mut st = self.state.lock().unwrap();
        if let Some(w) = st.walks.get_mut(ns).filter(|w| w.id == id) {
            w.done = true;
            w.starting = false;
        }
    }
}

/// A value read alone, as received.
enum Got {
    /// In a cache file, with its (value digest, size).
    Spilled(Spill, (u64, u64)),
    Whole(Bytes),
}

/// The listing prefix of the directory holding `key`.
pub fn parent_prefix(key: &str) -> String {
    parent_dir(key).to_string()
}

/// [`parent_prefix`], borrowed.
fn parent_dir(key: &str) -> &str {
    key.rfind('/').map_or("", |i| &key[..=i])
}

/// Per-key async locks, so concurrent requests for the same thing wait for one fetch.
#[derive(Default)]
struct Flights {
    map: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// A fetch in flight: held while it runs; others asking for the same key wait for it.
struct Flight {
    flights: Arc<Flights>,
    key: CacheKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Flights {
    async fn enter(self: &Arc<Self>, key: CacheKey) -> Flight {
        let lock = self.lock_of(&key);
        let guard = lock.clone().lock_owned().await;
        Flight {
            flights: self.clone(),
            key,
            lock,
            _guard: guard,
        }
    }

    /// The flight of `key` if nobody fetches it now.
    fn try_enter(self: &Arc<Self>, key: CacheKey) -> Option<Flight> {
        let lock = self.lock_of(&key);
        let guard = lock.clone().try_lock_owned().ok()?;
        Some(Flight {
            flights: self.clone(),
            key,
            lock,
            _guard: guard,
        })
    }

    fn lock_of(&self, key: &CacheKey) -> Arc<tokio::sync::Mutex<()>> {
        self.map
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Whether a fetch of `key` is in flight.
    fn busy(&self, key: &CacheKey) -> bool {
        self.map.lock().unwrap().contains_key(key)
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock().unwrap();
        // Only the map, this flight and its guard hold it: nobody waits, so the entry can go.
        if Arc::strong_count(&self.lock) == 3 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> CacheKey {
        ("ns".into(), k.into())
    }

    #[tokio::test]
    async fn a_flight_is_busy_while_held_and_forgotten_after() {
        let flights = Arc::new(Flights::default());
        let f = flights.enter(key("a")).await;
        assert!(flights.busy(&key("a")));
        assert!(flights.try_enter(key("a")).is_none());
        let waiter = {
            let flights = flights.clone();
            tokio::spawn(async move { drop(flights.enter(key("a")).await) })
        };
        tokio::task::yield_now().await;
        drop(f);
        waiter.await.unwrap();
        // Nobody holds or waits: the entry is gone, so memory does not grow per key fetched.
        assert!(!flights.busy(&key("a")));
        assert!(flights.map.lock().unwrap().is_empty());
        let g = flights.try_enter(key("b")).unwrap();
        drop(g);
        assert!(flights.map.lock().unwrap().is_empty());
    }
}
