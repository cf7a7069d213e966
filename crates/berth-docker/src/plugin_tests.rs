//! The executor against a fake engine: mount counting, restarts, removal and crash repair.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_storage::engine::EngineError;

use super::*;
use crate::backend::{Backend, BackendSnapshot, BackendVolume, Origin};
use crate::options::{VolumeName, VolumeOptions};
use crate::request::{Action, MountId};
use crate::response::Reply;
use crate::store::{Entry, EntryState, Store};

#[derive(Debug, Default)]
struct FakeState {
    volumes: BTreeMap<String, BackendVolume>,
    staged: BTreeMap<String, PathBuf>,
    calls: Vec<String>,
    next: u32,
    fail_create: bool,
    snapshots: Vec<BackendSnapshot>,
}

/// Remembers volumes and stages like the engine does (they survive a plugin restart) and
/// records every mutating call.
#[derive(Debug, Default)]
struct FakeBackend(Mutex<FakeState>);

impl FakeBackend {
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().calls)
    }

    fn add(&self, name: &str) -> String {
        let mut s = self.0.lock().unwrap();
        s.next += 1;
        let id = format!("{:032x}", s.next);
        s.volumes.insert(
            id.clone(),
            BackendVolume {
                id: id.clone(),
                name: name.into(),
                kind: "dir".into(),
                pool: "default".into(),
                fstype: None,
                capacity: 64 << 20,
                created_unix: 1_700_000_000,
            },
        );
        id
    }
}

impl Backend for FakeBackend {
    fn create(
        &self,
        name: &str,
        parameters: BTreeMap<String, String>,
        size: Option<u64>,
        origin: Option<Origin>,
    ) -> std::result::Result<BackendVolume, EngineError> {
        if self.0.lock().unwrap().fail_create {
            return Err(EngineError::ResourceExhausted("pool is full".into()));
        }
        if let Some(v) = self.volume_by_name(name) {
            return Ok(v);
        }
        let id = self.add(name);
        let mut s = self.0.lock().unwrap();
        let v = s.volumes.get_mut(&id).unwrap();
        v.kind = parameters["kind"].clone();
        v.fstype = parameters.get("csi.storage.k8s.io/fstype").cloned();
        v.capacity = size.unwrap_or(1 << 30);
        let v = v.clone();
        s.calls.push(match origin {
            None => format!("create {name}"),
            Some(Origin::Volume(src)) => format!("create {name} from volume {src}"),
            Some(Origin::Snapshot(src)) => format!("create {name} from snapshot {src}"),
        });
        Ok(v)
    }

    fn snapshot(&self, id_or_name: &str) -> std::result::Result<Option<BackendSnapshot>, EngineError> {
        let s = self.0.lock().unwrap();
        Ok(s.snapshots
            .iter()
            .find(|x| x.id == id_or_name || x.name == id_or_name)
            .cloned())
    }

    fn create_snapshot(&self, name: &str, volume_id: &str) -> std::result::Result<BackendSnapshot, EngineError> {
        let mut s = self.0.lock().unwrap();
        let Some(v) = s.volumes.get(volume_id).cloned() else {
            return Err(EngineError::NotFound(format!("volume {volume_id}")));
        };
        s.next += 1;
        let snap = BackendSnapshot {
            id: format!("{:032x}", s.next),
            name: name.into(),
            kind: v.kind.clone(),
            fstype: v.fstype.clone(),
            size: v.capacity,
            source_volume_id: v.id.clone(),
            created_unix: 1_700_000_000,
        };
        s.snapshots.push(snap.clone());
        s.calls.push(format!("snapshot {name} of {volume_id}"));
        Ok(snap)
    }

    fn snapshots_of(&self, volume_id: &str) -> std::result::Result<Vec<BackendSnapshot>, EngineError> {
        let s = self.0.lock().unwrap();
        Ok(s.snapshots
            .iter()
            .filter(|x| x.source_volume_id == volume_id)
            .cloned()
            .collect())
    }

    fn delete_snapshot(&self, id: &str) -> std::result::Result<(), EngineError> {
        let mut s = self.0.lock().unwrap();
        s.snapshots.retain(|x| x.id != id);
        s.calls.push(format!("delete snapshot {id}"));
        Ok(())
    }

