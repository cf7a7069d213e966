//! The storage engine: volumes in pools and memory, staged and published on this node.
//!
//! Every mutating operation is idempotent and crash-safe:
//! - the kernel object (subvolume, image, mount, loop device) is made first and the journal
//!   record is committed after it, before the caller answers; a crash in between leaves an
//!   object without a record, which [`crate::reconcile`] removes at the next start;
//! - deletion marks the record `Deleting` first, so a crash halfway is finished later;
//! - one operation at a time per volume: a second one gets [`EngineError::Aborted`], while
//!   concurrent creates of one name wait for each other and all return the same volume.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_host::{
    FileSystem, HostError, HostOps, LoopDevice, LoopOptions, MountRequest, MountSource, TargetKind, magic,
};

use crate::crash;
use crate::id::{self, VolumeId};
use crate::journal::{
    ContentSource, Journal, JournalError, PublishRecord, Records, StageRecord, VolumeRecord, VolumeState,
};
use crate::pool::{Pool, PoolError};
use crate::spares::{Spare, Spares};
use crate::spec::{self, AccessType, Capability, CapacityRange, Kind};

/// Errors, each meaning one thing to a client (mapped to a gRPC code in one place).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl From<spec::SpecError> for EngineError {
    fn from(e: spec::SpecError) -> Self {
        match e {
            spec::SpecError::Invalid { field, message } => EngineError::Invalid { field, message },
            spec::SpecError::OutOfRange(m) => EngineError::OutOfRange(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> EngineError {
    EngineError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// How to run the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Absolute, canonical data directory.
    pub data_dir: PathBuf,
    pub node_id: String,
    /// Extra pools: name and path. The default pool lives under the data dir.
    pub pools: Vec<(String, PathBuf)>,
    /// Size of a pool image Berth creates (default: half the free space, at most 100 GiB).
    pub pool_image_size: Option<u64>,
    /// Memory all tmpfs volumes may take together (default: the size of /dev/shm).
    pub tmpfs_budget: Option<u64>,
    /// Advertised in NodeGetInfo (0 = no limit).
    pub max_volumes_per_node: i64,
    /// Empty subvolumes each pool keeps ready for dir CreateVolume (see `spares.rs`); 0 makes
    /// every create make its own. [`DEFAULT_SPARE_SUBVOLUMES`] unless configured.
    pub spare_subvolumes: usize,
}

/// Spare subvolumes per pool by default: enough for a short burst of creates; the thread
/// refills in the pauses between creates, at about 0.15 ms a spare.
pub const DEFAULT_SPARE_SUBVOLUMES: usize = 4;

/// A CreateVolume, decoded.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub name: String,
    pub parameters: BTreeMap<String, String>,
    /// mutable_parameters (VolumeAttributesClass), applied at creation.
    pub mutable: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    pub range: CapacityRange,
    pub source: Option<ContentSource>,
}

/// Where a restore or clone copies from (see `snapshot.rs`).
#[derive(Clone, Debug)]
pub struct CreateRequestOrigin {
    pub kind: Kind,
    pub fs: Option<FileSystem>,
    /// Pool of the source; empty for tmpfs.
    pub pool: String,
    /// Size of the source: the smallest volume made from it.
    pub size: u64,
    /// Subvolume, image file or directory to copy.
    pub path: PathBuf,
    /// Mount to freeze while copying.
    pub freeze: Option<PathBuf>,
}

/// The name of the pool Berth makes under its data dir.
pub const DEFAULT_POOL: &str = "default";

/// A busy unmount is tried again after 5, 10, 20, 40 and 80 ms (155 ms in all), then refused.
const BUSY_FIRST_DELAY: Duration = Duration::from_millis(5);
const BUSY_LAST_DELAY: Duration = Duration::from_millis(80);

/// Usage of a volume as NodeGetVolumeStats reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub total_bytes: u64,
    pub used_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    /// (total, used, free) inodes, where the filesystem has a fixed inode table.
    pub inodes: Option<(u64, u64, u64)>,
    pub condition: Condition,
}

/// Whether a volume is healthy; `message` says what is wrong when it is not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    fn bad(message: String) -> Self {
        Condition {
            abnormal: true,
            message,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) records: Records,
    pub(crate) names: HashMap<String, VolumeId>,
}

/// The engine. Cheap to share behind an `Arc`; every method blocks (run it off the reactor).
#[derive(Debug)]
pub struct Engine {
    pub(crate) host: Arc<dyn HostOps>,
    pub(crate) cfg: EngineConfig,
    pub(crate) pools: BTreeMap<String, Pool>,
    pub(crate) journal: Journal,
    pub(crate) state: Mutex<State>,
    busy: Mutex<HashSet<String>>,
    idle: Condvar,
    tmpfs_budget: u64,
    pub(crate) spares: Spares,
}

impl Drop for Engine {
    /// Stops the spare thread and removes the spares nobody took: a stopped Berth leaves no
    /// subvolume that no record owns.
    fn drop(&mut self) {
        for (pool, spare) in self.spares.stop() {
            self.discard_spare(&pool, &spare);
        }
    }
}

