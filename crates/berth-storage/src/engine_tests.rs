//! Engine unit tests against the recording fake host.
//!
//! Every test opens a real [`Engine`] whose journal (redb) is a file in a temp dir, on a
//! [`RecordingHost`] set up like a host without quotas: the data dir is ext4, so the default
//! pool is an image file, formatted btrfs, loop-attached and mounted at
//! `<data>/pools/default/fs` (the fake reports btrfs there). Restarts re-open the engine on the
//! same fake and data dir; a reboot unmounts everything and detaches every loop device first.
//! Tests assert the exact host calls where the calls are the point, and the resulting host
//! state (mounts, loop devices, subvolumes, files) and records otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use berth_host::fake::{Call, RecordingHost};
use berth_host::{
    FileSystem, FsStats, HostError, HostOps, LoopOptions, MountRequest, MountSource, TargetKind, Unmounted, magic,
};
use rstest::rstest;

use crate::engine::{CreateRequest, Engine, EngineConfig, EngineError};
use crate::id::VolumeId;
use crate::journal::{VolumeRecord, VolumeState};
use crate::spec::{AccessMode, Capability, CapacityRange, Kind};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// What statfs says about the pool filesystem.
const POOL_TOTAL: u64 = 8 * GIB;
const POOL_FREE: u64 = 6 * GIB;
const TMPFS_BUDGET: u64 = 2 * GIB;
/// The size most tests create volumes with.
const SIZE: u64 = 64 * MIB;

const S1: &str = "/stage/s1";
const S2: &str = "/stage/s2";
const T1: &str = "/pods/a/t1";
const T2: &str = "/pods/a/t2";

const KINDS: [Kind; 4] = [Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs];

/// One fake host and one data dir, shared by every engine a test opens.
struct Env {
    host: Arc<RecordingHost>,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().canonicalize().unwrap();
        let host = Arc::new(RecordingHost::new());
        host.set_statfs(
            data.join("pools/default/fs"),
            FsStats {
                fs_type: magic::BTRFS,
                block_size: 4096,
                total_bytes: POOL_TOTAL,
                available_bytes: POOL_FREE,
                used_bytes: POOL_TOTAL - POOL_FREE,
                total_inodes: 0,
                free_inodes: 0,
                used_inodes: 0,
            },
        );
        host.add_dir("/pods/a");
        host.add_dir("/stage");
        Env { host, data, _dir: dir }
    }

    fn config(&self) -> EngineConfig {
        EngineConfig {
            data_dir: self.data.clone(),
            node_id: "node-1".into(),
            pools: vec![],
            pool_image_size: Some(16 * GIB),
            tmpfs_budget: Some(TMPFS_BUDGET),
            max_volumes_per_node: 0,
            // No spares unless a test asks: the refill thread would add host calls at random
            // points of every recording.
            spare_subvolumes: 0,
        }
    }

    /// Opens an engine on this host and data dir (a start, or a restart once the last one is dropped).
    fn open(&self) -> Engine {
        Engine::open(self.host.clone(), self.config()).unwrap()
    }

    /// Opens an engine that keeps `spares` spare subvolumes, made in the test's thread (by
    /// `spares.top_up()`), not by the refill thread, so that host calls come in a fixed order.
    fn open_with_spares(&self, spares: usize) -> Engine {
        let cfg = EngineConfig {
            spare_subvolumes: spares,
            ..self.config()
        };
        let engine = Engine::open_without_spare_thread(self.host.clone(), cfg).unwrap();
        engine.spares.top_up();
        engine
    }

    fn spares_dir(&self) -> PathBuf {
        self.root().join("spares")
    }

    /// Subvolumes in the default pool's `spares/`, with their ids.
    fn spare_subvolumes(&self) -> BTreeMap<PathBuf, u64> {
        let dir = self.spares_dir();
        self.host
            .subvolumes()
            .into_iter()
            .filter(|(p, _)| p.parent() == Some(&dir))
            .collect()
    }

    fn root(&self) -> PathBuf {
        self.data.join("pools/default/fs")
    }

    fn pool_image(&self) -> PathBuf {
        self.data.join("pools/default/pool.img")
    }

    fn volumes_dir(&self) -> PathBuf {
        self.root().join("volumes")
    }

    fn images_dir(&self) -> PathBuf {
        self.root().join("images")
    }

    fn subvolume(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(id.as_str())
    }

    fn image(&self, id: &VolumeId) -> PathBuf {
        self.images_dir().join(format!("{id}.img"))
    }

    fn tmpfs(&self, id: &VolumeId) -> PathBuf {
        self.data.join("tmpfs").join(id.as_str())
    }

    fn private(&self, id: &VolumeId) -> PathBuf {
        self.data.join("staged").join(id.as_str())
    }

    /// The loop device backed by `image`, if one is attached.
    fn loop_of(&self, image: &Path) -> Option<PathBuf> {
        self.host
            .attached_loops()
            .into_iter()
            .find(|l| l.backing_file == image)
            .map(|l| l.device)
    }

    /// How many backends of `kind` exist on the host.
    fn backends(&self, kind: Kind) -> usize {
        match kind {
            Kind::Dir => {
                let dir = self.volumes_dir();
                self.host
                    .subvolumes()
                    .keys()
                    .filter(|p| p.parent() == Some(&dir))
                    .count()
            }
            Kind::Fs | Kind::Block => {
                let dir = self.images_dir();
                self.host.files().keys().filter(|p| p.parent() == Some(&dir)).count()
            }
            Kind::Tmpfs => self
                .host
                .mounts()
                .iter()
                .filter(|m| m.source == MountSource::Tmpfs)
                .count(),
        }
    }

    /// The mount table with loop devices named by their backing files (their numbers change
    /// across a reboot), sorted.
    fn mount_table(&self) -> Vec<(PathBuf, String, bool, Vec<String>)> {
        let loops = self.host.attached_loops();
        let name = |p: &Path| {
            loops.iter().find(|l| l.device == p).map_or_else(
                || p.display().to_string(),
                |l| format!("loop:{}", l.backing_file.display()),
            )
        };
        let mut table: Vec<_> = self
            .host
            .mounts()
            .into_iter()
            .map(|m| {
                let source = match &m.source {
                    MountSource::Device { device, fs } => format!("{} {}", fs.as_str(), name(device)),
                    MountSource::Tmpfs => "tmpfs".to_owned(),
                    MountSource::Bind { source } => format!("bind {}", name(source)),
                };
                (m.target, source, m.read_only, m.options)
            })
            .collect();
        table.sort();
        table
    }

    /// Backing files of the attached loop devices, sorted.
    fn loop_backings(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.host.attached_loops().into_iter().map(|l| l.backing_file).collect();
        v.sort();
        v
    }

    /// A reboot: every mount and loop device is gone; files, subvolumes and filesystems stay.
    fn reboot(&self) {
        loop {
            let mounts = self.host.mounts();
            let leaf = mounts.iter().rev().find(|m| {
                !mounts
                    .iter()
                    .any(|o| o.target != m.target && o.target.starts_with(&m.target))
            });
            let Some(leaf) = leaf else { break };
            self.host.unmount(&leaf.target).unwrap();
        }
        for l in self.host.attached_loops() {
            self.host.loop_detach(&l).unwrap();
        }
        self.host.clear_calls();
    }
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn cap_with(kind: Kind, mode: AccessMode) -> Capability {
    Capability {
        access_type: kind.access_type(),
        fs_type: String::new(),
        mount_flags: vec![],
        mode,
    }
}

fn cap(kind: Kind) -> Capability {
    cap_with(kind, AccessMode::SingleNodeWriter)
}

fn params(kind: Kind) -> BTreeMap<String, String> {
    BTreeMap::from([("kind".to_owned(), kind.as_str().to_owned())])
}

fn size(required: u64) -> CapacityRange {
    CapacityRange { required, limit: 0 }
}

fn create(engine: &Engine, name: &str, kind: Kind) -> VolumeRecord {
    engine
        .create_volume(name, params(kind), vec![cap(kind)], size(SIZE))
        .unwrap()
}

/// The error class of a result, as a short name for tables.
fn code<T>(r: &Result<T, EngineError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => match e {
            EngineError::Invalid { .. } => "invalid",
            EngineError::NotFound(_) => "not_found",
            EngineError::AlreadyExists(_) => "already_exists",
            EngineError::OutOfRange(_) => "out_of_range",
            EngineError::ResourceExhausted(_) => "resource_exhausted",
            EngineError::FailedPrecondition(_) => "failed_precondition",
            EngineError::Aborted(_) => "aborted",
            EngineError::Host(_) => "host",
            EngineError::Journal(_) => "journal",
            EngineError::Pool(_) => "pool",
            #[allow(unreachable_patterns)]
            _ => "other",
        },
    }
}

