//! `stowctl sync DIR`: mirror a local folder into a bucket prefix.
//!
//! What was uploaded is kept in a manifest (per folder and destination, in
//! the user's state directory): a file whose size and modification time
//! match its entry is unchanged; otherwise its SHA-256 decides. `--delete`
//! removes the objects of files that are gone, never when the folder is
//! empty or unreadable (an unmounted volume would otherwise empty the
//! bucket), and never those under a subfolder that could not be read.
//! `--watch` then follows the folder: filesystem events, debounced per path
//! (a burst of writes is one upload once the file has been quiet and its
//! size and time stopped changing); a save through a temporary file and a
//! rename uploads the final name once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::client::{Client, LocalFile, hash_file, mtime_ns};
use super::progress::Reporter;

/// Ignored unless `--no-default-ignores`: version control, editor swap and
/// backup files, temporary files of atomic saves.
pub const DEFAULT_IGNORES: &[&str] = &[
    ".git/**",
    "**/.git/**",
    ".hg/**",
    "**/.svn/**",
    "**/*.swp",
    "**/*.swx",
    "**/.*.swp",
    "**/*~",
    "**/.#*",
    "**/#*#",
    "**/4913",
    "**/*.tmp",
    "**/.DS_Store",
];

/// One uploaded file as last seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub size: u64,
    pub mtime_ns: i128,
    pub sha256: String,
}

/// What was uploaded, by relative path (`/`-separated).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, Entry>,
}

impl Manifest {
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("the sync manifest {} is damaged", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Written to a temporary file and renamed: never half a manifest.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The manifest's place: `$XDG_STATE_HOME/stowage/sync/` (or
/// `~/.local/state/...`), one file per folder and destination.
pub fn manifest_path(dir: &Path, destination: &str) -> anyhow::Result<PathBuf> {
    use sha2::Digest;
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(s) => PathBuf::from(s),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".local/state")
        }
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot read the folder {}", dir.display()))?;
    let mut h = sha2::Sha256::new();
    h.update(dir.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(destination.as_bytes());
    let id: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(base.join("stowage/sync").join(format!("{id}.json")))
}

pub fn ignores(extra: &[String], defaults: bool) -> anyhow::Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    let defaults = if defaults { DEFAULT_IGNORES } else { &[] };
    for g in defaults
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
    {
        b.add(Glob::new(g).with_context(|| format!("--ignore {g:?} is not a glob"))?);
    }
    Ok(b.build()?)
}

/// A folder as read now.
#[derive(Debug, Default)]
pub struct Scan {
    /// Regular files by relative path.
    pub files: BTreeMap<String, PathBuf>,
    /// Relative folders that could not be read: what the manifest has
    /// under them is not known to be gone.
    pub unreadable: Vec<String>,
}

impl Scan {
    fn covers_unreadable(&self, rel: &str) -> bool {
        self.unreadable
            .iter()
            .any(|d| d.is_empty() || rel.starts_with(&format!("{d}/")))
    }
}

/// The path of `path` inside `root`, `/`-separated; `None` outside it or
/// not valid UTF-8 (a key must be).
pub fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    let joined = parts?.join("/");
    (!joined.is_empty()).then_some(joined)
}

pub fn scan(root: &Path, ignore: &GlobSet) -> anyhow::Result<Scan> {
    std::fs::read_dir(root)
        .with_context(|| format!("cannot read the folder {}", root.display()))?;
    let mut out = Scan::default();
    let walk = walkdir::WalkDir::new(root).follow_links(false).into_iter();
    // A folder whose contents the globs ignore (`.git/**`) is not entered.
    let ignored = |e: &walkdir::DirEntry| {
        relative(root, e.path()).is_some_and(|rel| {
            ignore.is_match(&rel) || (e.file_type().is_dir() && ignore.is_match(format!("{rel}/x")))
        })
    };
    for entry in walk.filter_entry(|e| !ignored(e)) {
        match entry {
            Ok(e) if e.file_type().is_file() => {
                if let Some(rel) = relative(root, e.path()) {
                    out.files.insert(rel, e.path().to_path_buf());
                }
            }
            Ok(_) => {}
            Err(e) => {
                let rel = e.path().and_then(|p| relative(root, p)).unwrap_or_default();
                out.unreadable.push(rel);
            }
        }
    }
    Ok(out)
}