/// Marks a key busy until dropped.
pub(crate) struct Busy<'a> {
    engine: &'a Engine,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.engine.busy);
        busy.remove(&self.key);
        self.engine.idle.notify_all();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Engine {
    /// Opens pools and journal, reconciles records with the kernel, then starts making spare
    /// subvolumes.
    pub fn open(host: Arc<dyn HostOps>, cfg: EngineConfig) -> Result<Engine> {
        let engine = Self::open_without_spare_thread(host, cfg)?;
        engine.spares.start();
        Ok(engine)
    }

    /// [`Engine::open`] without the thread that makes spares: for tests, which make them with
    /// `spares.top_up()` where the order of host calls must be fixed.
    pub(crate) fn open_without_spare_thread(host: Arc<dyn HostOps>, cfg: EngineConfig) -> Result<Engine> {
        host.create_dir_all(&cfg.data_dir, 0o700)?;
        for dir in ["tmpfs", "staged"] {
            host.create_dir_all(&cfg.data_dir.join(dir), 0o700)?;
        }
        let journal = Journal::open(&cfg.data_dir.join("journal.redb"))?;
        let mut pools = BTreeMap::new();
        let default_path = cfg.data_dir.join("pools").join(DEFAULT_POOL);
        let all = std::iter::once((DEFAULT_POOL.to_owned(), default_path)).chain(cfg.pools.iter().cloned());
        for (name, path) in all {
            if pools.contains_key(&name) {
                return Err(invalid("pool", format!("pool {name:?} is configured twice")));
            }
            let pool = Pool::open(host.as_ref(), &name, &path, cfg.pool_image_size)?;
            tracing::info!(pool = %name, root = %pool.root.display(), "pool ready");
            pools.insert(name, pool);
        }
        let tmpfs_budget = match cfg.tmpfs_budget {
            Some(b) => b,
            None => host
                .statfs(Path::new("/dev/shm"))
                .map(|s| s.total_bytes)
                .unwrap_or(1 << 30),
        };
        let records = journal.load()?;
        let names = records
            .volumes
            .values()
            .map(|v| (v.name.clone(), v.id.clone()))
            .collect();
        let spares = Spares::new(host.clone(), pools.values().cloned().collect(), cfg.spare_subvolumes);
        let engine = Engine {
            host,
            cfg,
            pools,
            journal,
            state: Mutex::new(State { records, names }),
            busy: Mutex::new(HashSet::new()),
            idle: Condvar::new(),
            tmpfs_budget,
            spares,
        };
        engine.reconcile()?;
        Ok(engine)
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    pub fn max_volumes_per_node(&self) -> i64 {
        self.cfg.max_volumes_per_node
    }

    pub fn default_pool(&self) -> &str {
        DEFAULT_POOL
    }

    pub fn records(&self) -> Records {
        lock(&self.state).records.clone()
    }

    /// Claims `key` for one operation, or answers ABORTED if another one holds it.
    pub(crate) fn try_busy(&self, key: &str) -> Result<Busy<'_>> {
        let mut busy = lock(&self.busy);
        if !busy.insert(key.to_owned()) {
            return Err(EngineError::Aborted(format!(
                "an operation on {key} is already in progress; retry"
            )));
        }
        Ok(Busy {
            engine: self,
            key: key.to_owned(),
        })
    }

    /// Claims `key`, waiting for an operation that holds it to end.
    pub(crate) fn wait_busy(&self, key: &str) -> Busy<'_> {
        let mut busy = lock(&self.busy);
        while busy.contains(key) {
            busy = self.idle.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.insert(key.to_owned());
        Busy {
            engine: self,
            key: key.to_owned(),
        }
    }

    pub(crate) fn pool(&self, name: &str) -> Result<&Pool> {
        self.pools.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
            invalid(
                "parameters.pool",
                format!("no pool named {name:?}; pools are {known:?}"),
            )
        })
    }

    pub(crate) fn tmpfs_path(&self, id: &VolumeId) -> PathBuf {
        self.cfg.data_dir.join("tmpfs").join(id.as_str())
    }

    pub(crate) fn staged_path(&self, id: &VolumeId) -> PathBuf {
        self.cfg.data_dir.join("staged").join(id.as_str())
    }

    /// Looks up a volume by a client-supplied id.
    pub fn volume(&self, id: &str) -> Result<VolumeRecord> {
        id::check_client_id(id).map_err(|e| invalid("volume_id", e.to_string()))?;
        VolumeId::parse(id)
            .and_then(|id| lock(&self.state).records.volumes.get(&id).cloned())
            .filter(|v| v.state == VolumeState::Ready)
            .ok_or_else(|| EngineError::NotFound(format!("volume {id} does not exist")))
    }

    /// Sets the qgroup limit of a subvolume just made (or moved into place) for `id`; on failure
    /// removes the subvolume again so a failed create leaves nothing behind.
    pub(crate) fn limit_new_subvolume(&self, pool: &Pool, id: &VolumeId, sub: u64, capacity: u64) -> Result<()> {
        if let Err(e) = self.host.btrfs_qgroup_limit(&pool.root, sub, Some(capacity)) {
            if let Err(undo) = self.remove_subvolume(pool, &pool.volumes_dir(), id.as_str(), Some(sub)) {
                tracing::warn!(error = %undo, "could not remove the subvolume of a failed create; the next start will");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Looks up a volume by its CreateVolume name.
    pub fn volume_by_name(&self, name: &str) -> Option<VolumeRecord> {
        let state = lock(&self.state);
        state
            .names
            .get(name)
            .and_then(|id| state.records.volumes.get(id))
            .filter(|v| v.state == VolumeState::Ready)
            .cloned()
    }

    /// Whether a volume is staged (and where).
    pub fn staging_path(&self, id: &VolumeId) -> Option<PathBuf> {
        lock(&self.state).records.stages.get(id).map(|s| s.staging_path.clone())
    }

    /// The data directory this engine owns.
    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    /// Volumes in id order after `start_after`, at most `max` (0 = all), and the next token.
    pub fn list_volumes(&self, start_after: Option<&str>, max: usize) -> Result<(Vec<VolumeRecord>, Option<String>)> {
        let after =
            match start_after {
                None | Some("") => None,
                Some(t) => Some(VolumeId::parse(t).ok_or_else(|| {
                    EngineError::Aborted(format!("starting_token {t:?} was not issued by this driver"))
                })?),
            };
        let state = lock(&self.state);
        let mut out: Vec<VolumeRecord> = state
            .records
            .volumes
            .values()
            .filter(|v| v.state == VolumeState::Ready)
            .filter(|v| after.as_ref().is_none_or(|a| &v.id > a))
            .take(if max == 0 { usize::MAX } else { max + 1 })
            .cloned()
            .collect();
        let next = if max != 0 && out.len() > max {
            out.truncate(max);
            out.last().map(|v| v.id.to_string())
        } else {
            None
        };
        Ok((out, next))
    }

    /// The volume recorded as published at `target`, if any.
    fn publisher_at(&self, target: &Path) -> Option<VolumeId> {
        lock(&self.state)
            .records
            .publishes
            .keys()
            .find(|(_, t)| t == target)
            .map(|(v, _)| v.clone())
    }

    /// Targets where a volume is published.
    pub fn published_targets(&self, id: &VolumeId) -> Vec<PathBuf> {
        lock(&self.state)
            .records
            .publishes
            .keys()
            .filter(|(v, _)| v == id)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Free bytes for new volumes of `kind` in `pool`, and the largest single volume.
    pub fn capacity(&self, kind: Kind, pool: Option<&str>) -> Result<(u64, u64)> {
        if kind == Kind::Tmpfs {
            let used: u64 = lock(&self.state)
                .records
                .volumes
                .values()
                .filter(|v| v.kind == Kind::Tmpfs)
                .map(|v| v.capacity)
                .sum();
            let free = self.tmpfs_budget.saturating_sub(used);
            return Ok((free, free));
        }
        let pool = self.pool(pool.unwrap_or(DEFAULT_POOL))?;
        let stats = pool.stats(self.host.as_ref())?;
        Ok((stats.available_bytes, stats.available_bytes))
    }

    /// CreateVolume of an empty volume: idempotent by name.
    pub fn create_volume(
        &self,
        name: &str,
        parameters: BTreeMap<String, String>,
        capabilities: Vec<Capability>,
        range: CapacityRange,
    ) -> Result<VolumeRecord> {
        self.create(CreateRequest {
            name: name.to_owned(),
            parameters,
            mutable: BTreeMap::new(),
            capabilities,
            range,
            source: None,
        })
    }

    /// CreateVolume: idempotent by name; restores a snapshot or clones a volume when asked.
    pub fn create(&self, req: CreateRequest) -> Result<VolumeRecord> {
        let CreateRequest {
            name,
            parameters,
            mutable,
            capabilities,
            range,
            source,
        } = req;
        let name = name.as_str();
        id::check_name(name).map_err(|e| invalid("name", e.to_string()))?;
        let origin = match &source {
            Some(src) => Some(self.origin(src)?),
            None => None,
        };
        // A restore or clone lands in its source's pool unless the request names one.
        let default_pool = origin.as_ref().map_or(DEFAULT_POOL, |o| o.pool.as_str());
        let default_pool = if default_pool.is_empty() {
            DEFAULT_POOL
        } else {
            default_pool
        };
        let mut spec = spec::resolve(&parameters, &capabilities, range, default_pool)?;
        spec::check_mutable(spec.kind, &mutable)?;
        if let Some(o) = &origin {
            if o.kind != spec.kind || o.fs != spec.fs {
                return Err(invalid(
                    "volume_content_source",
                    format!(
                        "the source is a kind={} volume{}; a volume made from it must be the same kind{}",
                        o.kind.as_str(),
                        o.fs.map(|f| format!(" with {}", f.as_str())).unwrap_or_default(),
                        if o.fs.is_some() { " and filesystem" } else { "" }
                    ),
                ));
            }
            if spec.kind != Kind::Tmpfs && o.pool != spec.pool {
                return Err(invalid(
                    "parameters.pool",
                    format!(
                        "the source lives in pool {:?}; a restore or clone stays in its pool",
                        o.pool
                    ),
                ));
            }
            if spec.capacity < o.size {
                if range.limit != 0 && range.limit < o.size {
                    return Err(EngineError::OutOfRange(format!(
                        "the source holds {} bytes; limit_bytes {} is smaller",
                        o.size, range.limit
                    )));
                }
                spec.capacity = o.size;
            }
        }
        let _busy = self.wait_busy(&format!("name:{name}"));

        let existing = {
            let state = lock(&self.state);
            state
                .names
                .get(name)
                .and_then(|id| state.records.volumes.get(id))
                .cloned()
        };
        if let Some(rec) = existing {
            if rec.source != source {
                return Err(EngineError::AlreadyExists(format!(
                    "volume {name:?} already exists ({}) with another content source",
                    rec.id
                )));
            }
            return self.existing_matches(rec, &spec, &parameters, range);
        }

        self.check_room(&spec)?;
        let id = VolumeId::generate()
            .map_err(|e| EngineError::Host(HostError::io("getrandom", "", std::io::Error::other(e.to_string()))))?;
        let span = tracing::info_span!("create_volume", volume_id = %id, name, kind = spec.kind.as_str());
        let _enter = span.enter();
        // No spare is made while this create runs, journal commit included (spares.rs).
        let _hold = self.spares.hold();
        let subvolume_id = match &origin {
            None => self.make_empty(&id, &spec)?,
            Some(o) => self.make_from(&id, &spec, o)?,
        };
        let mut rec = VolumeRecord {
            id: id.clone(),
            name: name.to_owned(),
            kind: spec.kind,
            pool: spec.pool,
            fs: spec.fs,
            capacity: spec.capacity,
            parameters,
            capabilities,
            subvolume_id,
            state: VolumeState::Ready,
            created_unix: now_unix(),
            source,
            mutable: BTreeMap::new(),
            grow_fs_on_stage: origin.as_ref().is_some_and(|o| o.size < spec.capacity) && spec.kind == Kind::Fs,
        };
        self.apply_mutable(&rec, &mutable)?;
        rec.mutable = mutable;
        crash::point("create_volume.after_backend");
        self.journal.put_volume(&rec)?;
        crash::point("create_volume.after_journal");
        let mut state = lock(&self.state);
        state.names.insert(name.to_owned(), id.clone());
        state.records.volumes.insert(id, rec.clone());
        tracing::info!(capacity = rec.capacity, "volume created");
        Ok(rec)
    }

    /// Makes the backend of an empty volume; returns the subvolume id of a dir volume.
    fn make_empty(&self, id: &VolumeId, spec: &spec::VolumeSpec) -> Result<Option<u64>> {
        Ok(match spec.kind {
            Kind::Dir => {
                let pool = self.pool(&spec.pool)?;
                if let Some(sub) = self.place_spare(pool, id) {
                    crash::point("create_volume.after_spare_rename");
                    // Already NOCOW (spares.rs); only the limit is the volume's own.
                    self.limit_new_subvolume(pool, id, sub, spec.capacity)?;
                    return Ok(Some(sub));
                }
                let sub = self.host.btrfs_subvolume_create(&pool.volumes_dir(), id.as_str())?;
                self.limit_new_subvolume(pool, id, sub, spec.capacity)?;
                // Files made in the volume overwrite in place. With copy-on-write, a random
                // overwrite leaves the rest of the old extent referenced ("bookend" extents) and
                // the qgroup counts both: a 32 MiB file rewritten at random fills a 64 MiB
                // limit. A `compression` parameter turns copy-on-write back on (apply_mutable).
                self.host.set_nocow(&pool.subvolume_path(id), true)?;
                Some(sub)
            }
            Kind::Fs | Kind::Block => {
                let pool = self.pool(&spec.pool)?;
                self.host.create_image(&pool.image_path(id), spec.capacity, true)?;
                None
            }
            Kind::Tmpfs => {
                self.mount_tmpfs(id, spec.capacity)?;
                None
            }
        })
    }

    /// Moves a ready spare of `pool` to `volumes/<id>` and returns its subvolume id; `None` when
    /// no spare is ready or the move failed (the caller then makes the subvolume itself).
    fn place_spare(&self, pool: &Pool, id: &VolumeId) -> Option<u64> {
        let spare = self.spares.take(&pool.name)?;
        match self
            .host
            .btrfs_subvolume_rename(&pool.spares_dir(), &spare.name, &pool.volumes_dir(), id.as_str())
        {
            Ok(()) => Some(spare.subvolume_id),
            Err(e) => {
                tracing::warn!(error = %e, spare = %spare.name, "could not move a spare subvolume into place; making one");
                self.discard_spare(&pool.name, &spare);
                None
            }
        }
    }

    /// Removes a spare nobody will take. A failure is only logged: the next start removes what
    /// is left in `spares/`.
    pub(crate) fn discard_spare(&self, pool: &str, spare: &Spare) {
        let Some(pool) = self.pools.get(pool) else { return };
        if let Err(e) = self.remove_subvolume(pool, &pool.spares_dir(), &spare.name, Some(spare.subvolume_id)) {
            tracing::warn!(pool = %pool.name, spare = %spare.name, error = %e, "could not remove a spare subvolume; the next start will");
        }
    }

    /// Deletes subvolume `dir/name`, which no record owns, and destroys qgroup 0/`sub`, or
    /// retires it when the kernel still holds it (see [`Engine::reap_retired_qgroups`]).
    pub(crate) fn remove_subvolume(&self, pool: &Pool, dir: &Path, name: &str, sub: Option<u64>) -> Result<()> {
        self.host.btrfs_subvolume_delete(dir, name)?;
        if let Some(sub) = sub
            && self.host.btrfs_qgroup_destroy(&pool.root, sub).is_err()
        {
            self.retire_qgroup(&pool.name, sub)?;
        }
        Ok(())
    }

    fn existing_matches(
        &self,
        rec: VolumeRecord,
        spec: &spec::VolumeSpec,
        parameters: &BTreeMap<String, String>,
        range: CapacityRange,
    ) -> Result<VolumeRecord> {
        let mismatch = if rec.state != VolumeState::Ready {
            Some("it is being deleted".to_owned())
        } else if rec.kind != spec.kind || rec.pool != spec.pool || rec.fs != spec.fs {
            Some(format!(
                "it is kind={} pool={:?} fs={:?}",
                rec.kind.as_str(),
                rec.pool,
                rec.fs.map(FileSystem::as_str)
            ))
        } else if !range.admits(rec.capacity) {
            Some(format!("its size is {} bytes", rec.capacity))
        } else if &rec.parameters != parameters {
            Some("it was created with other parameters".to_owned())
        } else {
            None
        };
        match mismatch {
            Some(why) => Err(EngineError::AlreadyExists(format!(
                "volume {:?} already exists ({}) and does not match this request: {why}",
                rec.name, rec.id
            ))),
            None => Ok(rec),
        }
    }

    pub(crate) fn check_room(&self, spec: &spec::VolumeSpec) -> Result<()> {
        if spec.kind == Kind::Tmpfs {
            let (free, _) = self.capacity(Kind::Tmpfs, None)?;
            if spec.capacity > self.tmpfs_budget {
                return Err(EngineError::OutOfRange(format!(
                    "tmpfs volumes may use {} bytes of memory in all; {} bytes asked",
                    self.tmpfs_budget, spec.capacity
                )));
            }
            if spec.capacity > free {
                return Err(EngineError::ResourceExhausted(format!(
                    "tmpfs memory budget has {free} bytes left, volume asks for {}",
                    spec.capacity
                )));
            }
            return Ok(());
        }
        let pool = self.pool(&spec.pool)?;
        let stats = pool.stats(self.host.as_ref())?;
        if spec.capacity > stats.total_bytes {
            return Err(EngineError::OutOfRange(format!(
                "pool {:?} holds {} bytes in all; volume asks for {}",
                pool.name, stats.total_bytes, spec.capacity
            )));
        }
        if spec.capacity > stats.available_bytes {
            return Err(EngineError::ResourceExhausted(format!(
                "pool {:?} has {} bytes free; volume asks for {}",
                pool.name, stats.available_bytes, spec.capacity
            )));
        }
        Ok(())
    }

    pub(crate) fn mount_tmpfs(&self, id: &VolumeId, size: u64) -> Result<()> {
        let path = self.tmpfs_path(id);
        self.host.create_dir_all(&path, 0o700)?;
        if self.mounted_at(&path)? {
            return Ok(());
        }
        self.host.mount(&MountRequest {
            source: MountSource::Tmpfs,
            target: path,
            read_only: false,
            options: vec![format!("size={size}"), "mode=0755".into()],
        })?;
        Ok(())
    }

    pub(crate) fn mounted_at(&self, path: &Path) -> Result<bool> {
        Ok(self.host.is_mount_point(path)?)
    }

    /// DeleteVolume: an unknown id is success; a staged or published volume is refused.
    pub fn delete_volume(&self, id: &str) -> Result<()> {
        id::check_client_id(id).map_err(|e| invalid("volume_id", e.to_string()))?;
        let Some(vid) = VolumeId::parse(id) else {
            return Ok(());
        };
        let _busy = self.try_busy(id)?;
        let rec = {
            let state = lock(&self.state);
            if let Some(stage) = state.records.stages.get(&vid) {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {id} is staged at {}; unstage it first",
                    stage.staging_path.display()
                )));
            }
            state.records.volumes.get(&vid).cloned()
        };
        let Some(mut rec) = rec else { return Ok(()) };
        let _name_busy = self.wait_busy(&format!("name:{}", rec.name));
        if rec.state != VolumeState::Deleting {
            rec.state = VolumeState::Deleting;
            self.journal.put_volume(&rec)?;
            lock(&self.state).records.volumes.insert(vid.clone(), rec.clone());
        }
        crash::point("delete_volume.after_mark");
        self.finish_delete(&rec)
    }

    /// Removes the backend of a `Deleting` volume and then its record. Idempotent.
    pub(crate) fn finish_delete(&self, rec: &VolumeRecord) -> Result<()> {
        let _span = tracing::info_span!("delete_volume", volume_id = %rec.id).entered();
        let mut retire = None;
        match rec.kind {
            Kind::Dir => {
                let pool = self.pool(&rec.pool)?;
                self.host.btrfs_subvolume_delete(&pool.volumes_dir(), rec.id.as_str())?;
                if let Some(sub) = rec.subvolume_id
                    && let Err(e) = self.host.btrfs_qgroup_destroy(&pool.root, sub)
                {
                    tracing::debug!(error = %e, "qgroup still busy; retiring it for later");
                    retire = Some((pool.name.as_str(), sub));
                }
            }
            Kind::Fs | Kind::Block => {
                let pool = self.pool(&rec.pool)?;
                let image = pool.image_path(&rec.id);
                if let Some(l) = self.host.loop_device_for(&image)? {
                    self.host.loop_detach(&l)?;
                }
                self.host.remove_file(&image)?;
            }
            Kind::Tmpfs => {
                let path = self.tmpfs_path(&rec.id);
                self.host.unmount(&path)?;
                self.host.remove_dir(&path)?;
            }
        }
        crash::point("delete_volume.after_backend");
        self.journal.delete_volume(&rec.id, retire)?;
        let mut state = lock(&self.state);
        state.records.volumes.remove(&rec.id);
        if state.names.get(&rec.name) == Some(&rec.id) {
            state.names.remove(&rec.name);
        }
        if let Some((pool, sub)) = retire {
            state.records.retired_qgroups.push((pool.to_owned(), sub));
        }
        tracing::info!("volume deleted");
        Ok(())
    }

    pub(crate) fn retire_qgroup(&self, pool: &str, sub: u64) -> Result<()> {
        self.journal.retire_qgroup(pool, sub)?;
        lock(&self.state).records.retired_qgroups.push((pool.to_owned(), sub));
        Ok(())
    }

    pub(crate) fn forget_stage(&self, id: &VolumeId) -> Result<()> {
        self.journal.delete_stage(id)?;
        lock(&self.state).records.stages.remove(id);
        Ok(())
    }

    pub(crate) fn forget_publish(&self, id: &VolumeId, target: &Path) {
        lock(&self.state)
            .records
            .publishes
            .remove(&(id.clone(), target.to_owned()));
    }

    /// Destroys qgroups the kernel refused to drop earlier; keeps the ones still busy.
    pub fn reap_retired_qgroups(&self) -> Result<()> {
        let retired = std::mem::take(&mut lock(&self.state).records.retired_qgroups);
        let mut keep = Vec::new();
        for (pool_name, sub) in retired {
            let done = match self.pools.get(&pool_name) {
                Some(pool) => self.host.btrfs_qgroup_destroy(&pool.root, sub).is_ok(),
                None => true,
            };
            if done {
                self.journal.forget_retired_qgroup(&pool_name, sub)?;
            } else {
                keep.push((pool_name, sub));
            }
        }
        lock(&self.state).records.retired_qgroups.extend(keep);
        Ok(())
    }

    /// The health of a volume's backend.
    pub fn condition(&self, rec: &VolumeRecord) -> Condition {
        match self.check_backend(rec) {
            Ok(c) => c,
            Err(e) => Condition::bad(format!("cannot inspect the volume: {e}")),
        }
    }

    fn check_backend(&self, rec: &VolumeRecord) -> Result<Condition> {
        Ok(match rec.kind {
            Kind::Dir => {
                let path = self.pool(&rec.pool)?.subvolume_path(&rec.id);
                if self.host.exists(&path)? {
                    Condition::default()
                } else {
                    Condition::bad(format!("subvolume {} is gone", path.display()))
                }
            }
            Kind::Fs | Kind::Block => {
                let image = self.pool(&rec.pool)?.image_path(&rec.id);
                match self.host.file_size(&image)? {
                    None => Condition::bad(format!("image file {} is gone", image.display())),
                    Some(s) if s < rec.capacity => Condition::bad(format!(
                        "image file {} is {s} bytes, expected {}",
                        image.display(),
                        rec.capacity
                    )),
                    Some(_) => {
                        let staged = lock(&self.state).records.stages.contains_key(&rec.id);
                        if staged && self.host.loop_device_for(&image)?.is_none() {
                            Condition::bad("volume is staged but its loop device was detached".into())
                        } else {
                            Condition::default()
                        }
                    }
                }
            }
            Kind::Tmpfs => {
                let path = self.tmpfs_path(&rec.id);
                if self.mounted_at(&path)? {
                    Condition::default()
                } else {
                    Condition::bad(format!("tmpfs at {} is not mounted", path.display()))
                }
            }
        })
    }

    /// NodeStageVolume.
    pub fn stage(&self, id: &str, staging_path: &Path, cap: Capability) -> Result<()> {
        let rec = self.volume(id)?;
        let _busy = self.try_busy(id)?;
        spec::check_capabilities(rec.kind, std::slice::from_ref(&cap))?;
        let existing = lock(&self.state).records.stages.get(&rec.id).cloned();
        if let Some(stage) = existing {
            if stage.staging_path != staging_path {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {id} is already staged at {}",
                    stage.staging_path.display()
                )));
            }
            if stage.capability != cap {
                return Err(EngineError::AlreadyExists(format!(
                    "volume {id} is staged at {} with another capability",
                    staging_path.display()
                )));
            }
            return Ok(());
        }
        let _span = tracing::info_span!("node_stage", volume_id = %rec.id).entered();
        self.host.prepare_target(staging_path, TargetKind::Directory)?;
        self.establish_stage(&rec, staging_path, &cap)?;
        if rec.grow_fs_on_stage {
            if self.host.can_grow_online(rec.fs.unwrap_or(FileSystem::Ext4)) {
                self.grow_fs(&rec)?;
            }
            let mut grown = rec.clone();
            grown.grow_fs_on_stage = false;
            self.save_volume(&grown)?;
        }
        crash::point("node_stage.after_mount");
        let stage = StageRecord {
            volume_id: rec.id.clone(),
            staging_path: staging_path.to_owned(),
            capability: cap,
        };
        self.journal.put_stage(&stage)?;
        lock(&self.state).records.stages.insert(rec.id.clone(), stage);
        Ok(())
    }

    /// Makes the kernel state of a staged volume; idempotent (used again after a reboot).
    pub(crate) fn establish_stage(&self, rec: &VolumeRecord, staging_path: &Path, cap: &Capability) -> Result<()> {
        match rec.kind {
            Kind::Dir => {
                let src = self.pool(&rec.pool)?.subvolume_path(&rec.id);
                self.bind_once(&src, staging_path, false, &[])?;
            }
            Kind::Tmpfs => {
                self.mount_tmpfs(&rec.id, rec.capacity)?;
                self.bind_once(&self.tmpfs_path(&rec.id), staging_path, false, &[])?;
            }
            Kind::Block => {
                let device = self.attach_image(rec)?;
                if spec::read_only_param(&rec.mutable) {
                    self.host.set_block_read_only(&device, true)?;
                }
                crash::point("node_stage.after_attach");
            }
            Kind::Fs => {
                let device = self.attach_image(rec)?;
                crash::point("node_stage.after_attach");
                let fs = rec.fs.unwrap_or(FileSystem::Ext4);
                match self.host.probe_filesystem(&device)? {
                    None => self.host.mkfs(&device, fs)?,
                    Some(found) if found == fs.as_str() => {}
                    Some(found) => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "volume {} holds a {found} filesystem, not {}",
                            rec.id,
                            fs.as_str()
                        )));
                    }
                }
                let private = self.staged_path(&rec.id);
                self.host.create_dir_all(&private, 0o700)?;
                if !self.mounted_at(&private)? {
                    if rec.grow_fs_on_stage && !self.host.can_grow_online(fs) {
                        self.host.grow_filesystem_offline(fs, &device)?;
                    }
                    let (attrs, mut fs_opts) = split_flags(&cap.mount_flags);
                    fs_opts.extend(attrs);
                    // Restores and clones carry their source's filesystem UUID; xfs refuses to
                    // mount a second filesystem with a UUID already mounted unless told not to
                    // care. (btrfs gives a single-device clone a temporary fsid by itself.)
                    if fs == FileSystem::Xfs && !fs_opts.iter().any(|o| o == "nouuid") {
                        fs_opts.push("nouuid".into());
                    }
                    self.host.mount(&MountRequest {
                        source: MountSource::Device { device, fs },
                        target: private.clone(),
                        read_only: false,
                        options: fs_opts,
                    })?;
                }
                if spec::read_only_param(&rec.mutable) {
                    // Read-only at the superblock, not as a mount attribute: binds made from a
                    // read-only mount would stay read-only after `readOnly=false`.
                    self.host.reconfigure(&private, &["ro".to_owned()])?;
                }
                self.bind_once(&private, staging_path, false, &[])?;
            }
        }
        Ok(())
    }

    fn attach_image(&self, rec: &VolumeRecord) -> Result<PathBuf> {
        let image = self.pool(&rec.pool)?.image_path(&rec.id);
        if let Some(l) = self.host.loop_device_for(&image)? {
            return Ok(l.device);
        }
        let dev = self.host.loop_attach(
            &image,
            LoopOptions {
                read_only: false,
                direct_io: true,
                autoclear: false,
            },
        )?;
        Ok(dev.device)
    }

    pub(crate) fn loop_device_of(&self, rec: &VolumeRecord) -> Result<Option<PathBuf>> {
        Ok(self.loop_of(rec)?.map(|l| l.device))
    }

    /// The loop device attached to a fs or block volume's image, if any.
    pub(crate) fn loop_of(&self, rec: &VolumeRecord) -> Result<Option<LoopDevice>> {
        let image = self.pool(&rec.pool)?.image_path(&rec.id);
        Ok(self.host.loop_device_for(&image)?)
    }

    /// Bind-mounts `src` (trusted) at `target` unless something is mounted there already.
    fn bind_once(&self, src: &Path, target: &Path, read_only: bool, flags: &[String]) -> Result<()> {
        if self.mounted_at(target)? {
            return Ok(());
        }
        self.host.mount(&MountRequest {
            source: MountSource::Bind { source: src.to_owned() },
            target: target.to_owned(),
            read_only,
            options: flags.to_vec(),
        })?;
        Ok(())
    }

    /// NodeUnstageVolume: idempotent; refused while the volume is still published.
    pub fn unstage(&self, id: &str, staging_path: &Path) -> Result<()> {
        let rec = self.volume(id)?;
        let _busy = self.try_busy(id)?;
        let published = self.published_targets(&rec.id);
        if !published.is_empty() {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is still published at {}; unpublish it first",
                published[0].display()
            )));
        }
        let _span = tracing::info_span!("node_unstage", volume_id = %rec.id).entered();
        let stage = lock(&self.state).records.stages.get(&rec.id).cloned();
        if let Some(stage) = &stage
            && stage.staging_path != staging_path
        {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is staged at {}, not {}",
                stage.staging_path.display(),
                staging_path.display()
            )));
        }
        self.teardown_stage(&rec, staging_path)?;
        crash::point("node_unstage.after_unmount");
        if stage.is_some() {
            self.journal.delete_stage(&rec.id)?;
            lock(&self.state).records.stages.remove(&rec.id);
        }
        Ok(())
    }

    pub(crate) fn teardown_stage(&self, rec: &VolumeRecord, staging_path: &Path) -> Result<()> {
        if rec.kind.access_type() == AccessType::Mount {
            self.unmount_all(staging_path)?;
        }
        if rec.kind == Kind::Fs {
            self.unmount_all(&self.staged_path(&rec.id))?;
            self.host.remove_dir(&self.staged_path(&rec.id))?;
        }
        if matches!(rec.kind, Kind::Fs | Kind::Block)
            && let Some(l) = self.loop_of(rec)?
        {
            self.host.loop_detach(&l)?;
        }
        Ok(())
    }

    /// Unmounts every mount stacked at `path`.
    fn unmount_all(&self, path: &Path) -> Result<()> {
        for _ in 0..16 {
            if self.unmount_when_free(path)? == berth_host::Unmounted::NotMounted {
                return Ok(());
            }
        }
        Err(EngineError::FailedPrecondition(format!(
            "{} still has mounts stacked on it after 16 unmounts",
            path.display()
        )))
    }

    /// One unmount, tried again for a moment while the kernel says the mount is busy. A hold
    /// that short is usually a child process between its fork and its exec, which has a copy of
    /// a descriptor opened beneath the mount; a real user of the volume outlasts the retries and
    /// gets the error (FailedPrecondition), which the CO retries.
    fn unmount_when_free(&self, path: &Path) -> Result<berth_host::Unmounted> {
        let mut delay = BUSY_FIRST_DELAY;
        loop {
            match self.host.unmount(path) {
                Err(e) if e.errno() == Some(libc::EBUSY) && delay <= BUSY_LAST_DELAY => {
                    tracing::debug!(path = %path.display(), ?delay, "mount busy; trying again");
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                r => return Ok(r?),
            }
        }
    }

    /// NodePublishVolume.
    pub fn publish(
        &self,
        id: &str,
        target: &Path,
        staging_path: &Path,
        cap: Capability,
        read_only: bool,
    ) -> Result<()> {
        let rec = self.volume(id)?;
        let _busy = self.try_busy(id)?;
        spec::check_capabilities(rec.kind, std::slice::from_ref(&cap))?;
        let (stage, publishes) = {
            let state = lock(&self.state);
            let publishes: Vec<PublishRecord> = state
                .records
                .publishes
                .values()
                .filter(|p| p.volume_id == rec.id)
                .cloned()
                .collect();
            (state.records.stages.get(&rec.id).cloned(), publishes)
        };
        let Some(stage) = stage else {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is not staged; call NodeStageVolume first"
            )));
        };
        if stage.staging_path != staging_path {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is staged at {}, not {}",
                stage.staging_path.display(),
                staging_path.display()
            )));
        }
        let read_only = read_only || cap.mode.read_only() || self.attached_read_only(&rec.id);
        if let Some(other) = self.publisher_at(target).filter(|v| *v != rec.id) {
            return Err(EngineError::FailedPrecondition(format!(
                "{} is where volume {other} is published; unpublish it first",
                target.display()
            )));
        }
        if let Some(p) = publishes.iter().find(|p| p.target_path == target) {
            if p.read_only == read_only && p.capability == cap {
                return Ok(());
            }
            return Err(EngineError::AlreadyExists(format!(
                "volume {id} is already published at {} with other arguments",
                target.display()
            )));
        }
        if (cap.mode.single_writer() || publishes.iter().any(|p| p.capability.mode.single_writer()))
            && !publishes.is_empty()
        {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                publishes[0].target_path.display()
            )));
        }
        let _span = tracing::info_span!("node_publish", volume_id = %rec.id).entered();
        self.establish_publish(&rec, target, &cap, read_only)?;
        crash::point("node_publish.after_mount");
        let publish = PublishRecord {
            volume_id: rec.id.clone(),
            target_path: target.to_owned(),
            read_only,
            capability: cap,
        };
        self.journal.put_publish(&publish)?;
        lock(&self.state)
            .records
            .publishes
            .insert((rec.id.clone(), target.to_owned()), publish);
        Ok(())
    }

    pub(crate) fn establish_publish(
        &self,
        rec: &VolumeRecord,
        target: &Path,
        cap: &Capability,
        read_only: bool,
    ) -> Result<()> {
        let (src, kind) = match rec.kind {
            Kind::Dir => (self.pool(&rec.pool)?.subvolume_path(&rec.id), TargetKind::Directory),
            Kind::Fs => (self.staged_path(&rec.id), TargetKind::Directory),
            Kind::Tmpfs => (self.tmpfs_path(&rec.id), TargetKind::Directory),
            Kind::Block => {
                let dev = self.loop_device_of(rec)?.ok_or_else(|| {
                    EngineError::FailedPrecondition(format!("volume {} is not attached; stage it again", rec.id))
                })?;
                (dev, TargetKind::File)
            }
        };
        self.host.prepare_target(target, kind)?;
        let (attrs, _) = split_flags(&cap.mount_flags);
        self.bind_once(&src, target, read_only, &attrs)
    }

    /// NodeUnpublishVolume: idempotent; never reports success while the mount is still there.
    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let rec = self.volume(id)?;
        let _busy = self.try_busy(id)?;
        let _span = tracing::info_span!("node_unpublish", volume_id = %rec.id).entered();
        if let Some(other) = self.publisher_at(target).filter(|v| *v != rec.id) {
            tracing::warn!(%other, target = %target.display(), "unpublish names another volume's target; leaving it");
            return Ok(());
        }
        self.unmount_all(target)?;
        crash::point("node_unpublish.after_unmount");
        self.host.remove_target(target)?;
        let known = lock(&self.state)
            .records
            .publishes
            .contains_key(&(rec.id.clone(), target.to_owned()));
        if known {
            self.journal.delete_publish(&rec.id, target)?;
            lock(&self.state)
                .records
                .publishes
                .remove(&(rec.id.clone(), target.to_owned()));
        }
        Ok(())
    }

    /// NodeGetVolumeStats for a staging or target path of the volume.
    pub fn stats(&self, id: &str, path: &Path) -> Result<VolumeStats> {
        let rec = self.volume(id)?;
        let known = {
            let state = lock(&self.state);
            state
                .records
                .stages
                .get(&rec.id)
                .is_some_and(|s| s.staging_path == path)
                || state.records.publishes.contains_key(&(rec.id.clone(), path.to_owned()))
        };
        if !known {
            return Err(EngineError::NotFound(format!(
                "volume {id} is not staged or published at {}",
                path.display()
            )));
        }
        let mut condition = self.condition(&rec);
        if !condition.abnormal && rec.kind.access_type() == AccessType::Mount && !self.mounted_at(path)? {
            condition = Condition::bad(format!("{} is no longer mounted", path.display()));
        }
        let mut stats = self.usage_of(&rec)?;
        stats.condition = condition;
        Ok(stats)
    }

    /// Space (and inodes) in use in a volume, wherever it is mounted or not: the qgroup of a dir
    /// volume, the filesystem of a tmpfs or a staged fs volume. `None` figures where the engine
    /// cannot tell without mounting (an unstaged fs volume) or at all (block).
    pub fn usage(&self, id: &str) -> Result<VolumeStats> {
        let rec = self.volume(id)?;
        self.usage_of(&rec)
    }

    fn usage_of(&self, rec: &VolumeRecord) -> Result<VolumeStats> {
        let mut stats = VolumeStats {
            total_bytes: rec.capacity,
            ..VolumeStats::default()
        };
        let mount = match rec.kind {
            Kind::Dir => {
                let pool = self.pool(&rec.pool)?;
                // qgroup numbers are brought up to date at a transaction commit.
                self.host.btrfs_sync(&pool.subvolume_path(&rec.id))?;
                let used = self
                    .host
                    .btrfs_qgroups(&pool.root)?
                    .into_iter()
                    .find(|q| Some(q.subvolume_id) == rec.subvolume_id)
                    .map_or(0, |q| q.referenced_bytes);
                stats.used_bytes = Some(used);
                stats.available_bytes = Some(rec.capacity.saturating_sub(used));
                None
            }
            Kind::Fs if self.staging_path(&rec.id).is_some() => Some(self.staged_path(&rec.id)),
            Kind::Tmpfs => Some(self.tmpfs_path(&rec.id)),
            Kind::Fs | Kind::Block => None,
        };
        if let Some(mount) = mount {
            let s = self.host.statfs(&mount)?;
            stats.total_bytes = s.total_bytes;
            stats.used_bytes = Some(s.used_bytes);
            stats.available_bytes = Some(s.available_bytes);
            if s.total_inodes > 0 && s.fs_type != magic::BTRFS {
                stats.inodes = Some((s.total_inodes, s.used_inodes, s.free_inodes));
            }
        }
        Ok(stats)
    }
}

/// Splits CSI mount flags into mount attributes (applied to every bind) and filesystem options
/// (applied when the filesystem itself is mounted).
fn split_flags(flags: &[String]) -> (Vec<String>, Vec<String>) {
    const ATTRS: &[&str] = &[
        "ro",
        "rw",
        "nosuid",
        "nodev",
        "noexec",
        "noatime",
        "relatime",
        "nodiratime",
        "strictatime",
    ];
    flags
        .iter()
        .flat_map(|f| f.split(','))
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .partition(|f| ATTRS.contains(&f.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_split_into_attributes_and_fs_options() {
        let (a, f) = split_flags(&["noatime,discard".into(), "nosuid".into()]);
        assert_eq!(a, vec!["noatime", "nosuid"]);
        assert_eq!(f, vec!["discard"]);
    }
}