fn errno<T>(r: &Result<T, EngineError>) -> Option<i32> {
    match r {
        Err(EngineError::Host(e)) => e.errno(),
        _ => None,
    }
}

fn count(calls: &[Call], op: &str) -> usize {
    calls.iter().filter(|c| c.op() == op).count()
}

/// Calls that remove or undo something on the host.
fn removals(calls: &[Call]) -> Vec<Call> {
    const OPS: &[&str] = &[
        "unmount",
        "loop_detach",
        "btrfs_subvolume_delete",
        "btrfs_qgroup_destroy",
        "remove_file",
        "remove_dir",
        "remove_target",
    ];
    calls.iter().filter(|c| OPS.contains(&c.op())).cloned().collect()
}

fn bind(source: &Path, target: &str, read_only: bool) -> Call {
    Call::Mount {
        target: p(target),
        source: MountSource::Bind {
            source: source.to_owned(),
        },
        read_only,
        options: vec![],
    }
}

fn prepare(target: &str, kind: TargetKind) -> Call {
    Call::PrepareTarget {
        target: p(target),
        kind,
    }
}

fn unmount(target: impl AsRef<Path>) -> Call {
    Call::Unmount {
        target: target.as_ref().to_owned(),
    }
}

const VOLUME_LOOP: LoopOptions = LoopOptions {
    read_only: false,
    direct_io: true,
    autoclear: false,
};

// ---- the fixture itself ----

#[test]
fn the_default_pool_is_a_btrfs_image_with_quotas() {
    let env = Env::new();
    let engine = env.open();
    let pool = engine.pool(crate::DEFAULT_POOL).unwrap();
    assert_eq!(pool.root, env.root());
    assert_eq!(pool.image.as_deref(), Some(env.pool_image().as_path()));
    assert_eq!(env.host.files().get(&env.pool_image()), Some(&(16 * GIB)));
    assert_eq!(env.host.filesystem_of(&env.pool_image()).as_deref(), Some("btrfs"));
    assert_eq!(env.loop_backings(), vec![env.pool_image()]);
    assert_eq!(env.mount_table().len(), 1);
    assert!(env.host.calls().contains(&Call::BtrfsQuotaEnable { mount: env.root() }));
}

// ---- CreateVolume ----

#[rstest]
fn create_makes_exactly_the_backend(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    env.host.clear_calls();
    let vol = create(&engine, "v", kind);
    let expected = match kind {
        Kind::Dir => {
            let sub = vol.subvolume_id.unwrap();
            vec![
                Call::BtrfsSubvolumeCreate {
                    parent: env.volumes_dir(),
                    name: vol.id.to_string(),
                },
                Call::BtrfsQgroupLimit {
                    mount: env.root(),
                    subvolume_id: sub,
                    max_referenced: Some(SIZE),
                },
                Call::SetNocow {
                    path: env.volumes_dir().join(vol.id.as_str()),
                    on: true,
                },
            ]
        }
        Kind::Fs | Kind::Block => vec![Call::CreateImage {
            path: env.image(&vol.id),
            size: SIZE,
            nocow: true,
        }],
        Kind::Tmpfs => vec![
            Call::CreateDirAll {
                path: env.tmpfs(&vol.id),
                mode: 0o700,
            },
            Call::Mount {
                target: env.tmpfs(&vol.id),
                source: MountSource::Tmpfs,
                read_only: false,
                options: vec![format!("size={SIZE}"), "mode=0755".into()],
            },
        ],
    };
    assert_eq!(env.host.mutating_calls(), expected);
    assert_eq!(vol.capacity, SIZE);
    assert_eq!(vol.state, VolumeState::Ready);
    assert_eq!(vol.fs, (kind == Kind::Fs).then_some(FileSystem::Ext4));
    if kind == Kind::Dir {
        let q = env
            .host
            .qgroups()
            .into_iter()
            .find(|q| Some(q.subvolume_id) == vol.subvolume_id);
        assert_eq!(q.unwrap().max_referenced, Some(SIZE));
    }
    // Durable before the answer: a fresh engine on the same data dir knows it.
    drop(engine);
    let engine = env.open();
    assert_eq!(engine.volume(vol.id.as_str()).unwrap(), vol);
}

#[test]
fn usage_without_a_mount_where_the_engine_can_tell() {
    let env = Env::new();
    let engine = env.open();
    let dir = create(&engine, "d", Kind::Dir);
    env.host.set_qgroup_usage(dir.subvolume_id.unwrap(), 5 * 4096, 5 * 4096);
    let u = engine.usage(dir.id.as_str()).unwrap();
    assert_eq!(
        (u.used_bytes, u.available_bytes),
        (Some(5 * 4096), Some(SIZE - 5 * 4096))
    );
    // An fs volume that is not staged has no mounted filesystem to ask; block never has one.
    for kind in [Kind::Fs, Kind::Block] {
        let v = create(&engine, &format!("{kind:?}"), kind);
        let u = engine.usage(v.id.as_str()).unwrap();
        assert_eq!((u.total_bytes, u.used_bytes), (SIZE, None), "{kind:?}");
    }
    assert_eq!(code(&engine.usage("0123456789abcdef0123456789abcdef")), "not_found");
}

#[test]
fn dir_volumes_overwrite_in_place_unless_compressed() {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", Kind::Dir);
    let path = env.volumes_dir().join(vol.id.as_str());
    assert!(env.host.nocow(&path), "a new dir volume is NOCOW");
    let set = |v: &str| BTreeMap::from([("compression".to_owned(), v.to_owned())]);

    engine.modify(vol.id.as_str(), &set("zstd")).unwrap();
    assert!(!env.host.nocow(&path), "compression needs copy-on-write");
    assert_eq!(
        env.host.xattrs(&path).get("btrfs.compression").map(Vec::as_slice),
        Some(&b"zstd"[..])
    );

    engine.modify(vol.id.as_str(), &set("none")).unwrap();
    assert!(
        !env.host.xattrs(&path).contains_key("btrfs.compression"),
        "none resets the property"
    );
    assert!(env.host.nocow(&path), "none restores NOCOW");

    // Created compressed: copy-on-write from the start.
    let c = engine
        .create(CreateRequest {
            name: "c".into(),
            parameters: params(Kind::Dir),
            mutable: set("lzo"),
            capabilities: vec![cap(Kind::Dir)],
            range: size(SIZE),
            source: None,
        })
        .unwrap();
    let cpath = env.volumes_dir().join(c.id.as_str());
    assert!(!env.host.nocow(&cpath));
    assert_eq!(
        env.host.xattrs(&cpath).get("btrfs.compression").map(Vec::as_slice),
        Some(&b"lzo"[..])
    );
}

#[rstest]
fn create_is_idempotent_by_name(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let first = create(&engine, "v", kind);
    env.host.clear_calls();
    let again = create(&engine, "v", kind);
    assert_eq!(again, first);
    assert_eq!(env.host.mutating_calls(), vec![], "a repeated create changes nothing");
    assert_eq!(env.backends(kind), 1);
    assert_eq!(engine.records().volumes.len(), 1);
    // Also after a restart, and when the pool has no room left for a new one.
    drop(engine);
    env.host.set_statfs(
        env.root(),
        FsStats {
            fs_type: magic::BTRFS,
            total_bytes: POOL_TOTAL,
            available_bytes: 0,
            ..FsStats::default()
        },
    );
    let engine = env.open();
    assert_eq!(create(&engine, "v", kind), first);
    assert_eq!(env.backends(kind), 1);
}

#[rstest]
#[case::same(&[("kind", "dir")], SIZE, 0, "ok")]
#[case::range_that_admits_the_size(&[("kind", "dir")], SIZE / 2, SIZE, "ok")]
#[case::larger(&[("kind", "dir")], 2 * SIZE, 0, "already_exists")]
#[case::limit_below_the_size(&[("kind", "dir")], 0, SIZE / 2, "already_exists")]
#[case::other_kind(&[("kind", "fs")], SIZE, 0, "already_exists")]
#[case::other_parameters(&[("kind", "dir"), ("csi.storage.k8s.io/pvc/name", "x")], SIZE, 0, "already_exists")]
#[case::kind_left_to_inference(&[], SIZE, 0, "already_exists")]
fn create_with_other_arguments_conflicts(
    #[case] kv: &[(&str, &str)],
    #[case] required: u64,
    #[case] limit: u64,
    #[case] want: &str,
) {
    let env = Env::new();
    let engine = env.open();
    let first = create(&engine, "v", Kind::Dir);
    env.host.clear_calls();
    let parameters: BTreeMap<String, String> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let kind = Kind::parse(parameters.get("kind").map_or("dir", String::as_str)).unwrap();
    let r = engine.create_volume("v", parameters, vec![cap(kind)], CapacityRange { required, limit });
    assert_eq!(code(&r), want, "{r:?}");
    if let Ok(rec) = r {
        assert_eq!(rec, first);
    }
    assert_eq!(env.host.mutating_calls(), vec![]);
    assert_eq!(engine.records().volumes.len(), 1);
}

