//! `watch`: inotify watches (the `notify` crate) on the directories of an app's watched paths,
//! the `ignore_watch` rules, and the debounced "something changed" signal the triggers turn into
//! one reload.
//!
//! Every directory gets its own non-recursive watch, added by walking the tree here, so an
//! ignored directory (`node_modules`, `.git`) costs no watch at all: notify's recursive mode
//! would watch every directory first and filter events later, and `node_modules` alone can
//! exceed the kernel's watch limit. A directory created later is walked and watched when its
//! creation is seen. An idle watch costs nothing: the kernel queues events and notify's thread
//! sleeps in `read` until there is one.
//!
//! Changes never stack: a change sets one `dirty` flag, whatever the number of files, and
//! [`Watcher::next_change`] clears it. A change arriving while the caller reloads leaves the flag
//! set, so the next call returns once more: exactly one more reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use balancer_config::Watch;
use notify::event::{EventKind, Flag};
use notify::{RecursiveMode, Watcher as _};

/// The longest a stream of changes can hold a reload back: a file rewritten every second
/// (a log in a watched directory, say) must not defer the reload forever.
const MAX_DEBOUNCE_FACTOR: u32 = 10;
/// How many unwatched directories the report names (it counts them all).
const NAMED_UNWATCHED: usize = 10;

/// Why watching could not start at all (the app runs on, unwatched).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// inotify itself is unavailable (`inotify_init` failed: out of instances, say).
    #[error("cannot watch files (inotify)")]
    Init(#[source] notify::Error),
}

/// What is ignored: `ignore_watch`, the defaults, `$BALANCER_HOME` and the app's own logs.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The watched paths (absolute): directories, watched with everything below, or files.
    roots: Vec<PathBuf>,
    /// The app's cwd: patterns with a `/` are matched against paths relative to it.
    cwd: PathBuf,
    /// Patterns without a `/`: matched against each name below the root.
    names: Vec<glob::Pattern>,
    /// Patterns with a `/`.
    paths: Vec<glob::Pattern>,
    /// Never watched: these directories and what is below them.
    never: Vec<PathBuf>,
    /// Never watched: these files, and any file beside them whose name starts with their
    /// stem (`web-out-1.log`, rotated `web-out.log.1`).
    logs: Vec<PathBuf>,
}

impl Rules {
    /// The rules of `watch` for an app running in `cwd`, never watching anything under
    /// `never` (the home) nor the files `logs` (and their instance or rotated siblings).
    pub fn new(watch: &Watch, cwd: &Path, never: Vec<PathBuf>, logs: Vec<PathBuf>) -> Self {
        let (mut names, mut paths) = (Vec::new(), Vec::new());
        let all = balancer_config::defaults::WATCH_IGNORE
            .iter()
            .copied()
            .chain(watch.ignore.iter().map(String::as_str));
        for pattern in all {
            // Checked by the config; a pattern that fails here is one that could not be read.
            let Ok(compiled) = glob::Pattern::new(pattern.trim_end_matches('/')) else {
                continue;
            };
            if pattern.trim_end_matches('/').contains('/') {
                paths.push(compiled);
            } else {
                names.push(compiled);
            }
        }
        Rules {
            roots: watch.paths.clone(),
            cwd: cwd.to_path_buf(),
            names,
            paths,
            never,
            logs,
        }
    }

    /// The app's cwd, against which patterns with a `/` are matched.
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// Every pattern applied, defaults first, as `show` lists them.
    pub fn patterns(&self) -> Vec<String> {
        self.names
            .iter()
            .chain(&self.paths)
            .map(|p| p.as_str().to_owned())
            .collect()
    }

    /// Whether a change to `path` should reload: it is a watched file or below a watched
    /// directory, and no rule ignores it.
    pub fn wants(&self, path: &Path) -> bool {
        let Some(root) = self
            .roots
            .iter()
            .filter(|r| path.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
        else {
            return false;
        };
        !self.ignores(root, path)
    }

    /// Whether `path` (below `root`) is ignored. Names are matched below the root only, so a
    /// project living in a dot-directory (`/tmp/.tmpXYZ/app`) is still watched.
    fn ignores(&self, root: &Path, path: &Path) -> bool {
        if self.never.iter().any(|n| path.starts_with(n)) || self.is_log(path) {
            return true;
        }
        let below = path.strip_prefix(root).unwrap_or(path);
        let by_name = below.components().any(|c| {
            let name = c.as_os_str().to_string_lossy();
            self.names.iter().any(|p| p.matches(&name))
        });
        if by_name {
            return true;
        }
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..glob::MatchOptions::new()
        };
        let relative = path.strip_prefix(&self.cwd).ok();
        self.paths.iter().any(|p| {
            if p.as_str().starts_with('/') {
                p.matches_path_with(path, options)
            } else {
                relative.is_some_and(|r| p.matches_path_with(r, options))
            }
        })
    }

