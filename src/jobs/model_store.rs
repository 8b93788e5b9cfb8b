//! Where fine-tuned heads, their metadata, uploaded data sets and gallery pictures live: one
//! [`ModelStore`] interface, two implementations.
//!
//! - [`FolderStore`] (the default: the weights dir): files written to a temporary name, fsynced
//!   and renamed ([`crate::atomic`]).
//! - [`ObjectStore`] (`s3://bucket/prefix`, through the `object_store` crate; endpoint, region
//!   and credentials from the usual `AWS_*` variables): an object is written by one PUT (or one
//!   completed multipart upload), so readers never see half of one.
//!
//! Keys, the same in both: `<name>.safetensors` and `<name>.json` (a fine-tuned model), and
//! `jobs/<id>/dataset.zip`, `jobs/<id>/model/…` (a model staged before its job's commit point),
//! `jobs/<id>/examples/<n>.png`. The same tests (`tests/stores.rs`) run against both.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore as _, ObjectStoreExt as _};

use super::runtime::OwnRuntime;

#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    #[error("model store: {0}")]
    Io(#[from] std::io::Error),
    #[error("model store: {0}")]
    Object(String),
    #[error("{0}")]
    Config(String),
}

impl From<object_store::Error> for ModelStoreError {
    fn from(e: object_store::Error) -> Self {
        ModelStoreError::Object(e.to_string())
    }
}

impl From<ModelStoreError> for std::io::Error {
    fn from(e: ModelStoreError) -> Self {
        match e {
            ModelStoreError::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// Blocking, like the job store: called from training threads and `spawn_blocking`.
pub trait ModelStore: Send + Sync {
    /// The folder, or `s3://bucket/prefix`.
    fn describe(&self) -> String;
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), ModelStoreError>;
    /// Copies a local file in.
    fn put_file(&self, key: &str, file: &Path) -> Result<(), ModelStoreError>;
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ModelStoreError>;
    /// Copies an object out to a local file (written atomically); false when there is none.
    fn fetch(&self, key: &str, file: &Path) -> Result<bool, ModelStoreError>;
    fn exists(&self, key: &str) -> Result<bool, ModelStoreError>;
    /// Removes an object; one that is not there is not an error.
    fn delete(&self, key: &str) -> Result<(), ModelStoreError>;
    /// Removes every object under `prefix/`.
    fn delete_prefix(&self, prefix: &str) -> Result<(), ModelStoreError>;
    /// Moves an object; nothing to move is not an error.
    fn rename(&self, from: &str, to: &str) -> Result<(), ModelStoreError>;
    /// Keys directly under `prefix` (`""`: the top level), not in sub-folders.
    fn list(&self, prefix: &str) -> Result<Vec<String>, ModelStoreError>;
    /// Sub-folder names directly under `prefix`.
    fn folders(&self, prefix: &str) -> Result<Vec<String>, ModelStoreError>;
    /// When anything under `prefix/` (at any depth) was last written; `None` when nothing is
    /// there. A folder's own time and writes in progress count: they are activity too.
    fn last_modified(&self, prefix: &str) -> Result<Option<SystemTime>, ModelStoreError>;
    /// Where a key is on this machine's disk, when the store is a folder.
    fn local_path(&self, key: &str) -> Option<PathBuf>;
}

/// `s3://…` for the object store, anything else is a folder.
pub fn open(location: &str) -> Result<Arc<dyn ModelStore>, ModelStoreError> {
    if let Some(rest) = location.strip_prefix("s3://") {
        return Ok(Arc::new(ObjectStore::s3(rest)?));
    }
    if location.contains("://") {
        return Err(ModelStoreError::Config(format!(
            "`{location}` is not a model store: use a folder or s3://bucket/prefix"
        )));
    }
    Ok(Arc::new(FolderStore::new(PathBuf::from(location))?))
}

fn check_key(key: &str) {
    // Keys are made by this crate from validated names and ids; never from a request as is.
    assert!(
        !key.split('/')
            .any(|c| c.is_empty() || c == "." || c == ".."),
        "bad model store key {key:?}"
    );
}

pub struct FolderStore {
    dir: PathBuf,
}

impl FolderStore {
    pub fn new(dir: PathBuf) -> Result<Self, ModelStoreError> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, key: &str) -> PathBuf {
        check_key(key);
        self.dir.join(key)
    }

    fn parent_of(&self, key: &str) -> Result<PathBuf, ModelStoreError> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(path)
    }
}