#[rstest]
fn concurrent_creates_of_one_name_make_one_volume(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    const THREADS: usize = 32;
    let env = Env::new();
    let engine = env.open();
    env.host.clear_calls();
    let barrier = Barrier::new(THREADS);
    let ids: Vec<VolumeId> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    create(&engine, "same", kind).id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(env.backends(kind), 1);
    let made = env
        .host
        .calls()
        .iter()
        .filter(|c| {
            matches!(
                c,
                Call::BtrfsSubvolumeCreate { .. } | Call::CreateImage { .. } | Call::Mount { .. }
            )
        })
        .count();
    assert_eq!(made, 1);
    assert_eq!(engine.records().volumes.len(), 1);
    drop(engine);
    assert_eq!(env.open().records().volumes.len(), 1);
}

// ---- sizes ----

#[rstest]
#[case::dir_over_the_pool(Kind::Dir, POOL_TOTAL + 4096, "out_of_range")]
#[case::dir_over_the_free_space(Kind::Dir, POOL_FREE + 4096, "resource_exhausted")]
#[case::dir_all_the_free_space(Kind::Dir, POOL_FREE, "ok")]
#[case::fs_over_the_pool(Kind::Fs, POOL_TOTAL + 4096, "out_of_range")]
#[case::fs_over_the_free_space(Kind::Fs, POOL_FREE + 4096, "resource_exhausted")]
#[case::fs_all_the_free_space(Kind::Fs, POOL_FREE, "ok")]
#[case::block_over_the_pool(Kind::Block, POOL_TOTAL + 4096, "out_of_range")]
#[case::block_over_the_free_space(Kind::Block, POOL_FREE + 4096, "resource_exhausted")]
#[case::block_all_the_free_space(Kind::Block, POOL_FREE, "ok")]
#[case::tmpfs_over_the_budget(Kind::Tmpfs, TMPFS_BUDGET + 4096, "out_of_range")]
#[case::tmpfs_the_whole_budget(Kind::Tmpfs, TMPFS_BUDGET, "ok")]
fn sizes_are_checked_against_the_pool(#[case] kind: Kind, #[case] bytes: u64, #[case] want: &str) {
    let env = Env::new();
    let engine = env.open();
    env.host.clear_calls();
    let r = engine.create_volume("v", params(kind), vec![cap(kind)], size(bytes));
    assert_eq!(code(&r), want, "{r:?}");
    match r {
        Ok(rec) => assert_eq!(rec.capacity, bytes),
        Err(_) => {
            assert_eq!(env.host.mutating_calls(), vec![]);
            assert!(engine.records().volumes.is_empty());
        }
    }
}

#[test]
fn tmpfs_volumes_share_one_memory_budget() {
    let env = Env::new();
    let engine = env.open();
    let big = TMPFS_BUDGET - GIB / 2;
    engine
        .create_volume("a", params(Kind::Tmpfs), vec![cap(Kind::Tmpfs)], size(big))
        .unwrap();
    let r = engine.create_volume("b", params(Kind::Tmpfs), vec![cap(Kind::Tmpfs)], size(GIB));
    assert_eq!(code(&r), "resource_exhausted", "{r:?}");
    assert_eq!(engine.capacity(Kind::Tmpfs, None).unwrap(), (GIB / 2, GIB / 2));
    let r = engine.create_volume("b", params(Kind::Tmpfs), vec![cap(Kind::Tmpfs)], size(GIB / 2));
    assert_eq!(code(&r), "ok", "{r:?}");
}

// ---- DeleteVolume ----

#[rstest]
#[case::well_formed_but_unknown("0123456789abcdef0123456789abcdef", "ok")]
#[case::another_drivers_id("reallyfakevolumeid", "ok")]
#[case::traversal("../etc", "invalid")]
#[case::absolute("/etc/passwd", "invalid")]
#[case::empty("", "invalid")]
fn delete_of_an_unknown_id(#[case] id: &str, #[case] want: &str) {
    let env = Env::new();
    let engine = env.open();
    create(&engine, "keep", Kind::Dir);
    env.host.clear_calls();
    let r = engine.delete_volume(id);
    assert_eq!(code(&r), want, "{r:?}");
    assert_eq!(env.host.mutating_calls(), vec![]);
    assert_eq!(engine.records().volumes.len(), 1);
}

#[rstest]
fn delete_removes_the_backend_then_the_record(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    env.host.clear_calls();
    engine.delete_volume(vol.id.as_str()).unwrap();
    let expected = match kind {
        Kind::Dir => vec![
            Call::BtrfsSubvolumeDelete {
                parent: env.volumes_dir(),
                name: vol.id.to_string(),
            },
            Call::BtrfsQgroupDestroy {
                mount: env.root(),
                subvolume_id: vol.subvolume_id.unwrap(),
            },
        ],
        Kind::Fs | Kind::Block => vec![Call::RemoveFile {
            path: env.image(&vol.id),
        }],
        Kind::Tmpfs => vec![
            unmount(env.tmpfs(&vol.id)),
            Call::RemoveDir {
                path: env.tmpfs(&vol.id),
            },
        ],
    };
    assert_eq!(env.host.mutating_calls(), expected);
    assert_eq!(env.backends(kind), 0);
    assert!(
        env.host
            .qgroups()
            .iter()
            .all(|q| Some(q.subvolume_id) != vol.subvolume_id)
    );
    assert_eq!(code(&engine.volume(vol.id.as_str())), "not_found");
    assert!(engine.records().volumes.is_empty());

    // Deleting again is a no-op, and the name is free for a new volume.
    env.host.clear_calls();
    engine.delete_volume(vol.id.as_str()).unwrap();
    assert_eq!(env.host.mutating_calls(), vec![]);
    assert_ne!(create(&engine, "v", kind).id, vol.id);

    drop(engine);
    let engine = env.open();
    assert_eq!(code(&engine.volume(vol.id.as_str())), "not_found");
}

#[rstest]
fn delete_of_a_staged_volume_is_refused(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    engine.stage(vol.id.as_str(), Path::new(S1), cap(kind)).unwrap();
    env.host.clear_calls();
    let r = engine.delete_volume(vol.id.as_str());
    assert_eq!(code(&r), "failed_precondition", "{r:?}");
    assert_eq!(env.host.mutating_calls(), vec![]);
    assert_eq!(engine.volume(vol.id.as_str()).unwrap().state, VolumeState::Ready);
    assert_eq!(env.backends(kind), 1);
}

#[test]
fn a_busy_qgroup_is_retired_and_reaped_later() {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", Kind::Dir);
    let sub = vol.subvolume_id.unwrap();
    let has_qgroup = || env.host.qgroups().iter().any(|q| q.subvolume_id == sub);

    env.host.fail_next("btrfs_qgroup_destroy", libc::EBUSY);
    engine.delete_volume(vol.id.as_str()).unwrap();
    assert_eq!(env.backends(Kind::Dir), 0);
    assert!(has_qgroup());
    assert!(engine.records().volumes.is_empty());
    assert_eq!(engine.records().retired_qgroups, vec![("default".to_owned(), sub)]);

    // Still busy: kept for later.
    env.host.fail_next("btrfs_qgroup_destroy", libc::EBUSY);
    engine.reap_retired_qgroups().unwrap();
    assert!(has_qgroup());
    assert_eq!(engine.records().retired_qgroups, vec![("default".to_owned(), sub)]);

    env.host.clear_calls();
    engine.reap_retired_qgroups().unwrap();
    assert_eq!(
        env.host.mutating_calls(),
        vec![Call::BtrfsQgroupDestroy {
            mount: env.root(),
            subvolume_id: sub
        }]
    );
    assert!(!has_qgroup());
    assert!(engine.records().retired_qgroups.is_empty());

    // Forgotten durably: the next start does not destroy it again.
    drop(engine);
    env.host.clear_calls();
    let engine = env.open();
    assert_eq!(count(&env.host.calls(), "btrfs_qgroup_destroy"), 0);
    assert!(engine.records().retired_qgroups.is_empty());
}