    fn volume(&self, id: &str) -> std::result::Result<Option<BackendVolume>, EngineError> {
        Ok(self.0.lock().unwrap().volumes.get(id).cloned())
    }

    fn volume_by_name(&self, name: &str) -> Option<BackendVolume> {
        self.0
            .lock()
            .unwrap()
            .volumes
            .values()
            .find(|v| v.name == name)
            .cloned()
    }

    fn delete(&self, id: &str) -> std::result::Result<(), EngineError> {
        let mut s = self.0.lock().unwrap();
        if s.staged.contains_key(id) {
            return Err(EngineError::FailedPrecondition("staged".into()));
        }
        s.volumes.remove(id);
        s.calls.push(format!("delete {id}"));
        Ok(())
    }

    fn stage(&self, id: &str, path: &Path) -> std::result::Result<(), EngineError> {
        std::fs::create_dir_all(path).unwrap();
        let mut s = self.0.lock().unwrap();
        s.staged.insert(id.into(), path.into());
        s.calls.push(format!("stage {id}"));
        Ok(())
    }

    fn unstage(&self, id: &str, _path: &Path) -> std::result::Result<(), EngineError> {
        let mut s = self.0.lock().unwrap();
        s.staged.remove(id);
        s.calls.push(format!("unstage {id}"));
        Ok(())
    }

    fn staged_at(&self, id: &str) -> Option<PathBuf> {
        self.0.lock().unwrap().staged.get(id).cloned()
    }

    fn used_bytes(&self, _id: &str) -> Option<u64> {
        Some(4096)
    }
}

struct Rig {
    dir: tempfile::TempDir,
    fake: Arc<FakeBackend>,
    plugin: Option<Plugin>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeBackend::default());
        let mut rig = Rig {
            dir,
            fake,
            plugin: None,
        };
        rig.restart();
        rig
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("docker.redb")
    }

    fn mounts_dir(&self) -> PathBuf {
        self.dir.path().join("docker/mounts")
    }

    /// Drops the plugin (releasing its store) and opens a new one, like a process restart.
    fn restart(&mut self) {
        self.plugin = None;
        let backend: Arc<dyn Backend> = self.fake.clone();
        self.plugin = Some(Plugin::open(backend, &self.store_path(), self.mounts_dir()).unwrap());
    }

    fn p(&self) -> &Plugin {
        self.plugin.as_ref().unwrap()
    }

    fn run(&self, a: Action) -> Result<Reply> {
        self.p().execute(a)
    }

    fn create(&self, name: &str) {
        self.run(Action::Create {
            name: n(name),
            options: VolumeOptions::parse(&BTreeMap::from([("size".to_owned(), "64M".to_owned())])).unwrap(),
        })
        .unwrap();
    }

    fn mount(&self, name: &str, id: &str) -> String {
        match self
            .run(Action::Mount {
                name: n(name),
                id: m(id),
            })
            .unwrap()
        {
            Reply::Mountpoint(p) => p,
            other => panic!("{other:?}"),
        }
    }

    fn unmount(&self, name: &str, id: &str) {
        self.run(Action::Unmount {
            name: n(name),
            id: m(id),
        })
        .unwrap();
    }

    fn id_of(&self, name: &str) -> String {
        self.fake.volume_by_name(name).unwrap().id
    }
}

fn n(s: &str) -> VolumeName {
    VolumeName::parse(s).unwrap()
}

fn m(s: &str) -> MountId {
    MountId::parse(s).unwrap()
}

#[test]
fn create_then_get_and_list() {
    let rig = Rig::new();
    rig.create("v1");
    assert_eq!(rig.fake.calls(), vec!["create v1"]);
    let Reply::Volume(v) = rig.run(Action::Get { name: n("v1") }).unwrap() else {
        panic!()
    };
    assert_eq!(v.name, "v1");
    assert_eq!(v.mountpoint, "");
    assert_eq!(v.created_at.as_deref(), Some("2023-11-14T22:13:20Z"));
    assert_eq!(v.status["kind"], "fs");
    assert_eq!(v.status["pool"], "default");
    assert_eq!(v.status["size"], "64 MiB");
    assert_eq!(v.status["sizeBytes"], 64u64 << 20);
    let Reply::List(items) = rig.run(Action::List).unwrap() else {
        panic!()
    };
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].name, "v1");
}

