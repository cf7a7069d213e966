//! The plugin's own durable state, `DATA/docker.redb`: which engine volumes are Docker's, and
//! how many times each (volume name, mount ID) is mounted.
//!
//! Docker forgets nothing across a plugin restart and expects the plugin not to either: List
//! is authoritative for `docker volume ls`, and a later Unmount must find the count its Mount
//! left. Every change is one redb write transaction, committed (fsync) before Docker is
//! answered; an in-memory copy serves reads. redb locks the file, so one process owns it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Volume name → [`Entry`] as JSON.
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// (volume name, mount ID) → count.
const MOUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("mounts");

/// A failure of the store's file: the disk under the data dir is failing or full.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("docker plugin state {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("docker plugin state {path}: record {key:?}: {source}")]
    Decode {
        path: PathBuf,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Where a Docker volume is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    /// Create started; the engine volume may or may not exist yet.
    Creating,
    Ready,
    /// Remove started; the engine volume may be partly gone.
    Removing,
}

/// One Docker volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub state: EntryState,
    /// The engine's volume id; empty while `Creating`.
    pub volume_id: String,
}

/// Everything the store holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub volumes: BTreeMap<String, Entry>,
    pub mounts: BTreeMap<(String, String), u64>,
}

impl Contents {
    /// All mounts of one volume, over every mount ID.
    pub fn total_mounts(&self, name: &str) -> u64 {
        self.mounts_of(name).map(|(_, n)| n).sum()
    }

    /// (mount ID, count) of one volume.
    pub fn mounts_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        self.mounts
            .range((name.to_owned(), String::new())..)
            .take_while(move |((n, _), _)| n == name)
            .map(|((_, id), n)| (id.as_str(), *n))
    }
}

/// The store: a redb file and its in-memory copy.
#[derive(Debug)]
pub struct Store {
    db: redb::Database,
    path: PathBuf,
    contents: Mutex<Contents>,
}

fn lock(m: &Mutex<Contents>) -> MutexGuard<'_, Contents> {
    // Plain data: a panic elsewhere while holding the lock leaves it consistent enough to serve.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens (or creates) the store; fails if another process holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |e: redb::Error| StoreError::Db {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let db = redb::Database::create(path).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(VOLUMES).map_err(|e| err(e.into()))?;
        txn.open_table(MOUNTS).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;

        let mut contents = Contents::default();
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        let volumes = txn.open_table(VOLUMES).map_err(|e| err(e.into()))?;
        for row in volumes.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let entry: Entry = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                path: path.to_owned(),
                key: k.value().to_owned(),
                source,
            })?;
            contents.volumes.insert(k.value().to_owned(), entry);
        }
        let mounts = txn.open_table(MOUNTS).map_err(|e| err(e.into()))?;
        for row in mounts.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let (name, id) = k.value();
            contents.mounts.insert((name.to_owned(), id.to_owned()), v.value());
        }
        Ok(Store {
            db,
            path: path.to_owned(),
            contents: Mutex::new(contents),
        })
    }

    /// A copy of everything.
    pub fn contents(&self) -> Contents {
        lock(&self.contents).clone()
    }

    pub fn entry(&self, name: &str) -> Option<Entry> {
        lock(&self.contents).volumes.get(name).cloned()
    }

    pub fn total_mounts(&self, name: &str) -> u64 {
        lock(&self.contents).total_mounts(name)
    }

    /// (mount ID, count) of one volume.
    pub fn mounts_of(&self, name: &str) -> Vec<(String, u64)> {
        lock(&self.contents)
            .mounts_of(name)
            .map(|(id, n)| (id.to_owned(), n))
            .collect()
    }

    pub fn count(&self, name: &str, id: &str) -> u64 {
        lock(&self.contents)
            .mounts
            .get(&(name.to_owned(), id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn put_entry(&self, name: &str, entry: &Entry) -> Result<(), StoreError> {
        // Serializing a struct of a string and an enum cannot fail.
        let value = serde_json::to_vec(entry).unwrap_or_default();
        self.write(|txn| {
            txn.open_table(VOLUMES)?.insert(name, value.as_slice())?;
            Ok(())
        })?;
        lock(&self.contents).volumes.insert(name.to_owned(), entry.clone());
        Ok(())
    }

    /// Forgets a volume and all its mount counts.
    pub fn delete_entry(&self, name: &str) -> Result<(), StoreError> {
        let ids: Vec<String> = self.mounts_of(name).into_iter().map(|(id, _)| id).collect();
        self.write(|txn| {
            txn.open_table(VOLUMES)?.remove(name)?;
            let mut mounts = txn.open_table(MOUNTS)?;
            for id in &ids {
                mounts.remove((name, id.as_str()))?;
            }
            Ok(())
        })?;
        let mut c = lock(&self.contents);
        c.volumes.remove(name);
        for id in ids {
            c.mounts.remove(&(name.to_owned(), id));
        }
        Ok(())
    }

    /// Sets the count of one (name, mount ID); 0 removes it.
    pub fn set_count(&self, name: &str, id: &str, count: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut mounts = txn.open_table(MOUNTS)?;
            if count == 0 {
                mounts.remove((name, id))?;
            } else {
                mounts.insert((name, id), count)?;
            }
            Ok(())
        })?;
        let key = (name.to_owned(), id.to_owned());
        let mut c = lock(&self.contents);
        if count == 0 {
            c.mounts.remove(&key);
        } else {
            c.mounts.insert(key, count);
        }
        Ok(())
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), StoreError> {
        let err = |e: redb::Error| StoreError::Db {
            path: self.path.clone(),
            source: Box::new(e),
        };
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        f(&txn).map_err(err)?;
        txn.commit().map_err(|e| err(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(id: &str) -> Entry {
        Entry {
            state: EntryState::Ready,
            volume_id: id.into(),
        }
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put_entry("v1", &ready("a")).unwrap();
            s.put_entry("v2", &ready("b")).unwrap();
            s.set_count("v1", "m1", 2).unwrap();
            s.set_count("v1", "m2", 1).unwrap();
            s.set_count("v2", "m3", 1).unwrap();
            s.set_count("v2", "m3", 0).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.entry("v1"), Some(ready("a")));
        assert_eq!(s.total_mounts("v1"), 3);
        assert_eq!(s.total_mounts("v2"), 0);
        assert_eq!(s.mounts_of("v1"), vec![("m1".into(), 2), ("m2".into(), 1)]);
        s.delete_entry("v1").unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.entry("v1"), None);
        assert_eq!(s.total_mounts("v1"), 0);
        assert_eq!(s.contents().volumes.len(), 1);
    }

    #[test]
    fn mounts_of_one_name_do_not_include_names_that_share_its_prefix() {
        let mut c = Contents::default();
        c.mounts.insert(("v1".into(), "a".into()), 1);
        c.mounts.insert(("v10".into(), "b".into()), 5);
        c.mounts.insert(("v0".into(), "c".into()), 7);
        assert_eq!(c.total_mounts("v1"), 1);
        assert_eq!(c.total_mounts("v10"), 5);
    }

    #[test]
    fn a_second_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.redb");
        let _first = Store::open(&path).unwrap();
        assert!(Store::open(&path).is_err());
    }
}
