//! CPU and memory of every worker's whole process tree, sampled from `/proc` every
//! `sample_interval` on one dedicated thread per master ([`Sampler`]); what each worker's
//! [`Usage`] holds, and the tick the memory guard (in the supervisor) waits on.
//!
//! **Which processes are a worker's.** A worker is its own process group (pgid = its pid, see
//! `spawn.rs`). A process counts as the worker's if its pgid is the worker's pid *or* its parent
//! chain reaches the worker's pid. The pgid catches a grandchild whose parent died (it is
//! re-parented to init, but stays in the group, and `killpg` still reaches it); the parent
//! chain catches a child that left the group (`setsid`, Node's `detached: true`) but is still
//! the worker's to answer for. Either alone misses one of them.
//!
//! **Why one thread and a hand-written reader.** One scan of `/proc` serves every worker of
//! every app: `/proc/PID/stat` alone gives ppid, pgid, CPU ticks and RSS, so each process on
//! the machine costs one open and one read, whatever the number of workers. Still, the kernel
//! builds each line (summing every thread's times), about 20 µs a process: on a busy machine a
//! full scan every second would cost more than the 0.5 % of a core we allow the master. So a
//! full scan runs every [`FULL_SCAN_EVERY`] rounds (and whenever a new worker appears); the
//! rounds in between read only the processes the last scan found in some tree. A child forked
//! in between is counted from the next full scan, at most `FULL_SCAN_EVERY` intervals late.
//! The reads block, so they run on a plain thread, never on the async runtime's workers, and
//! never near the proxies. The `procfs` crate would parse a dozen fields we do not use and
//! allocate per process; forty lines do the job at a fraction of the cost.
//!
//! **What the numbers mean.** Memory is the sum of the members' RSS (shared pages count once
//! per process that maps them, as in `ps`; PSS would need `smaps_rollup`, which walks every
//! mapping and costs far more). CPU seconds are the members' user + system time plus the time
//! of their reaped children (`cutime`/`cstime`), so a short-lived child's CPU is not lost when
//! it exits; the total never goes down (a member that dies unreaped by the tree takes its time
//! with it, and the counter waits for the tree to use that much again). CPU % is that total's
//! growth over the last interval, in percent of one core.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Rounds between two full scans of `/proc` (see the module's doc).
pub const FULL_SCAN_EVERY: u64 = 5;

/// The default `sample_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Consecutive samples above `max_memory_restart` before a worker is replaced: one sample over
/// is often a passing peak (a large request, a collection not yet run); three in a row, 3 s at
/// the default interval, is growth worth acting on, and still early for a leak.
pub const MEMORY_SAMPLES: u32 = 3;

/// What one worker's tree used, as of the last sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageSnapshot {
    /// Samples taken since the process started.
    pub samples: u64,
    /// Processes in the tree at the last sample (the worker included).
    pub processes: u32,
    /// CPU over the last interval, in percent of one core (above 100 on several cores).
    pub cpu_percent: f64,
    /// CPU seconds used by the tree since the process started (never goes down).
    pub cpu_seconds: f64,
    /// Resident memory of the whole tree, in bytes.
    pub memory: u64,
    /// History since the process started: lowest, mean and highest sampled memory.
    pub memory_min: u64,
    /// Mean of the sampled memory.
    pub memory_avg: u64,
    /// Highest sampled memory.
    pub memory_max: u64,
    /// Lowest CPU % of one interval.
    pub cpu_min: f64,
    /// CPU % over the whole life (CPU seconds / uptime).
    pub cpu_avg: f64,
    /// Highest CPU % of one interval.
    pub cpu_max: f64,
    /// Consecutive samples, up to now, above the worker's memory limit (0 without one).
    pub over_limit: u32,
}