/// What one pass does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New or changed files (relative paths).
    pub upload: Vec<String>,
    /// Files whose content is unchanged but whose time moved: only the
    /// manifest is updated.
    pub touched: Vec<(String, Entry)>,
    /// Uploaded files that are gone.
    pub gone: Vec<String>,
}

/// Compares the folder with the manifest; `hash` gives a file's SHA-256
/// when size and time do not settle it.
pub async fn plan(scan: &Scan, manifest: &Manifest) -> anyhow::Result<Plan> {
    let mut p = Plan::default();
    for (rel, path) in &scan.files {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(_) => continue, // gone since the scan: the next pass sees it
        };
        let (size, mtime) = (meta.len(), mtime_ns(&meta));
        match manifest.files.get(rel) {
            Some(e) if e.size == size && e.mtime_ns == mtime => {}
            Some(e) if e.size == size => {
                let sha256 = hash_file(path).await?;
                if sha256 == e.sha256 {
                    let entry = Entry {
                        size,
                        mtime_ns: mtime,
                        sha256,
                    };
                    p.touched.push((rel.clone(), entry));
                } else {
                    p.upload.push(rel.clone());
                }
            }
            _ => p.upload.push(rel.clone()),
        }
    }
    for rel in manifest.files.keys() {
        if !scan.files.contains_key(rel) && !scan.covers_unreadable(rel) {
            p.gone.push(rel.clone());
        }
    }
    Ok(p)
}

/// Refuses a deletion that looks like a folder that is not there any more.
pub fn guard_deletions(scan: &Scan, manifest: &Manifest, gone: usize) -> anyhow::Result<()> {
    if gone > 0 && scan.files.is_empty() && scan.unreadable.is_empty() {
        bail!(
            "the folder has no files but {} were uploaded from it: refusing to delete their \
             objects (an unmounted or emptied folder?); delete them yourself, or sync a folder \
             that holds at least one file",
            manifest.files.len()
        );
    }
    Ok(())
}

pub struct Syncer {
    pub root: PathBuf,
    pub client: Client,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub ignore: GlobSet,
    pub delete: bool,
    pub parallel: usize,
}

impl Syncer {
    /// One full pass; the number of files that failed.
    pub async fn pass(&mut self, reporter: &Reporter) -> anyhow::Result<u64> {
        let scan = scan(&self.root, &self.ignore)?;
        for d in &scan.unreadable {
            reporter.say(&format!(
                "warning: cannot read {}/{d}: its objects are kept",
                self.root.display()
            ));
        }
        let plan = plan(&scan, &self.manifest).await?;
        for (rel, entry) in plan.touched {
            self.manifest.files.insert(rel, entry);
        }
        let mut failed = self.upload(&plan.upload, &scan.files, reporter).await?;
        if self.delete && !plan.gone.is_empty() {
            guard_deletions(&scan, &self.manifest, plan.gone.len())?;
            failed += self.remove(&plan.gone, reporter).await?;
        }
        self.manifest.save(&self.manifest_path)?;
        Ok(failed)
    }

    async fn upload(
        &mut self,
        rels: &[String],
        paths: &BTreeMap<String, PathBuf>,
        reporter: &Reporter,
    ) -> anyhow::Result<u64> {
        use futures::StreamExt;
        let files: Vec<LocalFile> = rels
            .iter()
            .filter_map(|rel| {
                let key = self.client.dest.key(rel);
                LocalFile::stat(paths.get(rel)?, key).ok()
            })
            .collect();
        reporter.add_work(files.len(), files.iter().map(|f| f.size).sum());
        let client = &self.client;
        let mut results = futures::stream::iter(files.iter().map(|f| async move {
            let bar = reporter.file(&f.key, f.size);
            let r = client.upload(f, &bar).await;
            (f, bar, r)
        }))
        .buffer_unordered(self.parallel.max(1));
        let mut failed = 0;
        while let Some((f, bar, r)) = results.next().await {
            reporter.finished(&f.path.display().to_string(), &bar, &r);
            match r {
                Ok(u) => {
                    if let Some(rel) = relative(&self.root, &f.path) {
                        let entry = Entry {
                            size: f.size,
                            mtime_ns: f.mtime_ns,
                            sha256: u.sha256,
                        };
                        self.manifest.files.insert(rel, entry);
                    }
                }
                Err(_) => failed += 1,
            }
        }
        drop(results);
        self.manifest.save(&self.manifest_path)?;
        Ok(failed)
    }