fn not_found_is_ok(r: std::io::Result<()>) -> Result<(), ModelStoreError> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => Ok(other?),
    }
}

impl ModelStore for FolderStore {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), ModelStoreError> {
        Ok(crate::atomic::write(&self.parent_of(key)?, bytes)?)
    }

    fn put_file(&self, key: &str, file: &Path) -> Result<(), ModelStoreError> {
        let path = self.parent_of(key)?;
        if path == file {
            return Ok(());
        }
        Ok(crate::atomic::write_with(&path, |tmp| {
            std::fs::copy(file, tmp).map(|_| ())
        })?)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ModelStoreError> {
        match std::fs::read(self.path(key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn fetch(&self, key: &str, file: &Path) -> Result<bool, ModelStoreError> {
        let path = self.path(key);
        if !path.is_file() {
            return Ok(false);
        }
        if path != file {
            crate::atomic::write_with(file, |tmp| std::fs::copy(&path, tmp).map(|_| ()))?;
        }
        Ok(true)
    }

    fn exists(&self, key: &str) -> Result<bool, ModelStoreError> {
        Ok(self.path(key).is_file())
    }

    fn delete(&self, key: &str) -> Result<(), ModelStoreError> {
        not_found_is_ok(std::fs::remove_file(self.path(key)))
    }

    fn delete_prefix(&self, prefix: &str) -> Result<(), ModelStoreError> {
        not_found_is_ok(std::fs::remove_dir_all(self.path(prefix)))
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), ModelStoreError> {
        let to = self.parent_of(to)?;
        not_found_is_ok(std::fs::rename(self.path(from), &to))?;
        if let Some(parent) = to.parent() {
            crate::atomic::sync_dir(parent)?;
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ModelStoreError> {
        self.entries(prefix, false)
    }

    fn folders(&self, prefix: &str) -> Result<Vec<String>, ModelStoreError> {
        self.entries(prefix, true)
    }

    fn last_modified(&self, prefix: &str) -> Result<Option<SystemTime>, ModelStoreError> {
        fn newest(path: &Path) -> std::io::Result<Option<SystemTime>> {
            let meta = match std::fs::symlink_metadata(path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut time = meta.modified()?;
            if meta.is_dir() {
                for entry in std::fs::read_dir(path)? {
                    if let Some(t) = newest(&entry?.path())? {
                        time = time.max(t);
                    }
                }
            }
            Ok(Some(time))
        }
        Ok(newest(&self.path(prefix))?)
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }
}

impl FolderStore {
    fn entries(&self, prefix: &str, folders: bool) -> Result<Vec<String>, ModelStoreError> {
        let dir = if prefix.is_empty() {
            self.dir.clone()
        } else {
            self.path(prefix)
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporaries of writes in progress are not objects yet.
            if name.starts_with('.') || entry.file_type()?.is_dir() != folders {
                continue;
            }
            out.push(match (folders, prefix.is_empty()) {
                (true, _) => name,
                (false, true) => name,
                (false, false) => format!("{prefix}/{name}"),
            });
        }
        out.sort();
        Ok(out)
    }
}

/// An S3-protocol object store (AWS S3, MinIO, Ceph, moto…).
pub struct ObjectStore {
    store: Arc<dyn object_store::ObjectStore>,
    bucket: String,
    prefix: String,
    runtime: OwnRuntime,
}

impl ObjectStore {
    /// `bucket/prefix` (the part of `s3://bucket/prefix` after the scheme); endpoint, region and
    /// credentials come from `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and the other variables the AWS tools read.
    pub fn s3(location: &str) -> Result<Self, ModelStoreError> {
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(ModelStoreError::Config(
                "the model store needs a bucket: s3://bucket/prefix".into(),
            ));
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|v| std::env::var(v).ok());
        if endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
        {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| {
            ModelStoreError::Config(format!(
                "cannot use s3://{location} as the model store: {e}"
            ))
        })?;
        let runtime = OwnRuntime::new("object-store")?;
        Ok(Self {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            runtime,
        })
    }

    fn key(&self, key: &str) -> Key {
        check_key(key);
        if self.prefix.is_empty() {
            Key::from(key)
        } else {
            Key::from(format!("{}/{key}", self.prefix))
        }
    }

    fn prefix_key(&self, prefix: &str) -> Option<Key> {
        match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Key::from(self.prefix.as_str())),
            _ => Some(self.key(prefix)),
        }
    }

    /// Runs `fut` on the store's runtime, from any thread.
    fn run<T: Send>(
        &self,
        fut: impl Future<Output = Result<T, ModelStoreError>> + Send,
    ) -> Result<T, ModelStoreError> {
        self.runtime.run(fut, || {
            ModelStoreError::Object("a model store call panicked".into())
        })
    }

    /// The last component of an object's path.
    fn name_of(key: &Key) -> String {
        key.filename().unwrap_or_default().to_string()
    }
}

impl ModelStore for ObjectStore {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), ModelStoreError> {
        let key = self.key(key);
        let payload = bytes::Bytes::copy_from_slice(bytes);
        self.run(async {
            self.store.put(&key, payload.into()).await?;
            Ok(())
        })
    }

    fn put_file(&self, key: &str, file: &Path) -> Result<(), ModelStoreError> {
        let key = self.key(key);
        self.run(async {
            // A multipart upload becomes visible only once complete.
            let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), key);
            let mut reader = tokio::fs::File::open(file).await?;
            let copied = tokio::io::copy(&mut reader, &mut writer).await;
            match copied {
                Ok(_) => {
                    tokio::io::AsyncWriteExt::shutdown(&mut writer).await?;
                    Ok(())
                }
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e.into())
                }
            }
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ModelStoreError> {
        let key = self.key(key);
        self.run(async {
            match self.store.get(&key).await {
                Ok(result) => Ok(Some(result.bytes().await?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn fetch(&self, key: &str, file: &Path) -> Result<bool, ModelStoreError> {
        let Some(bytes) = self.get(key)? else {
            return Ok(false);
        };
        crate::atomic::write(file, &bytes)?;
        Ok(true)
    }

    fn exists(&self, key: &str) -> Result<bool, ModelStoreError> {
        let key = self.key(key);
        self.run(async {
            match self.store.head(&key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn delete(&self, key: &str) -> Result<(), ModelStoreError> {
        let key = self.key(key);
        self.run(async {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn delete_prefix(&self, prefix: &str) -> Result<(), ModelStoreError> {
        let prefix = self.key(prefix);
        self.run(async {
            let keys: Vec<Key> = self
                .store
                .list(Some(&prefix))
                .map_ok(|m| m.location)
                .try_collect()
                .await?;
            for key in keys {
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), ModelStoreError> {
        let (from, to) = (self.key(from), self.key(to));
        self.run(async {
            // S3 has no rename: a copy (atomic on its own), then the delete.
            match self.store.copy(&from, &to).await {
                Ok(()) => {}
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            match self.store.delete(&from).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ModelStoreError> {
        let under = self.prefix_key(prefix);
        self.run(async {
            let listed = self.store.list_with_delimiter(under.as_ref()).await?;
            let mut keys: Vec<String> = listed
                .objects
                .iter()
                .map(|m| {
                    let name = Self::name_of(&m.location);
                    if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                })
                .collect();
            keys.sort();
            Ok(keys)
        })
    }

    fn folders(&self, prefix: &str) -> Result<Vec<String>, ModelStoreError> {
        let under = self.prefix_key(prefix);
        self.run(async {
            let listed = self.store.list_with_delimiter(under.as_ref()).await?;
            let mut names: Vec<String> = listed.common_prefixes.iter().map(Self::name_of).collect();
            names.sort();
            Ok(names)
        })
    }

    fn last_modified(&self, prefix: &str) -> Result<Option<SystemTime>, ModelStoreError> {
        let under = self.prefix_key(prefix);
        self.run(async {
            let objects: Vec<_> = self.store.list(under.as_ref()).try_collect().await?;
            Ok(objects
                .iter()
                .map(|m| SystemTime::from(m.last_modified))
                .max())
        })
    }

    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }
}
