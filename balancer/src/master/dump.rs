//! `dump.json`: what `save` writes and `resurrect` reads — every app, where its
//! configuration came from (a balancer.toml, or the balancer.toml text the CLI built for
//! `start SCRIPT`), its worker count after scaling, and whether it was stopped.
//!
//! The file is replaced atomically (a temporary file in the home, fsync, rename over the old
//! one, fsync of the directory), so a crash or SIGKILL at any point leaves either the old dump
//! or the new one, never a torn or empty file: PM2 users lose theirs that way. It is mode 0600
//! because env values in a configuration may hold secrets.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The dump format's version; a newer one is refused instead of half understood.
pub const VERSION: u32 = 1;

/// The whole dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dump {
    /// [`VERSION`] when written.
    pub version: u32,
    /// The apps, in start order.
    pub apps: Vec<DumpedApp>,
}

/// One app as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpedApp {
    /// Its name.
    pub name: String,
    /// How to start it again.
    pub origin: Origin,
    /// Its worker count when saved (after any `scale`), which wins over the file's `instances`.
    pub instances: u32,
    /// Every worker was stopped (`stop`): it comes back listed but stopped.
    pub stopped: bool,
}

/// Where an app's configuration came from: what `resurrect` sends to start it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Origin {
    /// A balancer.toml, read again at resurrect (so a deploy since the save is picked up).
    File {
        /// Its absolute path.
        file: PathBuf,
        /// `--env NAME`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
        /// The default policy it was read with (`rr`, `reuseport`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
    },
    /// The balancer.toml text the CLI built (`start SCRIPT …`, an ecosystem file).
    Toml {
        /// The text.
        toml: String,
        /// The directory its relative paths are relative to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<PathBuf>,
        /// `--env NAME`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
        /// The default policy it was read with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
    },
}

