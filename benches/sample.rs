//! One sample round of the CPU/memory sampler (`workers/src/stats.rs`): 16 watched workers,
//! each a real process in its own group with one child, on whatever else the machine runs.
//! The round's cost times the rounds per second is the master's sampling CPU; the ratio to one
//! bare `/proc` listing shows what reading every process's `stat` costs on top.
//!
//! `cargo bench --bench sample`

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use balancer_workers::Sampler;
use criterion::{Criterion, criterion_group, criterion_main};

/// 16 stand-in workers: `sh` in its own process group, running a `sleep` child.
fn workers() -> Vec<Child> {
    (0..16)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "sleep 600; true"])
                .stdin(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawn a stand-in worker")
        })
        .collect()
}

fn sample(c: &mut Criterion) {
    let mut children = workers();
    // An hour between the thread's own rounds: only the benchmark samples.
    let sampler = Sampler::new(Duration::from_secs(3600));
    let usages: Vec<_> = children
        .iter()
        .map(|c| sampler.watch(c.id(), None))
        .collect();
    let processes = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0);
    eprintln!("sampling 16 workers among {processes} processes");
    let mut group = c.benchmark_group("sample");
    group.bench_function("round_16_workers", |b| b.iter(|| sampler.sample_now()));
    group.bench_function("list_proc_only", |b| {
        b.iter(|| std::fs::read_dir("/proc").map(|d| d.count()).unwrap_or(0))
    });
    group.finish();
    assert!(
        usages
            .iter()
            .all(|u| u.snapshot().is_some_and(|s| s.processes == 2))
    );
    for child in &mut children {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
    }
}

criterion_group!(benches, sample);
criterion_main!(benches);