#[test]
fn names_the_plugin_does_not_own_are_not_found_without_asking_the_engine() {
    let rig = Rig::new();
    for a in [Action::Get { name: n("anon123") }, Action::Path { name: n("anon123") }] {
        let err = rig.run(a).unwrap_err();
        assert_eq!(err.to_string(), "no such volume: anon123");
    }
    assert!(matches!(
        rig.run(Action::Mount {
            name: n("anon123"),
            id: m("x1")
        }),
        Err(PluginError::NoSuchVolume(_))
    ));
    assert!(rig.fake.calls().is_empty());
}

#[test]
fn two_ids_share_one_backend_mount_until_both_are_gone() {
    let rig = Rig::new();
    rig.create("v1");
    let id = rig.id_of("v1");
    rig.fake.calls();
    let mp = rig.mount("v1", "a");
    assert_eq!(mp, rig.mounts_dir().join(&id).to_string_lossy());
    assert_eq!(rig.mount("v1", "b"), mp);
    // `docker cp` mounts the same ID again.
    assert_eq!(rig.mount("v1", "b"), mp);
    assert_eq!(rig.fake.calls(), vec![format!("stage {id}")]);
    assert_eq!(rig.p().store.total_mounts("v1"), 3);
    let Reply::Mountpoint(p) = rig.run(Action::Path { name: n("v1") }).unwrap() else {
        panic!()
    };
    assert_eq!(p, mp);

    rig.unmount("v1", "b");
    rig.unmount("v1", "a");
    assert!(rig.fake.calls().is_empty(), "b still holds one mount");
    rig.unmount("v1", "b");
    assert_eq!(rig.fake.calls(), vec![format!("unstage {id}")]);
    assert!(!Path::new(&mp).exists(), "the mount point directory is removed");
    let Reply::Mountpoint(p) = rig.run(Action::Path { name: n("v1") }).unwrap() else {
        panic!()
    };
    assert_eq!(p, "");
}

#[test]
fn counts_survive_a_restart() {
    let mut rig = Rig::new();
    rig.create("v1");
    let id = rig.id_of("v1");
    rig.mount("v1", "a");
    rig.mount("v1", "b");
    rig.fake.calls();
    rig.restart();
    assert!(rig.fake.calls().is_empty(), "a restart leaves mounts alone");
    let Reply::List(items) = rig.run(Action::List).unwrap() else {
        panic!()
    };
    assert!(items[0].mountpoint.ends_with(&id));
    rig.unmount("v1", "a");
    assert!(rig.fake.calls().is_empty());
    rig.unmount("v1", "b");
    assert_eq!(rig.fake.calls(), vec![format!("unstage {id}")]);
}

#[test]
fn an_unknown_mount_id_never_takes_another_ids_mount() {
    let rig = Rig::new();
    rig.create("v1");
    let id = rig.id_of("v1");
    rig.mount("v1", "live");
    rig.fake.calls();
    rig.unmount("v1", "old-id-from-before-a-restart");
    assert!(rig.fake.calls().is_empty());
    assert_eq!(rig.p().store.total_mounts("v1"), 1);
    rig.unmount("v1", "live");
    assert_eq!(rig.fake.calls(), vec![format!("unstage {id}")]);
    // Replays and unknown IDs on an idle volume are harmless.
    rig.unmount("v1", "live");
    rig.unmount("v1", "other");
    rig.unmount("never-created", "x");
    assert!(rig.fake.calls().is_empty());
}

#[test]
fn an_unknown_id_unstages_a_volume_nothing_holds() {
    // The backend is staged but no count says so (counts were lost): the next Unmount, whatever
    // its ID, releases it.
    let rig = Rig::new();
    rig.create("v1");
    let id = rig.id_of("v1");
    let mp = rig.p().mountpoint(&id).unwrap();
    rig.fake.stage(&id, &mp).unwrap();
    rig.fake.calls();
    rig.unmount("v1", "lost");
    assert_eq!(rig.fake.calls(), vec![format!("unstage {id}")]);
}