/// One running worker's usage: written by the sampler thread, read by `ls`/`show`, the memory
/// guard and (through [`snapshot`](Usage::snapshot)) anyone exporting metrics.
#[derive(Debug)]
pub struct Usage {
    pid: u32,
    /// The worker's shim (0: none): orphans of the worker's tree are re-parented to it, so its
    /// other children and their descendants are the worker's too (the shim itself is not).
    adopter: u32,
    limit: Option<u64>,
    started: Instant,
    /// Cleared when the process is gone: the sampler forgets it, the figures stay readable.
    running: AtomicBool,
    /// The root's `starttime` (clock ticks since boot) at the first sample: a reused pid has
    /// another one.
    root_start: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    snapshot: UsageSnapshot,
    ticks: u64,
    memory_sum: u128,
    last: Option<Instant>,
}

impl Usage {
    fn new(pid: u32, adopter: Option<u32>, limit: Option<u64>) -> Self {
        Usage {
            pid,
            adopter: adopter.unwrap_or(0),
            limit,
            started: Instant::now(),
            running: AtomicBool::new(true),
            root_start: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    /// The worker's pid (the root of the tree).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The memory limit this worker is held to (`max_memory_restart` when it started).
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The last sample, or `None` before the first one.
    pub fn snapshot(&self) -> Option<UsageSnapshot> {
        let state = self.lock();
        (state.snapshot.samples > 0).then_some(state.snapshot)
    }

    /// Starts the count of samples over the limit again (after a replacement that failed, so
    /// the next attempt waits [`MEMORY_SAMPLES`] more samples instead of coming at every tick).
    pub fn reset_over_limit(&self) {
        self.lock().snapshot.over_limit = 0;
    }

    /// The process is gone: stop sampling it (the last figures stay).
    pub(crate) fn stop(&self) {
        self.running.store(false, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Folds one sample of the tree in: `ticks` of CPU in total, `rss` bytes, `processes`.
    fn record(&self, now: Instant, ticks: u64, rss: u64, processes: u32, clock: &Clock) {
        let mut state = self.lock();
        let ticks = ticks.max(state.ticks);
        // The first interval runs from the spawn, when the tree had used nothing.
        let since = state.last.unwrap_or(self.started);
        let wall = now.saturating_duration_since(since).as_secs_f64();
        let delta = clock.seconds(ticks - state.ticks);
        let percent = if wall > 0.0 {
            100.0 * delta / wall
        } else {
            0.0
        };
        let life = now.saturating_duration_since(self.started).as_secs_f64();
        state.ticks = ticks;
        state.last = Some(now);
        state.memory_sum += u128::from(rss);
        let s = &mut state.snapshot;
        let first = s.samples == 0;
        s.samples += 1;
        s.processes = processes;
        s.cpu_percent = percent;
        s.cpu_seconds = clock.seconds(ticks);
        s.memory = rss;
        s.memory_min = if first { rss } else { s.memory_min.min(rss) };
        s.memory_max = s.memory_max.max(rss);
        s.cpu_min = if first {
            percent
        } else {
            s.cpu_min.min(percent)
        };
        s.cpu_max = s.cpu_max.max(percent);
        s.cpu_avg = if life > 0.0 {
            100.0 * s.cpu_seconds / life
        } else {
            0.0
        };
        let samples = s.samples;
        s.over_limit = match self.limit {
            Some(limit) if rss > limit => s.over_limit.saturating_add(1),
            _ => 0,
        };
        state.snapshot.memory_avg = (state.memory_sum / u128::from(samples)) as u64;
    }
}

/// Samples every watched worker's tree every interval, on its own thread (started with the
/// first worker, ended when the sampler is dropped).
#[derive(Debug)]
pub struct Sampler {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    interval_ms: AtomicU64,
    watched: Mutex<Vec<Weak<Usage>>>,
    tick: watch::Sender<u64>,
    thread: Once,
    proc_root: PathBuf,
    /// Rounds so far, and the pids the last round found in some tree.
    known: Mutex<(u64, Vec<u32>)>,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new(DEFAULT_INTERVAL)
    }
}

impl Sampler {
    /// A sampler taking a sample every `interval`. No thread runs until a worker is watched.
    pub fn new(interval: Duration) -> Self {
        let (tick, _) = watch::channel(0);
        let sampler = Sampler {
            shared: Arc::new(Shared {
                interval_ms: AtomicU64::new(0),
                watched: Mutex::new(Vec::new()),
                tick,
                thread: Once::new(),
                proc_root: PathBuf::from("/proc"),
                known: Mutex::new((0, Vec::new())),
            }),
        };
        sampler.set_interval(interval);
        sampler
    }

    /// Changes the interval (from the next sample on); at least 10 ms.
    pub fn set_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(10);
        self.shared.interval_ms.store(ms, Ordering::Relaxed);
    }

    /// The current interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.shared.interval_ms.load(Ordering::Relaxed))
    }

    /// Starts sampling the tree of `pid`, holding it to `limit` bytes (counting samples over
    /// it). Sampling ends when the returned [`Usage`] is dropped or [`stop`](Usage::stop)ped.
    pub fn watch(&self, pid: u32, limit: Option<u64>) -> Arc<Usage> {
        self.watch_adopted(pid, None, limit)
    }

    /// Like [`watch`](Self::watch), for a worker run under a shim (`adopter`): the processes
    /// the shim adopted from the worker's tree count as the worker's.
    pub fn watch_adopted(&self, pid: u32, adopter: Option<u32>, limit: Option<u64>) -> Arc<Usage> {
        let usage = Arc::new(Usage::new(pid, adopter, limit));
        self.shared.lock_watched().push(Arc::downgrade(&usage));
        self.shared.thread.call_once(|| {
            let shared = Arc::downgrade(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("balancer-stats".into())
                .spawn(move || run(shared));
            if let Err(e) = spawned {
                tracing::error!("cannot start the stats sampler thread: {e}; no cpu/mem figures");
            }
        });
        usage
    }

    /// Changes each time a sample round has been recorded (its number): what the memory guard
    /// waits on.
    pub fn ticks(&self) -> watch::Receiver<u64> {
        self.shared.tick.subscribe()
    }

    /// Takes one sample of every watched worker now, on this thread (tests, and the thread's
    /// loop).
    pub fn sample_now(&self) {
        self.shared.sample();
    }
}

impl Shared {
    fn lock_watched(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Usage>>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One round: the live watched workers, one scan of `/proc`, one record per worker.
    fn sample(&self) {
        let usages: Vec<Arc<Usage>> = {
            let mut watched = self.lock_watched();
            watched.retain(|w| {
                w.upgrade()
                    .is_some_and(|u| u.running.load(Ordering::Relaxed))
            });
            watched.iter().filter_map(Weak::upgrade).collect()
        };
        if !usages.is_empty() {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            let (round, pids) = &mut *known;
            let new_worker = usages
                .iter()
                .any(|u| u.root_start.load(Ordering::Relaxed) == 0);
            let table = if *round % FULL_SCAN_EVERY == 0 || new_worker {
                scan(&self.proc_root)
            } else {
                read_some(&self.proc_root, pids)
            };
            *round += 1;
            pids.clear();
            let now = Instant::now();
            let clock = Clock::get();
            for usage in &usages {
                if let Some(found) = tree(&table, usage, clock.page) {
                    usage.record(
                        now,
                        found.ticks,
                        found.rss,
                        found.members.len() as u32,
                        &clock,
                    );
                    pids.extend(found.members);
                }
            }
        }
        self.tick.send_modify(|n| *n += 1);
    }
}

/// The sampler thread: sleep, sample, until the sampler is gone.
fn run(shared: Weak<Shared>) {
    loop {
        let Some(interval) = shared
            .upgrade()
            .map(|s| Duration::from_millis(s.interval_ms.load(Ordering::Relaxed)))
        else {
            return;
        };
        std::thread::sleep(interval);
        match shared.upgrade() {
            Some(shared) => shared.sample(),
            None => return,
        }
    }
}

/// The kernel's clock tick and page size, read once.
#[derive(Debug, Clone, Copy)]
struct Clock {
    hz: u64,
    page: u64,
}

impl Clock {
    fn get() -> Clock {
        static CLOCK: std::sync::OnceLock<Clock> = std::sync::OnceLock::new();
        *CLOCK.get_or_init(|| {
            use nix::unistd::{SysconfVar, sysconf};
            let read = |var, default: u64| {
                sysconf(var)
                    .ok()
                    .flatten()
                    .and_then(|v| u64::try_from(v).ok())
                    .filter(|&v| v > 0)
                    .unwrap_or(default)
            };
            Clock {
                hz: read(SysconfVar::CLK_TCK, 100),
                page: read(SysconfVar::PAGE_SIZE, 4096),
            }
        })
    }

    fn seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / self.hz as f64
    }
}

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pid: u32,
    ppid: u32,
    pgrp: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    /// Resident pages.
    rss: u64,
    /// Start time, in clock ticks after boot.
    start: u64,
}

/// Parses one `/proc/PID/stat` line. The command name may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(' ')?.0.trim().parse().ok()?;
    let f: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
    let ticks = [11, 12, 13, 14]
        .iter()
        .map(|&i| num(i).map(|v| v.max(0) as u64))
        .sum::<Option<u64>>()?;
    Some(Stat {
        pid,
        ppid: u32::try_from(num(1)?).ok()?,
        pgrp: u32::try_from(num(2)?).ok()?,
        ticks,
        rss: u64::try_from(num(21)?.max(0)).ok()?,
        start: u64::try_from(num(19)?).ok()?,
    })
}