#[test]
fn a_retired_qgroup_is_durable_and_reaped_at_the_next_start() {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", Kind::Dir);
    let sub = vol.subvolume_id.unwrap();
    env.host.fail_next("btrfs_qgroup_destroy", libc::EBUSY);
    engine.delete_volume(vol.id.as_str()).unwrap();
    drop(engine);
    env.host.clear_calls();
    let engine = env.open();
    assert_eq!(
        removals(&env.host.calls()),
        vec![Call::BtrfsQgroupDestroy {
            mount: env.root(),
            subvolume_id: sub
        }]
    );
    assert!(env.host.qgroups().iter().all(|q| q.subvolume_id != sub));
    assert!(engine.records().retired_qgroups.is_empty());
}

// ---- NodeStage / NodePublish / NodeUnpublish / NodeUnstage ----

#[rstest]
fn node_lifecycle_makes_exact_calls(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    let id = vol.id.as_str();
    let base_mounts = env.mount_table();
    let base_loops = env.loop_backings();

    env.host.clear_calls();
    engine.stage(id, Path::new(S1), cap(kind)).unwrap();
    // The pool image has the first loop device.
    let dev = p("/dev/loop1");
    let expected = match kind {
        Kind::Dir => vec![
            prepare(S1, TargetKind::Directory),
            bind(&env.subvolume(&vol.id), S1, false),
        ],
        Kind::Fs => vec![
            prepare(S1, TargetKind::Directory),
            Call::LoopAttach {
                backing: env.image(&vol.id),
                options: VOLUME_LOOP,
            },
            Call::Mkfs {
                device: dev.clone(),
                fs: FileSystem::Ext4,
            },
            Call::CreateDirAll {
                path: env.private(&vol.id),
                mode: 0o700,
            },
            Call::Mount {
                target: env.private(&vol.id),
                source: MountSource::Device {
                    device: dev.clone(),
                    fs: FileSystem::Ext4,
                },
                read_only: false,
                options: vec![],
            },
            bind(&env.private(&vol.id), S1, false),
        ],
        Kind::Block => vec![
            prepare(S1, TargetKind::Directory),
            Call::LoopAttach {
                backing: env.image(&vol.id),
                options: VOLUME_LOOP,
            },
        ],
        Kind::Tmpfs => vec![
            prepare(S1, TargetKind::Directory),
            Call::CreateDirAll {
                path: env.tmpfs(&vol.id),
                mode: 0o700,
            },
            bind(&env.tmpfs(&vol.id), S1, false),
        ],
    };
    assert_eq!(env.host.mutating_calls(), expected, "stage");
    assert!(engine.records().stages.contains_key(&vol.id));

    env.host.clear_calls();
    engine
        .publish(id, Path::new(T1), Path::new(S1), cap(kind), false)
        .unwrap();
    let source = match kind {
        Kind::Dir => env.subvolume(&vol.id),
        Kind::Fs => env.private(&vol.id),
        Kind::Block => dev.clone(),
        Kind::Tmpfs => env.tmpfs(&vol.id),
    };
    let target_kind = match kind {
        Kind::Block => TargetKind::File,
        _ => TargetKind::Directory,
    };
    assert_eq!(
        env.host.mutating_calls(),
        vec![prepare(T1, target_kind), bind(&source, T1, false)],
        "publish"
    );
    assert_eq!(engine.published_targets(&vol.id), vec![p(T1)]);

    env.host.clear_calls();
    engine.unpublish(id, Path::new(T1)).unwrap();
    assert_eq!(
        env.host.mutating_calls(),
        vec![unmount(T1), unmount(T1), Call::RemoveTarget { target: p(T1) }],
        "unpublish"
    );
    assert!(engine.published_targets(&vol.id).is_empty());

    env.host.clear_calls();
    engine.unstage(id, Path::new(S1)).unwrap();
    let expected = match kind {
        Kind::Dir | Kind::Tmpfs => vec![unmount(S1), unmount(S1)],
        Kind::Fs => vec![
            unmount(S1),
            unmount(S1),
            unmount(env.private(&vol.id)),
            unmount(env.private(&vol.id)),
            Call::RemoveDir {
                path: env.private(&vol.id),
            },
            Call::LoopDetach { device: dev.clone() },
        ],
        Kind::Block => vec![Call::LoopDetach { device: dev.clone() }],
    };
    assert_eq!(env.host.mutating_calls(), expected, "unstage");
    assert!(engine.records().stages.is_empty());
    assert_eq!(env.mount_table(), base_mounts);
    assert_eq!(env.loop_backings(), base_loops);
}

#[test]
fn a_restage_finds_the_filesystem_and_does_not_format_again() {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", Kind::Fs);
    engine.stage(vol.id.as_str(), Path::new(S1), cap(Kind::Fs)).unwrap();
    engine.unstage(vol.id.as_str(), Path::new(S1)).unwrap();
    env.host.clear_calls();
    engine.stage(vol.id.as_str(), Path::new(S1), cap(Kind::Fs)).unwrap();
    assert_eq!(count(&env.host.calls(), "mkfs"), 0);
    assert_eq!(count(&env.host.calls(), "mount"), 2);
}

#[rstest]
fn publish_read_only(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    let id = vol.id.as_str();
    engine.stage(id, Path::new(S1), cap(kind)).unwrap();
    engine
        .publish(id, Path::new(T1), Path::new(S1), cap(kind), true)
        .unwrap();
    let reader = cap_with(kind, AccessMode::SingleNodeReaderOnly);
    engine.publish(id, Path::new(T2), Path::new(S1), reader, false).unwrap();
    let ro: Vec<(PathBuf, bool)> = env
        .host
        .mounts()
        .into_iter()
        .filter(|m| m.target.starts_with("/pods"))
        .map(|m| (m.target, m.read_only))
        .collect();
    assert_eq!(ro, vec![(p(T1), true), (p(T2), true)]);
}