/// Why a dump could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Writing, syncing or renaming failed; the previous dump (if any) is intact.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The dump could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The dump.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The dump is not one this version understands.
    #[error("{} is not a balancer dump this version can read", path.display())]
    Format {
        /// The dump.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Written by a newer balancer.
    #[error("{} has version {found}; this balancer reads version {VERSION}", path.display())]
    Version {
        /// The dump.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

impl super::Master {
    /// Records how the apps named `names` were started, for a later `save`.
    pub fn remember(&self, names: impl IntoIterator<Item = String>, origin: &Origin) {
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            origins.retain(|(n, _)| *n != name);
            origins.push((name, origin.clone()));
        }
    }

    /// What `save` writes: every app still running here, with its recorded origin.
    pub fn dump(&self) -> Dump {
        let origins = self
            .origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let apps = self
            .apps()
            .into_iter()
            .filter_map(|(app, workers)| {
                let origin = origins.iter().find(|(n, _)| *n == app.name)?.1.clone();
                Some(DumpedApp {
                    name: app.name.clone(),
                    origin,
                    instances: workers.len() as u32,
                    stopped: !workers.is_empty()
                        && workers
                            .iter()
                            .all(|w| w.state == balancer_workers::WorkerState::Stopped),
                })
            })
            .collect();
        Dump {
            version: VERSION,
            apps,
        }
    }

    /// `save`: writes [`dump`](Self::dump) to the home's `dump.json`, off the runtime's
    /// threads (fsync can take a while on a busy disk).
    pub async fn save(&self) -> super::OpResult {
        let dump = self.dump();
        let path = crate::home::dump_file(self.home());
        let count = dump.apps.len();
        let target = path.clone();
        match tokio::task::spawn_blocking(move || write(&target, &dump)).await {
            Ok(Ok(())) => Ok(format!("saved {count} apps to {}", path.display())),
            Ok(Err(e)) => Err(super::ControlError::Save(e)),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl super::Master {
    /// `resurrect`: starts every app of the home's dump that is not running yet, from its
    /// origin (a file is read again, so a deploy since the save is picked up), then sets each
    /// app to its saved worker count and stops those that were stopped. One origin failing
    /// (a file deleted since) does not keep the others down; the reply names it.
    pub async fn resurrect(&self) -> super::OpResult {
        let path = crate::home::dump_file(self.home());
        let blocking = path.clone();
        let dump = match tokio::task::spawn_blocking(move || read(&blocking)).await {
            Ok(Ok(Some(dump))) => dump,
            Ok(Ok(None)) => {
                return Err(super::ControlError::NoDump(path));
            }
            Ok(Err(e)) => return Err(super::ControlError::Save(e)),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        self.resurrect_from(dump).await
    }

    /// Starts what `dump` holds, as [`resurrect`](Self::resurrect) does (also the state an
    /// `upgrade` hands to the new master).
    pub async fn resurrect_from(&self, dump: Dump) -> super::OpResult {
        let mut origins: Vec<&Origin> = Vec::new();
        for app in &dump.apps {
            if !origins.contains(&&app.origin) {
                origins.push(&app.origin);
            }
        }
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for origin in origins {
            let names: Vec<String> = dump
                .apps
                .iter()
                .filter(|a| a.origin == *origin)
                .map(|a| a.name.clone())
                .collect();
            if names.iter().all(|n| self.supervisor(n).is_some()) {
                continue;
            }
            match self.start_origin(origin).await {
                Ok(message) => {
                    self.remember(names, origin);
                    done.push(message);
                }
                Err(e) => failed.push(e),
            }
        }
        for app in &dump.apps {
            let Some(sup) = self.supervisor(&app.name) else {
                continue;
            };
            if sup.worker_count() != app.instances {
                match self
                    .scale(&app.name, crate::protocol::ScaleTo::Exactly(app.instances))
                    .await
                {
                    Ok(message) => done.push(message),
                    Err(e) => failed.push(e),
                }
            }
            if app.stopped {
                match self.stop(&app.name).await {
                    Ok(message) => done.push(message),
                    Err(e) => failed.push(e),
                }
            }
        }
        if done.is_empty() && failed.is_empty() {
            return Ok("nothing to start".into());
        }
        super::gather(done, failed)
    }

    /// Starts the apps of one saved origin, as the `start` request that first brought them.
    async fn start_origin(&self, origin: &Origin) -> super::OpResult {
        let load = |env: &Option<String>, policy: &Option<String>| crate::protocol::Load {
            env: env.clone(),
            policy: policy.as_deref().and_then(|p| p.parse().ok()),
        };
        match origin {
            Origin::File { file, env, policy } => {
                let config = self.load(file, &load(env, policy)).await?;
                self.apply(
                    config,
                    super::Source::File(file.clone()),
                    super::Apply::Start,
                )
                .await
            }
            Origin::Toml {
                toml,
                cwd,
                env,
                policy,
            } => {
                let cwd = cwd.clone().unwrap_or_else(|| self.home().to_path_buf());
                let config = self.parse(toml, &cwd, &load(env, policy))?;
                self.start_from_command_line(config, false).await
            }
        }
    }
}

/// Writes `dump` to `path` atomically, mode 0600.
pub fn write(path: &Path, dump: &Dump) -> Result<(), DumpError> {
    let fail = |source| DumpError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut text = serde_json::to_vec_pretty(dump).map_err(|e| fail(io::Error::other(e)))?;
    text.push(b'\n');
    let dir = path.parent().unwrap_or(Path::new("."));
    // One temporary name per process: the home lock means one master writes at a time.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("dump"),
        std::process::id()
    ));
    remove_stale_temporaries(dir, path, &tmp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(fail)
}

/// Removes what a save killed half-way (a crash, SIGKILL) left: temporary files of `path`
/// other than `ours`. Only one master runs per home (its lock), so none is being written.
fn remove_stale_temporaries(dir: &Path, path: &Path, ours: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if file.starts_with(&prefix) && file.ends_with(".tmp") && entry.path() != ours {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Reads the dump at `path`; `Ok(None)` when there is none.
pub fn read(path: &Path) -> Result<Option<Dump>, DumpError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DumpError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // Read the version first, so a newer dump says so instead of failing on a new field.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let format = |source| DumpError::Format {
        path: path.to_path_buf(),
        source,
    };
    let versioned: Versioned = serde_json::from_slice(&text).map_err(format)?;
    if versioned.version != VERSION {
        return Err(DumpError::Version {
            path: path.to_path_buf(),
            found: versioned.version,
        });
    }
    serde_json::from_slice(&text).map(Some).map_err(format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> Dump {
        Dump {
            version: VERSION,
            apps: vec![DumpedApp {
                name: "web".into(),
                origin: Origin::Toml {
                    toml: "[[app]]\nname = \"web\"\nenv = { TOKEN = \"s3cret\" }\n".into(),
                    cwd: Some("/srv".into()),
                    env: None,
                    policy: Some("rr".into()),
                },
                instances: 3,
                stopped: true,
            }],
        }
    }

    #[test]
    fn round_trips_privately_and_replaces_the_old_dump() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dump.json");
        assert_eq!(read(&path).expect("read"), None, "no dump yet");
        let torn = dir.path().join(".dump.json.1.tmp");
        std::fs::write(&torn, r#"{"version": 1, "ap"#).expect("a killed save's file");
        write(
            &path,
            &Dump {
                version: VERSION,
                apps: vec![],
            },
        )
        .expect("write");
        write(&path, &sample()).expect("write");
        assert_eq!(read(&path).expect("read"), Some(sample()));
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(
            left.len(),
            1,
            "no temporary file left, a killed save's neither"
        );
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dump.json");
        std::fs::write(&path, r#"{"version": 9, "apps": [], "later": 1}"#).expect("write");
        let e = read(&path).expect_err("newer");
        assert!(e.to_string().contains("version 9"), "{e}");
    }
}