/// The stat of each of `pids` that still exists.
fn read_some(root: &std::path::Path, pids: &[u32]) -> Vec<Stat> {
    let mut buf = String::with_capacity(512);
    pids.iter()
        .filter_map(|pid| {
            buf.clear();
            let path = root.join(pid.to_string()).join("stat");
            fs::File::open(path)
                .and_then(|mut f| f.read_to_string(&mut buf))
                .ok()?;
            parse_stat(&buf)
        })
        .collect()
}

/// Every process's stat (those that vanish mid-scan are skipped).
fn scan(root: &std::path::Path) -> Vec<Stat> {
    let Ok(dir) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut buf = String::with_capacity(512);
    let mut stats = Vec::with_capacity(256);
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        buf.clear();
        let mut path = entry.path();
        path.push("stat");
        let read = fs::File::open(&path).and_then(|mut f| f.read_to_string(&mut buf));
        if read.is_ok()
            && let Some(stat) = parse_stat(&buf)
        {
            stats.push(stat);
        }
    }
    stats
}

/// One worker's tree in one round.
struct Found {
    /// CPU ticks of every member (reaped children included).
    ticks: u64,
    /// Resident bytes of every member.
    rss: u64,
    /// The members' pids, the worker first.
    members: Vec<u32>,
}