/// One node call in an idempotency table.
#[derive(Clone, Copy, Debug)]
enum Step {
    Stage(&'static str, AccessMode),
    Publish {
        target: &'static str,
        staging: &'static str,
        mode: AccessMode,
        read_only: bool,
    },
    Unpublish(&'static str),
    Unstage(&'static str),
}

use AccessMode::{SingleNodeReaderOnly as READER, SingleNodeSingleWriter as SINGLE, SingleNodeWriter as WRITER};

const fn stage(staging: &'static str) -> Step {
    Step::Stage(staging, WRITER)
}

const fn publish(target: &'static str) -> Step {
    publish_as(target, WRITER)
}

const fn publish_as(target: &'static str, mode: AccessMode) -> Step {
    Step::Publish {
        target,
        staging: S1,
        mode,
        read_only: false,
    }
}

fn run(engine: &Engine, id: &str, kind: Kind, step: Step) -> Result<(), EngineError> {
    match step {
        Step::Stage(staging, mode) => engine.stage(id, Path::new(staging), cap_with(kind, mode)),
        Step::Publish {
            target,
            staging,
            mode,
            read_only,
        } => engine.publish(
            id,
            Path::new(target),
            Path::new(staging),
            cap_with(kind, mode),
            read_only,
        ),
        Step::Unpublish(target) => engine.unpublish(id, Path::new(target)),
        Step::Unstage(staging) => engine.unstage(id, Path::new(staging)),
    }
}

#[rstest]
#[case::stage_twice(&[stage(S1)], stage(S1), "ok", 0)]
#[case::stage_at_another_path(&[stage(S1)], stage(S2), "failed_precondition", 0)]
#[case::stage_with_another_capability(&[stage(S1)], Step::Stage(S1, READER), "already_exists", 0)]
#[case::publish_unstaged(&[], publish(T1), "failed_precondition", 0)]
#[case::publish_from_another_staging_path(&[stage(S1)], Step::Publish { target: T1, staging: S2, mode: WRITER, read_only: false }, "failed_precondition", 0)]
#[case::publish_twice(&[stage(S1), publish(T1)], publish(T1), "ok", 0)]
#[case::publish_again_read_only(&[stage(S1), publish(T1)], Step::Publish { target: T1, staging: S1, mode: WRITER, read_only: true }, "already_exists", 0)]
#[case::publish_again_with_another_mode(&[stage(S1), publish(T1)], publish_as(T1, READER), "already_exists", 0)]
#[case::publish_a_second_target(&[stage(S1), publish(T1)], publish(T2), "ok", 1)]
#[case::single_writer_second_target(&[stage(S1), publish_as(T1, SINGLE)], publish_as(T2, SINGLE), "failed_precondition", 0)]
#[case::writer_after_single_writer(&[stage(S1), publish_as(T1, SINGLE)], publish(T2), "failed_precondition", 0)]
#[case::single_writer_after_writer(&[stage(S1), publish(T1)], publish_as(T2, SINGLE), "failed_precondition", 0)]
#[case::single_writer_same_target_again(&[stage(S1), publish_as(T1, SINGLE)], publish_as(T1, SINGLE), "ok", 0)]
#[case::unstage_while_published(&[stage(S1), publish(T1)], Step::Unstage(S1), "failed_precondition", 0)]
#[case::unstage_another_path(&[stage(S1)], Step::Unstage(S2), "failed_precondition", 0)]
#[case::unstage_twice(&[stage(S1), Step::Unstage(S1)], Step::Unstage(S1), "ok", 0)]
#[case::unstage_never_staged(&[], Step::Unstage(S1), "ok", 0)]
#[case::unpublish_never_published(&[stage(S1)], Step::Unpublish(T1), "ok", 0)]
#[case::unpublish_twice(&[stage(S1), publish(T1), Step::Unpublish(T1)], Step::Unpublish(T1), "ok", 0)]
fn node_calls_follow_the_idempotency_rules(
    #[case] setup: &[Step],
    #[case] last: Step,
    #[case] want: &str,
    #[case] mounts_added: usize,
    #[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind,
) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    let id = vol.id.as_str();
    for step in setup {
        run(&engine, id, kind, *step).unwrap();
    }
    let mounts = env.host.mounts();
    let loops = env.loop_backings();
    let records = engine.records();
    env.host.clear_calls();

    let r = run(&engine, id, kind, last);
    assert_eq!(code(&r), want, "{r:?}");
    let after = env.host.mounts();
    assert_eq!(after.len(), mounts.len() + mounts_added, "{after:#?}");
    if mounts_added == 0 {
        assert_eq!(after, mounts);
        assert_eq!(count(&env.host.calls(), "mount"), 0);
    }
    assert_eq!(env.loop_backings(), loops);
    if r.is_err() || mounts_added == 0 {
        assert_eq!(engine.records(), records);
    }
    // The records in memory are the journal's.
    drop(engine);
    if r.is_err() || mounts_added == 0 {
        assert_eq!(env.open().records(), records);
    }
}

#[rstest]
#[case::unknown("0123456789abcdef0123456789abcdef", "not_found")]
#[case::another_drivers_id("reallyfakevolumeid", "not_found")]
#[case::traversal("../../etc", "invalid")]
#[case::nul("abc\0def", "invalid")]
fn node_calls_on_a_missing_volume(#[case] id: &str, #[case] want: &str) {
    let env = Env::new();
    let engine = env.open();
    env.host.clear_calls();
    let steps = [stage(S1), publish(T1), Step::Unpublish(T1), Step::Unstage(S1)];
    for step in steps {
        let r = run(&engine, id, Kind::Dir, step);
        assert_eq!(code(&r), want, "{step:?}: {r:?}");
    }
    assert_eq!(env.host.mutating_calls(), vec![]);
}

#[rstest]
fn publish_refuses_a_symlink_target(#[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    engine.stage(vol.id.as_str(), Path::new(S1), cap(kind)).unwrap();
    env.host.add_symlink("/pods/a/evil");
    let mounts = env.host.mounts();
    let r = engine.publish(
        vol.id.as_str(),
        Path::new("/pods/a/evil"),
        Path::new(S1),
        cap(kind),
        false,
    );
    assert!(matches!(r, Err(EngineError::Host(HostError::Symlink { .. }))), "{r:?}");
    assert_eq!(env.host.mounts(), mounts);
    assert!(engine.published_targets(&vol.id).is_empty());
    // A staging path that is a symlink is refused too.
    let other = create(&engine, "w", kind);
    env.host.add_symlink("/stage/evil");
    let r = engine.stage(other.id.as_str(), Path::new("/stage/evil"), cap(kind));
    assert!(matches!(r, Err(EngineError::Host(HostError::Symlink { .. }))), "{r:?}");
    assert!(!engine.records().stages.contains_key(&other.id));
}

// ---- injected host errors ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Create,
    Stage,
    Publish,
}

#[rstest]
#[case::create_fs_image(Kind::Fs, Phase::Create, "create_image")]
#[case::create_block_image(Kind::Block, Phase::Create, "create_image")]
#[case::create_subvolume(Kind::Dir, Phase::Create, "btrfs_subvolume_create")]
#[case::create_tmpfs_mount(Kind::Tmpfs, Phase::Create, "mount")]
#[case::stage_fs_loop(Kind::Fs, Phase::Stage, "loop_attach")]
#[case::stage_block_loop(Kind::Block, Phase::Stage, "loop_attach")]
#[case::stage_fs_mkfs(Kind::Fs, Phase::Stage, "mkfs")]
#[case::stage_fs_mount(Kind::Fs, Phase::Stage, "mount")]
#[case::stage_dir_mount(Kind::Dir, Phase::Stage, "mount")]
#[case::stage_tmpfs_mount(Kind::Tmpfs, Phase::Stage, "mount")]
#[case::publish_dir_mount(Kind::Dir, Phase::Publish, "mount")]
#[case::publish_fs_mount(Kind::Fs, Phase::Publish, "mount")]
#[case::publish_block_mount(Kind::Block, Phase::Publish, "mount")]
#[case::publish_tmpfs_mount(Kind::Tmpfs, Phase::Publish, "mount")]
fn an_injected_error_leaves_no_record_and_a_retry_succeeds(#[case] kind: Kind, #[case] phase: Phase, #[case] op: &str) {
    let env = Env::new();
    let engine = env.open();
    let create = |engine: &Engine| engine.create_volume("v", params(kind), vec![cap(kind)], size(SIZE));
    let stage = |engine: &Engine, id: &VolumeId| engine.stage(id.as_str(), Path::new(S1), cap(kind));
    let publish =
        |engine: &Engine, id: &VolumeId| engine.publish(id.as_str(), Path::new(T1), Path::new(S1), cap(kind), false);
    let mut id = None;
    if phase != Phase::Create {
        id = Some(create(&engine).unwrap().id);
    }
    if phase == Phase::Publish {
        stage(&engine, id.as_ref().unwrap()).unwrap();
    }
    let records = engine.records();

    env.host.fail_next(op, libc::EIO);
    let r = match phase {
        Phase::Create => create(&engine).map(|_| ()),
        Phase::Stage => stage(&engine, id.as_ref().unwrap()),
        Phase::Publish => publish(&engine, id.as_ref().unwrap()),
    };
    assert_eq!(errno(&r), Some(libc::EIO), "{r:?}");
    assert_eq!(engine.records(), records, "no record for a failed call");
    drop(engine);
    let engine = env.open();
    assert_eq!(engine.records(), records, "nor in the journal");

    let r = match phase {
        Phase::Create => create(&engine).map(|rec| id = Some(rec.id)),
        Phase::Stage => stage(&engine, id.as_ref().unwrap()),
        Phase::Publish => publish(&engine, id.as_ref().unwrap()),
    };
    assert_eq!(code(&r), "ok", "{r:?}");
    let id = id.unwrap();
    assert_eq!(env.backends(kind), 1);
    let records = engine.records();
    assert_eq!(records.volumes.len(), 1);
    assert_eq!(records.stages.len(), usize::from(phase != Phase::Create));
    assert_eq!(records.publishes.len(), usize::from(phase == Phase::Publish));
    let at = |path: &str| env.host.mounts().iter().filter(|m| m.target == p(path)).count();
    assert_eq!(at(S1), usize::from(phase != Phase::Create && kind != Kind::Block));
    assert_eq!(at(T1), usize::from(phase == Phase::Publish));
    let image_loops = env.loop_backings().iter().filter(|b| **b == env.image(&id)).count();
    assert_eq!(
        image_loops,
        usize::from(phase != Phase::Create && matches!(kind, Kind::Fs | Kind::Block))
    );

    // Nothing is left for the next start to repair.
    let mounts = env.mount_table();
    let loops = env.loop_backings();
    let (subvolumes, files) = (env.host.subvolumes(), env.host.files());
    drop(engine);
    env.open();
    assert_eq!(env.mount_table(), mounts);
    assert_eq!(env.loop_backings(), loops);
    assert_eq!((env.host.subvolumes(), env.host.files()), (subvolumes, files));
}

#[test]

fn a_failed_qgroup_limit_leaves_no_subvolume() {
    let env = Env::new();
    let engine = env.open();
    env.host.fail_next("btrfs_qgroup_limit", libc::EIO);
    let r = engine.create_volume("v", params(Kind::Dir), vec![cap(Kind::Dir)], size(SIZE));
    assert_eq!(errno(&r), Some(libc::EIO), "{r:?}");
    assert!(engine.records().volumes.is_empty());
    assert_eq!(env.backends(Kind::Dir), 0, "the subvolume made before the limit failed");
    create(&engine, "v", Kind::Dir);
    assert_eq!(env.backends(Kind::Dir), 1);
}

// ---- start-up reconciliation ----

#[test]
fn open_removes_backends_no_record_owns() {
    let env = Env::new();
    let engine = env.open();
    let keep: Vec<VolumeRecord> = KINDS
        .iter()
        .map(|k| create(&engine, &format!("keep-{}", k.as_str()), *k))
        .collect();
    drop(engine);
    // What a crash between making the backend and committing its record leaves.
    let orphan_sub = VolumeId::generate().unwrap();
    let orphan_img = VolumeId::generate().unwrap();
    let orphan_tmpfs = VolumeId::generate().unwrap();
    let h = &env.host;
    let sub = h
        .btrfs_subvolume_create(&env.volumes_dir(), orphan_sub.as_str())
        .unwrap();
    h.create_image(&env.image(&orphan_img), SIZE, true).unwrap();
    h.create_dir_all(&env.tmpfs(&orphan_tmpfs), 0o700).unwrap();
    h.mount(&MountRequest {
        source: MountSource::Tmpfs,
        target: env.tmpfs(&orphan_tmpfs),
        read_only: false,
        options: vec![format!("size={SIZE}")],
    })
    .unwrap();
    h.clear_calls();

    let engine = env.open();
    assert_eq!(
        removals(&h.calls()),
        vec![
            // The stray-mount sweep runs first and takes the tmpfs off...
            unmount(env.tmpfs(&orphan_tmpfs)),
            unmount(env.tmpfs(&orphan_tmpfs)),
            Call::BtrfsSubvolumeDelete {
                parent: env.volumes_dir(),
                name: orphan_sub.to_string(),
            },
            Call::BtrfsQgroupDestroy {
                mount: env.root(),
                subvolume_id: sub,
            },
            Call::RemoveFile {
                path: env.image(&orphan_img)
            },
            // ...then the private-directory sweep finds it unmounted and removes its directory.
            unmount(env.tmpfs(&orphan_tmpfs)),
            Call::RemoveDir {
                path: env.tmpfs(&orphan_tmpfs)
            },
        ]
    );
    assert!(h.qgroups().iter().all(|q| q.subvolume_id != sub));
    assert!(!h.dirs().contains(&env.tmpfs(&orphan_tmpfs)));
    // The recorded volumes are untouched.
    assert_eq!(env.backends(Kind::Dir), 1);
    assert_eq!(env.backends(Kind::Fs), 2, "the fs and the block volume's images");
    assert_eq!(env.backends(Kind::Tmpfs), 1);
    assert_eq!(engine.records().volumes.len(), keep.len());
}

#[rstest]
#[case::dir(Kind::Dir, "btrfs_subvolume_delete")]
#[case::fs(Kind::Fs, "remove_file")]
#[case::block(Kind::Block, "remove_file")]
#[case::tmpfs(Kind::Tmpfs, "unmount")]
fn open_finishes_an_interrupted_delete(#[case] kind: Kind, #[case] op: &str) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    env.host.fail_next(op, libc::EIO);
    let r = engine.delete_volume(vol.id.as_str());
    assert_eq!(errno(&r), Some(libc::EIO), "{r:?}");
    assert_eq!(engine.records().volumes[&vol.id].state, VolumeState::Deleting);
    assert_eq!(code(&engine.volume(vol.id.as_str())), "not_found");
    let again = engine.create_volume("v", params(kind), vec![cap(kind)], size(SIZE));
    assert_eq!(code(&again), "already_exists", "the name is still taken while deleting");
    drop(engine);

    env.host.clear_calls();
    let engine = env.open();
    assert_eq!(env.backends(kind), 0);
    assert!(engine.records().volumes.is_empty());
    assert_ne!(create(&engine, "v", kind).id, vol.id);
    drop(engine);
    assert_eq!(env.open().records().volumes.len(), 1);
}

#[rstest]
#[case::dir(Kind::Dir)]
#[case::fs(Kind::Fs)]
#[case::tmpfs(Kind::Tmpfs)]
// Block is left out: the fake reports a bind of /dev/loopN as ext4 from /dev/root, not as a
// devtmpfs mount, so it cannot show what reconcile looks for.
fn open_unmounts_a_publish_whose_record_was_never_written(#[case] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    let id = vol.id.as_str();
    engine.stage(id, Path::new(S1), cap(kind)).unwrap();
    engine
        .publish(id, Path::new(T1), Path::new(S1), cap(kind), false)
        .unwrap();
    let recorded = env.mount_table();
    // A crash after the publish mount, before its record.
    env.host.prepare_target(Path::new(T2), TargetKind::Directory).unwrap();
    engine
        .establish_publish(&vol, Path::new(T2), &cap(kind), false)
        .unwrap();
    assert_eq!(env.mount_table().len(), recorded.len() + 1);
    drop(engine);

    env.host.clear_calls();
    let engine = env.open();
    let unmounts: Vec<Call> = env.host.calls().into_iter().filter(|c| c.op() == "unmount").collect();
    assert_eq!(unmounts, vec![unmount(T2), unmount(T2)]);
    assert_eq!(env.mount_table(), recorded);
    assert_eq!(engine.published_targets(&vol.id), vec![p(T1)]);
}

#[rstest]
fn open_undoes_a_stage_whose_record_was_never_written(
    #[values(Kind::Dir, Kind::Fs, Kind::Block, Kind::Tmpfs)] kind: Kind,
) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    let base_mounts = env.mount_table();
    let base_loops = env.loop_backings();
    // A crash after the stage mounts, before the stage record.
    env.host.prepare_target(Path::new(S1), TargetKind::Directory).unwrap();
    engine.establish_stage(&vol, Path::new(S1), &cap(kind)).unwrap();
    assert_ne!(
        (env.mount_table(), env.loop_backings()),
        (base_mounts.clone(), base_loops.clone())
    );
    drop(engine);