    fn is_log(&self, path: &Path) -> bool {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let name = name.to_string_lossy();
        self.logs.iter().any(|log| {
            log.parent() == Some(dir)
                && log
                    .file_stem()
                    .is_some_and(|stem| name.starts_with(&*stem.to_string_lossy()))
        })
    }
}

/// What a watch covers, for `show` and the master's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchReport {
    /// Directories (and watched files' directories) with an inotify watch.
    pub watched: usize,
    /// Directories that should be watched but are not (the watch limit), up to
    /// [`NAMED_UNWATCHED`] of them named.
    pub unwatched: Vec<PathBuf>,
    /// How many are not watched in all.
    pub unwatched_count: usize,
    /// What went wrong and what to do, when something did.
    pub warning: Option<String>,
    /// How long walking the tree and adding the watches took.
    pub setup: Option<Duration>,
}

/// What the notify thread leaves for [`Watcher::next_change`].
#[derive(Default)]
struct Pending {
    /// Something that matters changed since the last [`Watcher::next_change`].
    dirty: bool,
    /// The first such path, for the restart's reason.
    first: Option<PathBuf>,
    /// Directories created since, to walk and watch.
    new_dirs: Vec<PathBuf>,
    /// The watch limit was hit while notify watched on its own.
    limit_hit: bool,
    /// [`Watcher::stop`] was called.
    stopped: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle that stops a [`Watcher`] from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Makes a blocked [`Watcher::next_change`] return `None`, now and from then on.
    pub fn stop(&self) {
        self.0.lock().stopped = true;
        self.0.wake.notify_all();
    }
}

/// The watches of one app. Blocking: meant for a thread of its own, never a runtime thread.
pub struct Watcher {
    inner: notify::RecommendedWatcher,
    rules: Arc<Rules>,
    shared: Arc<Shared>,
    report: Arc<Mutex<WatchReport>>,
}

impl Watcher {
    /// Starts inotify and watches every directory of `rules`' roots that is not ignored.
    /// Hitting the watch limit is not an error: the report says what is not watched, and
    /// everything watched so far keeps working.
    pub fn start(rules: Rules) -> Result<Self, WatchError> {
        let rules = Arc::new(rules);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let handler = {
            let (rules, shared) = (Arc::clone(&rules), Arc::clone(&shared));
            move |event: notify::Result<notify::Event>| on_event(&rules, &shared, event)
        };
        let inner = notify::recommended_watcher(handler).map_err(WatchError::Init)?;
        let mut watcher = Watcher {
            inner,
            rules,
            shared,
            report: Arc::new(Mutex::new(WatchReport::default())),
        };
        let began = Instant::now();
        let roots = watcher.rules.roots.clone();
        for root in &roots {
            watcher.watch_tree(root);
        }
        watcher.report().setup = Some(began.elapsed());
        Ok(watcher)
    }