#[test]
fn remove_is_refused_while_in_use_and_then_deletes_everything() {
    let rig = Rig::new();
    rig.create("v1");
    let id = rig.id_of("v1");
    rig.mount("v1", "a");
    let err = rig.run(Action::Remove { name: n("v1") }).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    rig.unmount("v1", "a");
    rig.fake.calls();
    rig.run(Action::Remove { name: n("v1") }).unwrap();
    assert_eq!(rig.fake.calls(), vec![format!("delete {id}")]);
    assert!(matches!(
        rig.run(Action::Get { name: n("v1") }),
        Err(PluginError::NoSuchVolume(_))
    ));
    // Removing again is success (Docker may retry).
    rig.run(Action::Remove { name: n("v1") }).unwrap();
    assert_eq!(std::fs::read_dir(rig.mounts_dir()).unwrap().count(), 0);
}

#[test]
fn a_name_used_by_a_csi_volume_is_refused() {
    let rig = Rig::new();
    let id = rig.fake.add("pvc-data");
    let err = rig
        .run(Action::Create {
            name: n("pvc-data"),
            options: VolumeOptions::parse(&BTreeMap::new()).unwrap(),
        })
        .unwrap_err();
    assert!(err.to_string().contains(&id), "{err}");
    // And it is not Docker's: Get and List do not show it.
    assert!(rig.run(Action::Get { name: n("pvc-data") }).is_err());
}

fn create_from(rig: &Rig, name: &str, kv: &[(&str, &str)]) -> Result<Reply> {
    let opts = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    rig.run(Action::Create {
        name: n(name),
        options: VolumeOptions::parse(&opts).unwrap(),
    })
}

#[test]
fn clones_take_their_sources_kind_and_size() {
    let rig = Rig::new();
    create_from(&rig, "src", &[("kind", "fs"), ("fstype", "xfs"), ("size", "400M")]).unwrap();
    let src = rig.fake.volume_by_name("src").unwrap();
    rig.fake.calls();
    create_from(&rig, "copy", &[("from", "src")]).unwrap();
    assert_eq!(rig.fake.calls(), vec![format!("create copy from volume {}", src.id)]);
    let copy = rig.fake.volume_by_name("copy").unwrap();
    assert_eq!(
        (copy.kind.as_str(), copy.fstype.as_deref(), copy.capacity),
        ("fs", Some("xfs"), 400 << 20)
    );
    // A larger clone is fine; a source Docker does not own is not.
    create_from(&rig, "bigger", &[("from", "src"), ("size", "1G")]).unwrap();
    assert_eq!(rig.fake.volume_by_name("bigger").unwrap().capacity, 1 << 30);
    rig.fake.add("csi-only");
    let err = create_from(&rig, "nope", &[("from", "csi-only")]).unwrap_err();
    assert!(err.to_string().contains("no such volume: csi-only"), "{err}");
}

#[test]
fn restores_find_snapshots_by_id_or_name() {
    let rig = Rig::new();
    rig.fake.0.lock().unwrap().snapshots.push(BackendSnapshot {
        id: "5".repeat(32),
        name: "snap-1".into(),
        kind: "dir".into(),
        fstype: None,
        size: 10 << 20,
        source_volume_id: "gone".into(),
        created_unix: 0,
    });
    create_from(&rig, "restored", &[("fromSnapshot", "snap-1")]).unwrap();
    assert_eq!(
        rig.fake.calls(),
        vec![format!("create restored from snapshot {}", "5".repeat(32))]
    );
    let v = rig.fake.volume_by_name("restored").unwrap();
    assert_eq!((v.kind.as_str(), v.capacity), ("dir", 10 << 20));
    let err = create_from(&rig, "r2", &[("fromSnapshot", "missing")]).unwrap_err();
    assert!(err.to_string().contains("no such snapshot: missing"), "{err}");
    assert_eq!(rig.p().store.entry("r2"), None);
}