    let engine = env.open();
    let mut mounts = env.mount_table();
    if kind == Kind::Fs {
        // The fake derives a bind's mountinfo entry from the mount that holds its source now:
        // once the private mount is gone, the bind at S1 looks like a directory of the root
        // filesystem, not like /dev/loopN as the kernel shows it, so reconcile cannot know it.
        mounts.retain(|m| m.0 != p(S1));
    }
    assert_eq!(mounts, base_mounts);
    assert_eq!(env.loop_backings(), base_loops);
    assert!(!env.host.dirs().contains(&env.private(&vol.id)));
    assert!(engine.records().stages.is_empty());
    // And the volume stages normally afterwards.
    engine.stage(vol.id.as_str(), Path::new(S1), cap(kind)).unwrap();
}

#[test]
fn a_reboot_reestablishes_recorded_stages_and_publishes() {
    let env = Env::new();
    let engine = env.open();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let vol = create(&engine, kind.as_str(), kind);
        let id = vol.id.as_str();
        let staging = p(&format!("/stage/{i}"));
        let target = p(&format!("/pods/a/{i}"));
        engine.stage(id, &staging, cap(kind)).unwrap();
        // One read-only publish, to see that it comes back read-only.
        engine
            .publish(id, &target, &staging, cap(kind), kind == Kind::Dir)
            .unwrap();
    }
    let mounts = env.mount_table();
    let loops = env.loop_backings();
    let records = engine.records();
    assert_eq!(
        mounts.len(),
        1 + 3 + 1 + 4 + 1,
        "pool, stage binds, fs private, publishes, tmpfs"
    );
    assert_eq!(loops.len(), 3, "pool, fs, block");
    drop(engine);

    env.reboot();
    assert!(env.host.mounts().is_empty() && env.host.attached_loops().is_empty());
    let engine = env.open();
    assert_eq!(env.mount_table(), mounts);
    assert_eq!(env.loop_backings(), loops);
    assert_eq!(engine.records(), records);
    assert_eq!(count(&env.host.calls(), "mkfs"), 0, "no filesystem is formatted again");
    assert_eq!(count(&env.host.calls(), "create_image"), 0);
}

#[test]
fn a_restart_without_reboot_changes_nothing() {
    let env = Env::new();
    let engine = env.open();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let vol = create(&engine, kind.as_str(), kind);
        let staging = p(&format!("/stage/{i}"));
        engine.stage(vol.id.as_str(), &staging, cap(kind)).unwrap();
        let target = p(&format!("/pods/a/{i}"));
        engine
            .publish(vol.id.as_str(), &target, &staging, cap(kind), false)
            .unwrap();
    }
    let records = engine.records();
    drop(engine);
    env.host.clear_calls();
    let engine = env.open();
    let changes: Vec<Call> = env
        .host
        .mutating_calls()
        .into_iter()
        .filter(|c| !matches!(c.op(), "create_dir_all" | "btrfs_quota_enable" | "prepare_target"))
        .collect();
    assert_eq!(changes, vec![]);
    assert_eq!(engine.records(), records);
}