    /// The report, shared: it is updated as directories come and go.
    pub fn report_handle(&self) -> Arc<Mutex<WatchReport>> {
        Arc::clone(&self.report)
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// A handle to stop this watcher from elsewhere.
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.shared))
    }

    fn report(&self) -> std::sync::MutexGuard<'_, WatchReport> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until something that matters changed and then nothing more for `delay` (at
    /// most [`MAX_DEBOUNCE_FACTOR`] × `delay` in all); returns the first path that changed.
    /// `None` once stopped.
    pub fn next_change(&mut self, delay: Duration) -> Option<PathBuf> {
        let first = {
            let mut pending = self.shared.lock();
            loop {
                if pending.stopped {
                    return None;
                }
                let dirs = std::mem::take(&mut pending.new_dirs);
                if !dirs.is_empty() || pending.limit_hit {
                    drop(pending);
                    self.absorb(dirs);
                    pending = self.shared.lock();
                    continue;
                }
                if pending.dirty {
                    pending.dirty = false;
                    break pending.first.take();
                }
                pending = self
                    .shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let give_up = Instant::now() + delay * MAX_DEBOUNCE_FACTOR;
        loop {
            let mut pending = self.shared.lock();
            let now = Instant::now();
            if !pending.dirty && !pending.stopped && now < give_up {
                let wait = delay.min(give_up - now);
                pending = self
                    .shared
                    .wake
                    .wait_timeout(pending, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if pending.stopped {
                return None;
            }
            let dirs = std::mem::take(&mut pending.new_dirs);
            let more = std::mem::take(&mut pending.dirty);
            pending.first = None;
            drop(pending);
            self.absorb(dirs);
            if !more || Instant::now() >= give_up {
                return first.or_else(|| self.rules.roots.first().cloned());
            }
        }
    }

    /// Watches directories created since the last look (and notes a limit notify hit).
    fn absorb(&mut self, dirs: Vec<PathBuf>) {
        let limit_hit = std::mem::take(&mut self.shared.lock().limit_hit);
        if limit_hit {
            self.limit_reached(None);
        }
        for dir in dirs {
            self.watch_tree(&dir);
        }
    }

    /// Watches `top` and every directory below it that is not ignored (a file: its directory,
    /// whose events are then filtered to that file).
    fn watch_tree(&mut self, top: &Path) {
        if !top.is_dir() {
            if let Some(dir) = top.parent() {
                self.watch_one(dir);
            }
            return;
        }
        let rules = Arc::clone(&self.rules);
        let walk = walkdir::WalkDir::new(top)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| e.file_type().is_dir() && (e.depth() == 0 || rules.wants(e.path())));
        let mut dirs = walk
            .filter_map(Result::ok)
            .map(walkdir::DirEntry::into_path);
        while let Some(dir) = dirs.next() {
            if !self.watch_one(&dir) {
                // The limit: every directory left in the walk goes unwatched too.
                let rest: Vec<PathBuf> = std::iter::once(dir).chain(dirs).collect();
                self.limit_reached(Some(rest));
                return;
            }
        }
    }

    /// One inotify watch; `false` when the watch limit refused it.
    fn watch_one(&mut self, dir: &Path) -> bool {
        match self.inner.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.report().watched += 1;
                true
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => false,
            // Gone between the walk and the watch, or unreadable: nothing there to reload for.
            Err(e) => {
                tracing::debug!(dir = %dir.display(), "not watched: {e}");
                true
            }
        }
    }

    /// Records that the watch limit left `rest` (or an unknown set) unwatched, and says so
    /// once in the master's log.
    fn limit_reached(&mut self, rest: Option<Vec<PathBuf>>) {
        let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let mut report = self.report();
        let first_time = report.warning.is_none();
        if let Some(rest) = rest {
            report.unwatched_count += rest.len();
            let room = NAMED_UNWATCHED.saturating_sub(report.unwatched.len());
            report.unwatched.extend(rest.into_iter().take(room));
        }
        let warning = limit_warning(limit, report.watched, report.unwatched_count);
        if first_time {
            tracing::warn!(
                watched = report.watched,
                unwatched = report.unwatched_count,
                first = ?report.unwatched.first(),
                "{warning}"
            );
        }
        report.warning = Some(warning);
    }
}

/// The warning `show` and the log give when the watch limit is hit.
fn limit_warning(limit: Option<u64>, watched: usize, unwatched: usize) -> String {
    let limit_text = limit.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let raise = limit.map_or(524_288, |n| (n * 2).max(524_288));
    format!(
        "inotify watch limit reached (fs.inotify.max_user_watches = {limit_text}, shared by \
         every process of this user): {watched} directories watched, {unwatched} not, and \
         changes there do not reload; add what need not be watched to `ignore_watch`, or \
         raise the limit: `sysctl fs.inotify.max_user_watches={raise}` (persist it in \
         /etc/sysctl.d/), then `balancer reload` the app's file"
    )
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stopper().stop();
    }
}