#[test]
fn a_failed_create_leaves_no_name_behind() {
    let rig = Rig::new();
    rig.fake.0.lock().unwrap().fail_create = true;
    let err = rig
        .run(Action::Create {
            name: n("v1"),
            options: VolumeOptions::parse(&BTreeMap::new()).unwrap(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("pool is full"), "{err}");
    assert_eq!(rig.p().store.entry("v1"), None);
}

#[test]
fn start_up_repairs_interrupted_creates_and_removes_and_stray_mounts() {
    let mut rig = Rig::new();
    rig.create("idle");
    rig.create("busy");
    let idle = rig.id_of("idle");
    let busy = rig.id_of("busy");
    let adopted = rig.fake.add("half-made");
    let doomed = rig.fake.add("half-removed");
    rig.mount("busy", "a");
    // What a crash can leave: the idle volume staged without a count, the busy one's stage lost
    // (engine reconcile forgot it), a create and a remove cut short, a stray directory.
    rig.fake.stage(&idle, &rig.p().mountpoint(&idle).unwrap()).unwrap();
    rig.fake.0.lock().unwrap().staged.remove(&busy);
    {
        let store = &rig.p().store;
        let creating = Entry {
            state: EntryState::Creating,
            volume_id: String::new(),
        };
        store.put_entry("half-made", &creating).unwrap();
        store.put_entry("made-nothing", &creating).unwrap();
        let removing = Entry {
            state: EntryState::Removing,
            volume_id: doomed.clone(),
        };
        store.put_entry("half-removed", &removing).unwrap();
    }
    std::fs::create_dir_all(rig.mounts_dir().join("stray")).unwrap();
    rig.fake.calls();

    rig.restart();
    let mut calls = rig.fake.calls();
    calls.sort();
    let mut want = vec![
        format!("stage {busy}"),
        format!("unstage {idle}"),
        format!("delete {doomed}"),
    ];
    want.sort();
    assert_eq!(calls, want);
    let store = &rig.p().store;
    assert_eq!(store.entry("half-made").map(|e| e.volume_id), Some(adopted));
    assert_eq!(store.entry("made-nothing"), None);
    assert_eq!(store.entry("half-removed"), None);
    assert!(!rig.mounts_dir().join("stray").exists());
    assert!(!rig.mounts_dir().join(&idle).exists());
}

#[test]
fn a_second_plugin_on_the_same_store_is_refused() {
    let rig = Rig::new();
    let backend: Arc<dyn Backend> = rig.fake.clone();
    assert!(Plugin::open(backend, &rig.store_path(), rig.mounts_dir()).is_err());
    // The first one still serves.
    assert!(Store::open(&rig.store_path()).is_err());
    rig.create("v1");
}

#[test]
fn snapshots_of_docker_volumes_are_taken_listed_shown_and_removed() {
    let rig = Rig::new();
    rig.create("v1");
    let id = rig.id_of("v1");
    rig.fake.calls();
    let Reply::Snapshot(s) = rig
        .run(Action::SnapshotCreate {
            volume: n("v1"),
            name: "before-upgrade".into(),
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (s.name.as_str(), s.volume.as_str(), s.size_bytes),
        ("before-upgrade", "v1", 64 << 20)
    );
    assert_eq!(rig.fake.calls(), vec![format!("snapshot before-upgrade of {id}")]);
    let Reply::Snapshots(all) = rig.run(Action::SnapshotList { volume: n("v1") }).unwrap() else {
        panic!()
    };
    assert_eq!(all, vec![s.clone()]);
    let Reply::Volume(v) = rig.run(Action::Get { name: n("v1") }).unwrap() else {
        panic!()
    };
    assert_eq!(v.status["snapshots"], serde_json::json!(["before-upgrade"]));
    create_from(&rig, "v2", &[("fromSnapshot", "before-upgrade")]).unwrap();
    rig.run(Action::SnapshotRemove {
        name: "before-upgrade".into(),
    })
    .unwrap();
    rig.run(Action::SnapshotRemove {
        name: "before-upgrade".into(),
    })
    .unwrap();
    assert!(matches!(
        rig.run(Action::SnapshotCreate {
            volume: n("nope"),
            name: "s".into()
        }),
        Err(PluginError::NoSuchVolume(_))
    ));
}