#[test]
fn open_detaches_loop_devices_no_stage_needs() {
    let env = Env::new();
    let engine = env.open();
    let staged = create(&engine, "staged", Kind::Fs);
    engine.stage(staged.id.as_str(), Path::new(S1), cap(Kind::Fs)).unwrap();
    let attached = create(&engine, "attached", Kind::Block);
    let loose = env
        .host
        .loop_attach(&env.image(&attached.id), VOLUME_LOOP)
        .unwrap()
        .device;
    // A stage that failed after attaching: no record, the device stays until a retry.
    let failed = create(&engine, "failed", Kind::Fs);
    env.host.fail_next("mount", libc::EIO);
    assert!(engine.stage(failed.id.as_str(), Path::new(S2), cap(Kind::Fs)).is_err());
    let failed_dev = env.loop_of(&env.image(&failed.id)).unwrap();
    drop(engine);

    env.host.clear_calls();
    let _engine = env.open();
    let detached: Vec<Call> = env
        .host
        .calls()
        .into_iter()
        .filter(|c| c.op() == "loop_detach")
        .collect();
    assert_eq!(
        detached,
        vec![
            Call::LoopDetach { device: loose },
            Call::LoopDetach { device: failed_dev }
        ]
    );
    let mut want = vec![env.pool_image(), env.image(&staged.id)];
    want.sort();
    assert_eq!(env.loop_backings(), want);
}

#[rstest]
#[case::dir(Kind::Dir)]
#[case::fs(Kind::Fs)]
#[case::tmpfs(Kind::Tmpfs)]

fn a_vanished_staging_path_leaves_no_mounts_behind(#[case] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let vol = create(&engine, "v", kind);
    let base_mounts = env.mount_table();
    engine.stage(vol.id.as_str(), Path::new(S1), cap(kind)).unwrap();
    engine
        .publish(vol.id.as_str(), Path::new(T1), Path::new(S1), cap(kind), false)
        .unwrap();
    drop(engine);
    // Someone takes the staging path away while the publish stays mounted.
    while env.host.unmount(Path::new(S1)).unwrap() == Unmounted::Removed {}
    env.host.remove_target(Path::new(S1)).unwrap();

    let engine = env.open();
    assert!(engine.records().stages.is_empty());
    assert!(engine.records().publishes.is_empty());
    assert_eq!(env.mount_table(), base_mounts, "mounts left that no record owns");
}

/// A mount busy for a moment (a child between fork and exec holding a copy of a descriptor) is
/// unmounted on a retry; one that stays busy is refused as FailedPrecondition and stays
/// published, so that the CO's retry finds it.
#[test]
fn unpublish_retries_a_briefly_busy_mount_and_refuses_a_busy_one() {
    let env = Env::new();
    let engine = env.open();
    let v = create(&engine, "v", Kind::Dir);
    engine.stage(v.id.as_str(), Path::new(S1), cap(Kind::Dir)).unwrap();
    engine
        .publish(v.id.as_str(), Path::new(T1), Path::new(S1), cap(Kind::Dir), false)
        .unwrap();
    for _ in 0..6 {
        env.host.fail_next("unmount", libc::EBUSY);
    }
    let r = engine.unpublish(v.id.as_str(), Path::new(T1));
    // (The CSI layer answers this error FailedPrecondition, "still in use".)
    assert!(
        matches!(&r, Err(EngineError::Host(e)) if e.errno() == Some(libc::EBUSY)),
        "{r:?}"
    );
    assert_eq!(engine.published_targets(&v.id), vec![p(T1)]);
    // Busy twice, then free: the same call succeeds.
    env.host.fail_next("unmount", libc::EBUSY);
    env.host.fail_next("unmount", libc::EBUSY);
    let r = engine.unpublish(v.id.as_str(), Path::new(T1));
    assert_eq!(code(&r), "ok", "{r:?}");
    assert!(engine.published_targets(&v.id).is_empty());
    assert!(env.mount_table().iter().all(|m| m.0 != Path::new(T1)));
}

#[rstest]

fn unpublish_leaves_another_volumes_mount_alone(#[values(Kind::Dir, Kind::Fs, Kind::Tmpfs)] kind: Kind) {
    let env = Env::new();
    let engine = env.open();
    let a = create(&engine, "a", kind);
    let b = create(&engine, "b", kind);
    engine.stage(a.id.as_str(), Path::new(S1), cap(kind)).unwrap();
    engine
        .publish(a.id.as_str(), Path::new(T1), Path::new(S1), cap(kind), false)
        .unwrap();
    let mounts = env.mount_table();
    let r = engine.unpublish(b.id.as_str(), Path::new(T1));
    assert_eq!(code(&r), "ok", "{r:?}");
    assert_eq!(env.mount_table(), mounts, "volume a is still published at T1");
    assert_eq!(engine.published_targets(&a.id), vec![p(T1)]);
}

// ---- spare subvolumes ----

/// The parts of a record that do not depend on which create made it.
fn shape(v: &VolumeRecord) -> VolumeRecord {
    VolumeRecord {
        id: VolumeId::parse("00000000000000000000000000000000").unwrap(),
        name: String::new(),
        subvolume_id: v.subvolume_id.map(|_| 0),
        created_unix: 0,
        ..v.clone()
    }
}

#[test]
fn spares_are_empty_nocow_subvolumes_without_a_limit() {
    let env = Env::new();
    let engine = env.open_with_spares(3);
    let spares = env.spare_subvolumes();
    assert_eq!(spares.len(), 3);
    assert_eq!(engine.spares.ready(crate::DEFAULT_POOL).len(), 3);
    for (path, sub) in &spares {
        assert!(env.host.nocow(path), "{}", path.display());
        let q = env.host.qgroups().into_iter().find(|q| q.subvolume_id == *sub);
        assert_eq!(
            q.map(|q| q.max_referenced),
            Some(None),
            "qgroup 0/{sub} exists, unlimited"
        );
        assert!(env.host.files().keys().all(|f| !f.starts_with(path)), "empty");
    }
    assert_eq!(env.backends(Kind::Dir), 0, "no volume yet");
    assert!(engine.records().volumes.is_empty());
}

#[test]
fn a_dir_create_takes_a_spare_and_only_renames_and_limits() {
    let env = Env::new();
    let engine = env.open_with_spares(2);
    let before = env.spare_subvolumes();
    env.host.clear_calls();
    let vol = create(&engine, "v", Kind::Dir);
    let calls = env.host.mutating_calls();
    let sub = vol.subvolume_id.unwrap();
    let (spare, _) = before
        .iter()
        .find(|(_, id)| **id == sub)
        .expect("the volume is one of the spares");
    assert_eq!(
        calls,
        vec![
            Call::BtrfsSubvolumeRename {
                from_parent: env.spares_dir(),
                from_name: spare.file_name().unwrap().to_string_lossy().into_owned(),
                to_parent: env.volumes_dir(),
                to_name: vol.id.to_string(),
            },
            Call::BtrfsQgroupLimit {
                mount: env.root(),
                subvolume_id: sub,
                max_referenced: Some(SIZE),
            },
        ]
    );
    assert_eq!(
        count(&env.host.calls(), "btrfs_subvolume_create"),
        0,
        "no create on the critical path"
    );
    assert!(env.host.nocow(&env.subvolume(&vol.id)), "NOCOW came with the spare");
    let q = env.host.qgroups().into_iter().find(|q| q.subvolume_id == sub).unwrap();
    assert_eq!(q.max_referenced, Some(SIZE));
    assert_eq!(env.spare_subvolumes().len(), 1);
    assert_eq!(engine.spares.ready(crate::DEFAULT_POOL).len(), 1);

    // The refill makes one more in spares/, never in volumes/.
    env.host.clear_calls();
    engine.spares.top_up();
    assert_eq!(count(&env.host.calls(), "btrfs_subvolume_create"), 1);
    assert_eq!(env.spare_subvolumes().len(), 2);
    assert_eq!(env.backends(Kind::Dir), 1);

    // Durable like any other create.
    drop(engine);
    let engine = env.open();
    assert_eq!(engine.volume(vol.id.as_str()).unwrap(), vol);
}