/// notify's thread: one event. Only what changes content counts (opens and closes do not).
fn on_event(rules: &Rules, shared: &Shared, event: notify::Result<notify::Event>) {
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                shared.lock().limit_hit = true;
                shared.wake.notify_all();
            }
            return;
        }
    };
    let rescan = event.flag() == Some(Flag::Rescan);
    let counts = rescan
        || matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        );
    if !counts {
        return;
    }
    let mut pending = shared.lock();
    let mut woke = false;
    for path in &event.paths {
        if !rules.wants(path) {
            continue;
        }
        if matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_)) && path.is_dir() {
            pending.new_dirs.push(path.clone());
        }
        pending.dirty = true;
        if pending.first.is_none() {
            pending.first = Some(path.clone());
        }
        woke = true;
    }
    if rescan {
        // The kernel's queue overflowed: something changed, nobody knows what.
        pending.dirty = true;
        woke = true;
    }
    if woke {
        shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    //! Real inotify on a tempdir; no assertion depends on the machine's speed (waits are
    //! bounded by generous timeouts, on a thread of their own).

    use std::fs;
    use std::sync::mpsc;

    use super::*;

    fn watch(paths: Vec<PathBuf>, ignore: &[&str]) -> Watch {
        Watch {
            paths,
            ignore: ignore.iter().map(|s| s.to_string()).collect(),
            delay: Duration::from_millis(50),
        }
    }

    #[test]
    fn rules_ignore_names_below_the_root_paths_from_cwd_home_and_logs() {
        let cwd = PathBuf::from("/tmp/.tmpAB/app");
        let home = PathBuf::from("/tmp/.tmpAB/app/.balancer-home");
        let rules = Rules::new(
            &watch(vec![cwd.clone()], &["*.log", "src/gen/**", "/abs/**"]),
            &cwd,
            vec![home.join("x")],
            vec![cwd.join("logs/web-out.log")],
        );
        let at = |rel: &str| rules.wants(&cwd.join(rel));
        assert!(
            at("server.js"),
            "a dot-directory above the root is not a rule"
        );
        assert!(at("src/app.js"));
        assert!(!at("node_modules/x/index.js"), "default");
        assert!(!at("src/node_modules"), "default, at any depth");
        assert!(!at(".git/HEAD"), "dot-entries by default");
        assert!(!at("src/.app.js.swp"));
        assert!(
            !at("debug.log") && !at("src/a.log"),
            "a name pattern at any depth"
        );
        assert!(!at("src/gen/a/b.js"), "a path pattern from cwd");
        assert!(at("src/generated.js"));
        assert!(
            !at("logs/web-out.log") && !at("logs/web-out-1.log"),
            "own logs"
        );
        assert!(!at("logs/web-out.log.1.gz"), "rotated logs");
        assert!(at("logs/other.txt"));
        assert!(
            !rules.wants(Path::new("/elsewhere/a.js")),
            "not under a root"
        );
        assert!(!at(".balancer-home/x/logs/a"), "the home");
        let rules = Rules::new(
            &watch(vec!["/abs".into()], &["/abs/skip/**"]),
            &cwd,
            vec![],
            vec![],
        );
        assert!(!rules.wants(Path::new("/abs/skip/x")));
        assert!(rules.wants(Path::new("/abs/keep/x")));
        assert_eq!(
            rules.patterns(),
            ["node_modules", ".*", "/abs/skip/**"],
            "defaults first"
        );
    }

    /// Runs `next_change` on a thread and returns what it gave within a (generous) bound.
    fn next(mut w: Watcher, delay: Duration) -> mpsc::Receiver<(Option<PathBuf>, Watcher)> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let got = w.next_change(delay);
            let _ = tx.send((got, w));
        });
        rx
    }

    const BOUND: Duration = Duration::from_secs(30);

    #[test]
    fn a_burst_of_changes_is_one_change_and_ignored_paths_none() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join("src")).unwrap();
        fs::create_dir_all(root.join("node_modules/dep")).unwrap();
        let w = Watcher::start(Rules::new(
            &watch(vec![root.clone()], &["*.tmp"]),
            &root,
            vec![],
            vec![],
        ))
        .unwrap();
        let report = w.report_handle();
        assert_eq!(
            report.lock().unwrap().watched,
            2,
            "root and src; node_modules costs none"
        );

        // Ignored writes never wake it; a real one does, once for the whole burst.
        fs::write(root.join("node_modules/dep/index.js"), "x").unwrap();
        fs::write(root.join("a.tmp"), "x").unwrap();
        fs::write(root.join(".hidden"), "x").unwrap();
        let rx = next(w, Duration::from_millis(200));
        assert!(
            rx.recv_timeout(Duration::from_millis(700)).is_err(),
            "ignored paths do not count"
        );
        for i in 0..20 {
            fs::write(root.join("src").join(format!("f{i}.js")), "x").unwrap();
        }
        let (first, w) = rx.recv_timeout(BOUND).expect("a change");
        assert!(first.unwrap().starts_with(root.join("src")));
        let rx = next(w, Duration::from_millis(200));
        assert!(
            rx.recv_timeout(Duration::from_millis(700)).is_err(),
            "twenty writes were one change"
        );

        // A directory made later is watched too.
        fs::create_dir_all(root.join("lib/deep")).unwrap();
        let (_, w) = rx.recv_timeout(BOUND).expect("the mkdir is a change");
        let rx = next(w, Duration::from_millis(50));
        fs::write(root.join("lib/deep/x.js"), "x").unwrap();
        let (first, w) = rx
            .recv_timeout(BOUND)
            .expect("a change in the new directory");
        assert_eq!(first.as_deref(), Some(root.join("lib/deep/x.js").as_path()));
        assert!(w.report_handle().lock().unwrap().watched >= 4);

        // Stopped: returns None.
        let stopper = w.stopper();
        let rx = next(w, Duration::from_millis(50));
        stopper.stop();
        assert!(rx.recv_timeout(BOUND).expect("returns").0.is_none());
    }

    #[test]
    fn a_change_during_the_callers_reload_queues_exactly_one_more() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mut w = Watcher::start(Rules::new(
            &watch(vec![root.clone()], &[]),
            &root,
            vec![],
            vec![],
        ))
        .unwrap();
        fs::write(root.join("a.js"), "1").unwrap();
        // Bounded by the write above having happened: it is queued in the kernel already.
        let rx = next(w, Duration::from_millis(20));
        let (_, back) = rx.recv_timeout(BOUND).expect("first change");
        w = back;
        // "Reloading": nobody calls next_change while 20 writes land.
        for i in 0..20 {
            fs::write(root.join("a.js"), i.to_string()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let rx = next(w, Duration::from_millis(20));
        let (_, w) = rx.recv_timeout(BOUND).expect("one more");
        let rx = next(w, Duration::from_millis(20));
        assert!(
            rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "and only one"
        );
    }

    /// The watch limit, for real: the child test runs in a user namespace of its own whose
    /// `max_inotify_watches` is 3 (a per-namespace limit: the machine's is left alone).
    #[test]
    fn the_watch_limit_leaves_the_rest_unwatched_and_says_what_to_do() {
        if std::env::var_os("BALANCER_WATCH_LIMIT_CHILD").is_some() {
            return limit_child();
        }
        let Ok(me) = std::env::current_exe() else {
            return;
        };
        let status = std::process::Command::new("unshare")
            .args(["-U", "-r", "sh", "-c"])
            .arg("echo 3 > /proc/sys/user/max_inotify_watches && exec \"$0\" --exact watch::tests::the_watch_limit_leaves_the_rest_unwatched_and_says_what_to_do --nocapture")
            .arg(&me)
            .env("BALANCER_WATCH_LIMIT_CHILD", "1")
            .status();
        match status {
            Ok(s) if s.code() == Some(0) => {}
            Ok(s) => panic!("the child test failed: {s}"),
            // No unshare(1) or no user namespaces here: nothing to test it with.
            Err(e) => eprintln!("skipped: cannot run unshare: {e}"),
        }
    }

    fn limit_child() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for i in 0..6 {
            fs::create_dir_all(root.join(format!("d{i}"))).unwrap();
        }
        let w = Watcher::start(Rules::new(
            &watch(vec![root.clone()], &[]),
            &root,
            vec![],
            vec![],
        ))
        .expect("the watcher starts; only watches are refused");
        let report = w.report_handle().lock().unwrap().clone();
        assert_eq!(report.watched, 3, "{report:?}");
        assert_eq!(report.unwatched_count, 4, "{report:?}");
        assert_eq!(report.unwatched.len(), 4);
        let warning = report.warning.expect("a warning");
        assert!(warning.contains("inotify watch limit reached"), "{warning}");
        assert!(
            warning.contains("sysctl fs.inotify.max_user_watches="),
            "{warning}"
        );
        // What is watched still works.
        let watched = report_watched_dir(&root, &report.unwatched);
        let rx = next(w, Duration::from_millis(20));
        fs::write(watched.join("x.js"), "x").unwrap();
        assert!(rx.recv_timeout(BOUND).expect("still watching").0.is_some());
    }

    fn report_watched_dir(root: &Path, unwatched: &[PathBuf]) -> PathBuf {
        std::iter::once(root.to_path_buf())
            .chain((0..6).map(|i| root.join(format!("d{i}"))))
            .find(|d| !unwatched.contains(d))
            .unwrap()
    }
}