/// The tree of `usage`'s worker in `table`; `None` if the worker is not there (gone, or its
/// pid now belongs to another process).
fn tree(table: &[Stat], usage: &Usage, page: u64) -> Option<Found> {
    let root = table.iter().find(|s| s.pid == usage.pid)?;
    match usage.root_start.load(Ordering::Relaxed) {
        0 => usage.root_start.store(root.start, Ordering::Relaxed),
        start if start != root.start => return None,
        _ => {}
    }
    let mut members = vec![root.pid];
    if usage.adopter != 0 {
        // Orphans the shim adopted from the worker's tree (not the shim itself).
        members.extend(
            table
                .iter()
                .filter(|s| s.ppid == usage.adopter && s.pid != root.pid)
                .map(|s| s.pid),
        );
    }
    let mut next = 0;
    // Breadth first over the parent links, then whoever else is in the group.
    while next < members.len() {
        let parent = members[next];
        next += 1;
        members.extend(
            table
                .iter()
                .filter(|s| s.ppid == parent && s.pid != root.pid)
                .map(|s| s.pid),
        );
    }
    members.extend(
        table
            .iter()
            .filter(|s| s.pgrp == root.pid && !members.contains(&s.pid))
            .map(|s| s.pid)
            .collect::<Vec<_>>(),
    );
    let (mut ticks, mut pages) = (0, 0);
    for stat in table.iter().filter(|s| members.contains(&s.pid)) {
        ticks += stat.ticks;
        pages += stat.rss;
    }
    Some(Found {
        ticks,
        rss: pages * page,
        members,
    })
}