#[test]
fn without_a_ready_spare_a_create_makes_its_own_with_the_same_result() {
    let env = Env::new();
    let engine = env.open_with_spares(1);
    let from_spare = create(&engine, "a", Kind::Dir);
    env.host.clear_calls();
    let inline = create(&engine, "b", Kind::Dir);
    assert_eq!(
        env.host.mutating_calls(),
        vec![
            Call::BtrfsSubvolumeCreate {
                parent: env.volumes_dir(),
                name: inline.id.to_string(),
            },
            Call::BtrfsQgroupLimit {
                mount: env.root(),
                subvolume_id: inline.subvolume_id.unwrap(),
                max_referenced: Some(SIZE),
            },
            Call::SetNocow {
                path: env.subvolume(&inline.id),
                on: true,
            },
        ]
    );
    assert_eq!(shape(&from_spare), shape(&inline), "same record either way");
    for v in [&from_spare, &inline] {
        assert!(env.host.nocow(&env.subvolume(&v.id)));
        let q = env
            .host
            .qgroups()
            .into_iter()
            .find(|q| Some(q.subvolume_id) == v.subvolume_id);
        assert_eq!(q.unwrap().max_referenced, Some(SIZE));
    }
    assert_eq!(env.backends(Kind::Dir), 2);
    assert!(env.spare_subvolumes().is_empty());
}

#[test]
fn a_failed_limit_after_taking_a_spare_removes_the_subvolume() {
    let env = Env::new();
    let engine = env.open_with_spares(2);
    env.host.clear_calls();
    env.host.fail_next("btrfs_qgroup_limit", libc::EIO);
    let r = engine.create_volume("v", params(Kind::Dir), vec![cap(Kind::Dir)], size(SIZE));
    assert_eq!(errno(&r), Some(libc::EIO), "{r:?}");
    let calls = env.host.calls();
    let Some(Call::BtrfsSubvolumeRename { to_name, .. }) = calls.iter().find(|c| c.op() == "btrfs_subvolume_rename")
    else {
        panic!("no rename in {calls:?}");
    };
    let Some(Call::BtrfsQgroupLimit { subvolume_id: sub, .. }) = calls.iter().find(|c| c.op() == "btrfs_qgroup_limit")
    else {
        panic!("no limit in {calls:?}");
    };
    assert_eq!(
        removals(&calls),
        vec![
            Call::BtrfsSubvolumeDelete {
                parent: env.volumes_dir(),
                name: to_name.clone(),
            },
            Call::BtrfsQgroupDestroy {
                mount: env.root(),
                subvolume_id: *sub,
            },
        ]
    );
    assert!(engine.records().volumes.is_empty());
    assert_eq!(env.backends(Kind::Dir), 0);
    assert!(env.host.qgroups().iter().all(|q| q.subvolume_id != *sub));
    assert_eq!(env.spare_subvolumes().len(), 1, "the other spare is still there");
    // A retry takes the other spare.
    let vol = create(&engine, "v", Kind::Dir);
    assert_eq!(env.backends(Kind::Dir), 1);
    assert!(env.spare_subvolumes().is_empty());
    assert!(env.host.nocow(&env.subvolume(&vol.id)));
}

#[test]
fn a_failed_rename_discards_the_spare_and_makes_the_subvolume_inline() {
    let env = Env::new();
    let engine = env.open_with_spares(1);
    let (spare, spare_sub) = env.spare_subvolumes().into_iter().next().unwrap();
    env.host.clear_calls();
    env.host.fail_next("btrfs_subvolume_rename", libc::EIO);
    let vol = create(&engine, "v", Kind::Dir);
    assert_ne!(vol.subvolume_id, Some(spare_sub));
    assert_eq!(
        removals(&env.host.calls()),
        vec![
            Call::BtrfsSubvolumeDelete {
                parent: env.spares_dir(),
                name: spare.file_name().unwrap().to_string_lossy().into_owned(),
            },
            Call::BtrfsQgroupDestroy {
                mount: env.root(),
                subvolume_id: spare_sub,
            },
        ]
    );
    assert!(env.spare_subvolumes().is_empty());
    assert!(env.host.qgroups().iter().all(|q| q.subvolume_id != spare_sub));
    assert_eq!(count(&env.host.calls(), "btrfs_subvolume_create"), 1);
    assert!(env.host.nocow(&env.subvolume(&vol.id)));
}

#[test]
fn open_removes_spares_an_earlier_run_left() {
    let env = Env::new();
    let engine = env.open();
    let keep = create(&engine, "keep", Kind::Dir);
    drop(engine);
    // What a crash leaves: ready spares, and one made but not yet NOCOW.
    let h = &env.host;
    let ready = h.btrfs_subvolume_create(&env.spares_dir(), "0123").unwrap();
    h.set_nocow(&env.spares_dir().join("0123"), true).unwrap();
    let half = h.btrfs_subvolume_create(&env.spares_dir(), "4567").unwrap();
    h.clear_calls();

    let engine = env.open_with_spares(0);
    assert_eq!(
        removals(&h.calls()),
        vec![
            Call::BtrfsSubvolumeDelete {
                parent: env.spares_dir(),
                name: "0123".into(),
            },
            Call::BtrfsQgroupDestroy {
                mount: env.root(),
                subvolume_id: ready,
            },
            Call::BtrfsSubvolumeDelete {
                parent: env.spares_dir(),
                name: "4567".into(),
            },
            Call::BtrfsQgroupDestroy {
                mount: env.root(),
                subvolume_id: half,
            },
        ]
    );
    assert!(env.spare_subvolumes().is_empty());
    assert!(
        h.qgroups()
            .iter()
            .all(|q| q.subvolume_id != ready && q.subvolume_id != half)
    );
    assert_eq!(engine.volume(keep.id.as_str()).unwrap(), keep);
    assert_eq!(env.backends(Kind::Dir), 1);
}

#[test]
fn a_busy_spare_qgroup_is_retired_at_open() {
    let env = Env::new();
    drop(env.open());
    let sub = env.host.btrfs_subvolume_create(&env.spares_dir(), "0123").unwrap();
    env.host.fail_next("btrfs_qgroup_destroy", libc::EBUSY);
    env.host.fail_next("btrfs_qgroup_destroy", libc::EBUSY);
    let engine = env.open();
    assert!(env.spare_subvolumes().is_empty());
    assert_eq!(engine.records().retired_qgroups, vec![("default".to_owned(), sub)]);
    engine.reap_retired_qgroups().unwrap();
    assert!(engine.records().retired_qgroups.is_empty());
    assert!(env.host.qgroups().iter().all(|q| q.subvolume_id != sub));
}

#[test]
fn dropping_the_engine_removes_its_spares() {
    let env = Env::new();
    let engine = env.open_with_spares(3);
    let vol = create(&engine, "v", Kind::Dir);
    let spares = env.spare_subvolumes();
    assert_eq!(spares.len(), 2);
    env.host.clear_calls();
    drop(engine);
    assert_eq!(count(&env.host.calls(), "btrfs_subvolume_delete"), 2);
    assert!(env.spare_subvolumes().is_empty());
    for sub in spares.values() {
        assert!(env.host.qgroups().iter().all(|q| q.subvolume_id != *sub));
    }
    // The volume that took a spare is not a spare any more.
    assert_eq!(env.backends(Kind::Dir), 1);
    assert_eq!(env.open().volume(vol.id.as_str()).unwrap(), vol);
}

#[test]
fn the_refill_thread_keeps_each_pool_at_its_target() {
    let env = Env::new();
    let cfg = EngineConfig {
        spare_subvolumes: 2,
        ..env.config()
    };
    let engine = Engine::open(env.host.clone(), cfg).unwrap();
    let ready = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while engine.spares.ready(crate::DEFAULT_POOL).len() != n {
            assert!(std::time::Instant::now() < deadline, "spares never reached {n}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    ready(2);
    let vols: Vec<VolumeRecord> = (0..5).map(|i| create(&engine, &format!("v{i}"), Kind::Dir)).collect();
    ready(2);
    assert_eq!(env.spare_subvolumes().len(), 2, "never more than the target");
    assert_eq!(env.backends(Kind::Dir), 5);
    for v in &vols {
        assert!(env.host.nocow(&env.subvolume(&v.id)));
        let q = env
            .host
            .qgroups()
            .into_iter()
            .find(|q| Some(q.subvolume_id) == v.subvolume_id);
        assert_eq!(q.unwrap().max_referenced, Some(SIZE));
    }
    drop(engine);
    assert!(env.spare_subvolumes().is_empty(), "a stopped engine leaves no spare");
    assert_eq!(env.backends(Kind::Dir), 5);
}

#[test]
fn teardown_removes_spares_a_crash_left() {
    let env = Env::new();
    drop(env.open());
    env.host.btrfs_subvolume_create(&env.spares_dir(), "0123").unwrap();
    env.host.btrfs_subvolume_create(&env.spares_dir(), "4567").unwrap();
    crate::teardown::teardown(env.host.as_ref(), &env.data).unwrap();
    assert!(env.spare_subvolumes().is_empty());
    assert!(env.mount_table().is_empty(), "and the pool is unmounted");
}