    async fn remove(&mut self, rels: &[String], reporter: &Reporter) -> anyhow::Result<u64> {
        let mut failed = 0;
        for rel in rels {
            let key = self.client.dest.key(rel);
            match self.client.delete(&key).await {
                Ok(_) => {
                    self.manifest.files.remove(rel);
                    reporter.say(&format!("deleted: {key} ({rel} is gone)"));
                }
                Err(e) => {
                    failed += 1;
                    reporter.say(&format!("FAILED to delete {key}: {e:#}"));
                }
            }
        }
        Ok(failed)
    }

    /// Follows the folder until Ctrl-C: each path is handled once it has
    /// been quiet for `debounce` and its size and time held still over
    /// that long.
    pub async fn watch(&mut self, reporter: &Reporter, debounce: Duration) -> anyhow::Result<()> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let _ = tx.send(event);
            })?;
        watcher.watch(&self.root, RecursiveMode::Recursive)?;
        reporter.say(&format!(
            "watching {} (Ctrl-C to stop)",
            self.root.display()
        ));
        // Path → (last event, what a stat said then).
        let mut due: HashMap<PathBuf, (Instant, Option<(u64, i128)>)> = HashMap::new();
        let tick = (debounce / 4).max(Duration::from_millis(20));
        loop {
            tokio::select! {
                event = rx.recv() => {
                    match event {
                        Some(Ok(event)) => {
                            for path in event.paths {
                                due.insert(path.clone(), (Instant::now(), stat(&path)));
                            }
                        }
                        Some(Err(e)) => reporter.say(&format!("warning: watching: {e}")),
                        None => bail!("the filesystem watcher stopped"),
                    }
                }
                _ = tokio::time::sleep(tick) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            let now = Instant::now();
            let ready: Vec<PathBuf> = due
                .iter()
                .filter(|(_, (at, _))| now.duration_since(*at) >= debounce)
                .map(|(p, _)| p.clone())
                .collect();
            let mut settled = HashSet::new();
            for path in ready {
                let Some((_, seen)) = due.get(&path).cloned() else {
                    continue;
                };
                let current = stat(&path);
                if current != seen {
                    // Still being written: wait another quiet period.
                    due.insert(path, (now, current));
                    continue;
                }
                due.remove(&path);
                settled.insert(path);
            }
            if !settled.is_empty() {
                self.settle(settled, reporter).await?;
            }
        }
    }

    /// Handles paths whose events settled: uploads what exists and changed,
    /// deletes (with `--delete`) what is gone.
    async fn settle(&mut self, paths: HashSet<PathBuf>, reporter: &Reporter) -> anyhow::Result<()> {
        let mut uploads = BTreeMap::new();
        let mut gone = Vec::new();
        for path in paths {
            let Some(rel) = relative(&self.root, &path) else {
                continue;
            };
            if self.ignore.is_match(&rel) {
                continue;
            }
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => {
                    uploads.insert(rel, path);
                }
                Ok(m) if m.is_dir() => {
                    // A folder moved in: everything under it.
                    let inner = scan(&path, &self.ignore)?;
                    for (sub, p) in inner.files {
                        uploads.insert(format!("{rel}/{sub}"), p);
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let prefix = format!("{rel}/");
                    gone.extend(
                        self.manifest
                            .files
                            .keys()
                            .filter(|k| **k == rel || k.starts_with(&prefix))
                            .cloned(),
                    );
                }
            }
        }
        let scan = Scan {
            files: uploads,
            unreadable: Vec::new(),
        };
        let only = Manifest {
            files: self
                .manifest
                .files
                .iter()
                .filter(|(k, _)| scan.files.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let plan = plan(&scan, &only).await?;
        for (rel, entry) in plan.touched {
            self.manifest.files.insert(rel, entry);
        }
        self.upload(&plan.upload, &scan.files, reporter).await?;
        if self.delete && !gone.is_empty() {
            if std::fs::read_dir(&self.root).map_or(true, |mut d| d.next().is_none()) {
                reporter.say(&format!(
                    "warning: {} is empty or unreadable: not deleting {} object(s)",
                    self.root.display(),
                    gone.len()
                ));
            } else {
                self.remove(&gone, reporter).await?;
            }
        }
        self.manifest.save(&self.manifest_path)
    }
}

fn stat(path: &Path) -> Option<(u64, i128)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), mtime_ns(&m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, body: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("test setup")).expect("test setup");
        std::fs::write(p, body).expect("test setup");
    }

    #[test]
    fn scan_skips_ignored_paths() {
        let d = tempfile::tempdir().expect("test setup");
        write(d.path(), "a.md", "a");
        write(d.path(), "sub/b.txt", "b");
        write(d.path(), ".git/config", "x");
        write(d.path(), "sub/.b.txt.swp", "x");
        write(d.path(), "sub/c.txt~", "x");
        let s = scan(
            d.path(),
            &ignores(&["**/*.log".into()], true).expect("test setup"),
        )
        .expect("test setup");
        write(d.path(), "x.log", "x");
        assert_eq!(s.files.keys().collect::<Vec<_>>(), ["a.md", "sub/b.txt"]);
    }

    #[tokio::test]
    async fn plan_uploads_new_and_changed_and_finds_the_gone() {
        let d = tempfile::tempdir().expect("test setup");
        write(d.path(), "same.md", "same");
        write(d.path(), "changed.md", "new body");
        write(d.path(), "touched.md", "touched");
        write(d.path(), "new.md", "new");
        let stat_of = |rel: &str| {
            let m = std::fs::metadata(d.path().join(rel)).expect("test setup");
            (m.len(), mtime_ns(&m))
        };
        let mut m = Manifest::default();
        let (size, mtime) = stat_of("same.md");
        m.files.insert(
            "same.md".into(),
            Entry {
                size,
                mtime_ns: mtime,
                sha256: "x".into(),
            },
        );
        let (size, mtime) = stat_of("changed.md");
        m.files.insert(
            "changed.md".into(),
            Entry {
                size,
                mtime_ns: mtime - 1,
                sha256: "old".into(),
            },
        );
        let (size, mtime) = stat_of("touched.md");
        let sha = hash_file(&d.path().join("touched.md"))
            .await
            .expect("test setup");
        m.files.insert(
            "touched.md".into(),
            Entry {
                size,
                mtime_ns: mtime - 1,
                sha256: sha,
            },
        );
        m.files.insert(
            "deleted.md".into(),
            Entry {
                size: 1,
                mtime_ns: 1,
                sha256: "y".into(),
            },
        );
        let s = scan(d.path(), &ignores(&[], true).expect("test setup")).expect("test setup");
        let p = plan(&s, &m).await.expect("test setup");
        assert_eq!(p.upload, ["changed.md", "new.md"]);
        assert_eq!(p.touched.len(), 1);
        assert_eq!(p.touched[0].0, "touched.md");
        assert_eq!(p.gone, ["deleted.md"]);
    }

    #[test]
    fn an_empty_folder_deletes_nothing() {
        let d = tempfile::tempdir().expect("test setup");
        let s = scan(d.path(), &ignores(&[], true).expect("test setup")).expect("test setup");
        let mut m = Manifest::default();
        m.files.insert(
            "a.md".into(),
            Entry {
                size: 1,
                mtime_ns: 1,
                sha256: "y".into(),
            },
        );
        assert!(guard_deletions(&s, &m, 1).is_err());
        assert!(
            scan(
                &d.path().join("missing"),
                &ignores(&[], true).expect("test setup")
            )
            .is_err()
        );
    }

    #[test]
    fn what_is_under_an_unreadable_folder_is_not_gone() {
        let s = Scan {
            files: BTreeMap::new(),
            unreadable: vec!["locked".into()],
        };
        assert!(s.covers_unreadable("locked/a.md"));
        assert!(!s.covers_unreadable("lockedx/a.md"));
    }
}