#[cfg(test)]
mod tests {
    //! The parser on real and awkward lines; the tree rule on a real process tree (a shell in
    //! its own group, a child that left the group, an orphan that stayed in it).

    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (we ird) (x)) S 1 4242 4242 0 -1 4194560 1 0 0 0 30 12 5 3 20 0 1 0 \
                    9876 10000000 321 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                pid: 4242,
                ppid: 1,
                pgrp: 4242,
                ticks: 50,
                rss: 321,
                start: 9876
            }
        );
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        let me = parse_stat(&own).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.rss > 0);
        assert_eq!(parse_stat("12 (short) S 1"), None);
    }

    /// A new process group: `sh` (the "worker") starts a child that `setsid`s away (found by
    /// its parent) and a subshell whose own child outlives it (re-parented, found by its group).
    #[test]
    fn the_tree_takes_children_by_parent_and_orphans_by_group() {
        let mut worker = Command::new("sh")
            .args([
                "-c",
                "setsid sleep 30 & (sleep 30 & exit) ; echo ready; exec sleep 30",
            ])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = worker.id();
        let mut line = [0u8; 6];
        worker.stdout.take().unwrap().read_exact(&mut line).unwrap();
        let sampler = Sampler::new(Duration::from_secs(3600));
        let usage = sampler.watch(pid, Some(1));
        // The setsid'd child may need a moment to leave the group; the count is what matters.
        let mut seen = 0;
        for _ in 0..100 {
            sampler.sample_now();
            seen = usage.snapshot().unwrap().processes;
            let table = scan(std::path::Path::new("/proc"));
            let left_group = table.iter().any(|s| s.ppid == pid && s.pgrp != pid);
            let orphan = table
                .iter()
                .any(|s| s.pgrp == pid && s.ppid != pid && s.pid != pid);
            if seen == 3 && left_group && orphan {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let snap = usage.snapshot().unwrap();
        let table = scan(std::path::Path::new("/proc"));
        let kill = |pid: u32| {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        };
        table
            .iter()
            .filter(|s| s.ppid == pid)
            .for_each(|s| kill(s.pid));
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = worker.wait();
        assert_eq!(
            seen, 3,
            "worker, setsid child, orphaned grandchild: {snap:?}"
        );
        assert!(snap.memory > 0 && snap.memory_min <= snap.memory_max);
        assert!(snap.over_limit >= 1, "a 1-byte limit is exceeded at once");
        usage.stop();
        sampler.sample_now();
        assert_eq!(
            usage.snapshot().unwrap().samples,
            snap.samples,
            "no sample once stopped"
        );
    }

    #[test]
    fn record_keeps_history_and_a_monotonic_cpu_total() {
        let usage = Usage::new(1, None, Some(150));
        let clock = Clock { hz: 100, page: 1 };
        let t0 = usage.started;
        usage.record(t0 + Duration::from_secs(1), 50, 100, 1, &clock);
        usage.record(t0 + Duration::from_secs(2), 150, 200, 2, &clock);
        // A member died unreaped: the sum drops, the total does not.
        usage.record(t0 + Duration::from_secs(3), 120, 160, 1, &clock);
        let s = usage.snapshot().unwrap();
        assert_eq!(s.samples, 3);
        assert_eq!(s.cpu_seconds, 1.5);
        assert_eq!((s.cpu_min, s.cpu_max), (0.0, 100.0));
        assert_eq!(s.cpu_avg, 50.0);
        assert_eq!((s.memory_min, s.memory_avg, s.memory_max), (100, 153, 200));
        assert_eq!(s.over_limit, 2, "200 and 160 are over 150, in a row");
        usage.record(t0 + Duration::from_secs(4), 150, 100, 1, &clock);
        assert_eq!(usage.snapshot().unwrap().over_limit, 0, "back under: reset");
    }
}
