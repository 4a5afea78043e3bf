//! Applying a configuration to the running master: what is new starts, what changed reloads
//! with its new config, what its source no longer lists is deleted. Every new public listener
//! is bound before anything changes, so a taken port changes nothing.

use std::sync::Arc;

use balancer_config::{App, Config, Listener, Policy};
use balancer_workers::AppSupervisor;
use balancer_workers::reuseport::Group;
use tokio_util::sync::CancellationToken;

use super::{AppEntry, Apply, BindError, ControlError, ListenerEntry, Master, OpResult, Source};
use crate::listener::{self, Bound};
use crate::proxy::{Route, RouteSettings};

/// What happens to one app of a configuration that is being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// No app has this name: start it.
    New,
    /// The same configuration: nothing (`start`) or a reload (`reload`).
    Unchanged,
    /// Only the worker count differs: scale (`start`) or reload (`reload`).
    Count,
    /// Anything else differs: reload with the new configuration.
    Changed,
}

impl Change {
    /// How `wanted` differs from `current` (the app of the same name, if there is one).
    pub(super) fn of(current: Option<&App>, wanted: &App) -> Change {
        let Some(current) = current else {
            return Change::New;
        };
        let same_but_count = App {
            instances: current.instances,
            instances_spec: current.instances_spec,
            ..wanted.clone()
        } == *current;
        match (same_but_count, current.instances == wanted.instances) {
            (true, true) => Change::Unchanged,
            (true, false) => Change::Count,
            (false, _) => Change::Changed,
        }
    }
}

/// Whether two listeners are served by the same socket (their env var names may differ).
pub(super) fn same_socket(a: &Listener, b: &Listener) -> bool {
    a.addr == b.addr && a.proto == b.proto
}

/// The master's socket for `listener` of `app`: bound under rr, `None` under reuseport (after
/// checking that the address can be shared; each worker gets its own socket).
pub(super) fn bind_for(app: &App, listener: &Listener) -> std::io::Result<Option<Bound>> {
    match app.policy {
        Policy::RoundRobin => listener::bind(listener).map(Some),
        Policy::ReusePort => Group::check_bind(listener).map(|()| None),
    }
}

/// The route settings of `app`'s listener number `listener_index`; a UDP listener's
/// `max_flows` is held to `flow_cap`, what the master's descriptor budget allows.
pub(super) fn route_settings(app: &App, listener_index: usize, flow_cap: u32) -> RouteSettings {
    let mut udp = app.udp;
    udp.max_flows = udp.max_flows.min(flow_cap);
    RouteSettings {
        listener_index,
        connect_timeout: app.connect_timeout,
        queue_timeout: app.queue_timeout,
        udp,
        http: app.http,
        balance: app.balance,
        max_conns: app.max_conns.map(|n| n as usize),
        proxy_protocol: app
            .listen
            .get(listener_index)
            .and_then(|l| l.proxy_protocol),
        accept_proxy: app
            .listen
            .get(listener_index)
            .is_some_and(|l| l.accept_proxy),
    }
}

impl Master {
    /// `start SCRIPT|COMMAND`: the apps of a config the CLI built, each its own
    /// [`Source::CommandLine`], so one CLI start never deletes another's app. A name already
    /// running (from the command line or a file) is refused unless `force`, as PM2 refuses
    /// "Script already launched" without `-f`; with `force` the app is replaced by a reload
    /// with the new configuration (zero downtime), and the command line owns it from then on.
    pub async fn start_from_command_line(&self, config: Config, force: bool) -> OpResult {
        // Checked and applied under one lock: two starts of one name cannot both pass.
        let _change = self.changes.lock().await;
        if !force {
            let entries = self.entries();
            for app in &config.apps {
                if let Some(e) = entries.iter().find(|e| e.sup.app().name == app.name) {
                    return Err(ControlError::AlreadyRunning {
                        app: app.name.clone(),
                        from: e.source.to_string(),
                    });
                }
            }
        }
        let mut done = Vec::new();
        for app in &config.apps {
            let one = Config {
                apps: vec![app.clone()],
                ..config.clone()
            };
            let source = Source::CommandLine(app.name.clone());
            // Forced: PM2's "re-execution", so even an unchanged app gets new workers.
            let mode = if force { Apply::Reload } else { Apply::Start };
            done.push(self.apply_locked(one, source, mode).await?);
        }
        Ok(done.join("; "))
    }

    /// Applies a configuration: new apps start, changed apps reload with their new config (and
    /// new worker count), apps that `source` brought earlier but the config no longer has are
    /// deleted. With [`Apply::Reload`], unchanged apps are reloaded too. New listeners are all
    /// bound before anything changes, so a taken port changes nothing.
    pub async fn apply(&self, config: Config, source: Source, mode: Apply) -> OpResult {
        let _change = self.changes.lock().await;
        self.apply_locked(config, source, mode).await
    }

    /// [`apply`](Self::apply), for a caller that holds `changes`.
    async fn apply_locked(&self, config: Config, source: Source, mode: Apply) -> OpResult {
        for app in &config.apps {
            balancer_workers::capture::check(app)?;
        }
        // Bind first: every listener that no current app already holds.
        let mut fresh = Vec::new();
        for app in &config.apps {
            let held = self.held_listeners(&app.name);
            let mut sockets = Vec::new();
            for l in app
                .listen
                .iter()
                .filter(|l| !held.iter().any(|h| same_socket(h, l)))
            {
                if let Some(socket) = self.upgrade.inherited(l) {
                    sockets.push((l.clone(), socket));
                    continue;
                }
                // Under reuseport the master holds no socket (`bind_for`): each worker gets its
                // own in the group.
                let socket = bind_for(app, l).map_err(|source| BindError {
                    listener: l.to_string(),
                    app: app.name.clone(),
                    source,
                })?;
                if let Some(socket) = socket {
                    sockets.push((l.clone(), socket));
                }
            }
            fresh.push(sockets);
        }
        // Master-wide settings: the file applied last sets them. A file that names no metrics
        // address leaves the endpoint another one started.
        crate::proxy::uring::set(config.balancer.io).map_err(ControlError::Uring)?;
        if let Some(addr) = config.balancer.metrics {
            self.serve_metrics(addr)
                .map_err(|source| ControlError::Metrics { addr, source })?;
        }
        self.spawn
            .sampler
            .set_interval(config.balancer.sample_interval);

        let mut done = Vec::new();
        let mut failures = Vec::new();
        let names: Vec<String> = config.apps.iter().map(|a| a.name.clone()).collect();
        for (app, sockets) in config.apps.into_iter().zip(fresh) {
            let name = app.name.clone();
            let Some(sup) = self.supervisor(&name) else {
                let sockets = sockets.into_iter().map(|(_, s)| s).collect();
                let sup = self.add_app(app, sockets, source.clone());
                match sup.wait_started().await {
                    Ok(()) => done.push(format!("started {name}")),
                    Err(e) => failures.push(ControlError::app(&sup, e)),
                }
                continue;
            };
            let result = match (Change::of(Some(&sup.app()), &app), mode) {
                (Change::Unchanged, Apply::Start) => Ok(format!("{name} unchanged")),
                (Change::Count, Apply::Start) => sup.rescale(app.clone()).await,
                _ => {
                    sup.reload(Some(app.clone()), balancer_workers::Target::All)
                        .await
                }
            };
            match result {
                Ok(message) => {
                    self.rewire_listeners(&sup, &app, sockets);
                    self.set_source(&name, source.clone());
                    done.push(message);
                }
                Err(e) => failures.push(ControlError::app(&sup, e)),
            }
        }
        // Apps this source brought before that it no longer lists.
        let gone: Vec<String> = self
            .entries()
            .iter()
            .filter(|e| e.source == source && !names.contains(&e.sup.app().name))
            .map(|e| e.sup.app().name.clone())
            .collect();
        for name in gone {
            done.push(self.delete_app(&name).await?);
        }
        match ControlError::all(failures) {
            None => Ok(done.join("; ")),
            Some(error) => Err(error),
        }
    }

    /// Starts `app` with its bound `sockets` (one per rr listener, in `listen` order) and
    /// registers it.
    pub(super) fn add_app(
        &self,
        app: App,
        sockets: Vec<Bound>,
        source: Source,
    ) -> Arc<AppSupervisor> {
        let sup = AppSupervisor::start(app.clone(), Arc::clone(&self.spawn));
        let listeners = app
            .listen
            .iter()
            .zip(sockets)
            .enumerate()
            .map(|(index, (config, socket))| {
                self.serve_listener(&sup, config.clone(), index, socket)
            })
            .collect();
        self.entries().push(AppEntry {
            sup: Arc::clone(&sup),
            listeners,
            source,
        });
        sup
    }

    fn serve_listener(
        &self,
        sup: &Arc<AppSupervisor>,
        config: Listener,
        index: usize,
        socket: Bound,
    ) -> ListenerEntry {
        let app = sup.app();
        let route = Arc::new(
            Route::new(
                app.name.clone(),
                Arc::clone(sup.pool()),
                route_settings(&app, index, self.flow_cap),
            )
            .for_listener(&config.to_string()),
        );
        let stop = CancellationToken::new();
        tracing::info!(app = %app.name, listener = %config, "listening");
        if config.proto == balancer_config::Proto::Udp && app.udp.max_flows > self.flow_cap {
            tracing::warn!(
                app = %app.name, listener = %config,
                "max_flows {} held to {} by the open file limit (one descriptor per flow); raise \
                 the limit (LimitNOFILE=, ulimit -n) for more",
                app.udp.max_flows, self.flow_cap
            );
        }
        let dup = match &socket {
            Bound::Stream(l) => std::os::fd::AsFd::as_fd(l).try_clone_to_owned(),
            Bound::Datagram(s) => std::os::fd::AsFd::as_fd(s).try_clone_to_owned(),
        };
        let ctx = listener::ServeContext {
            route: Arc::clone(&route),
            stop: stop.clone(),
            abort: self.abort_connections.clone(),
            tracker: self.connections.clone(),
            budget: Arc::clone(&self.budget),
        };
        let (gate, proto, until) = (self.accept_gate.clone(), config.proto, stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = gate.cancelled() => listener::serve(proto, socket, ctx).await,
                _ = until.cancelled() => {}
            }
        });
        ListenerEntry {
            config,
            route,
            stop,
            socket: dup
                .inspect_err(|e| tracing::warn!(app = %app.name, "cannot keep the listener for an upgrade: {e}"))
                .ok(),
        }
    }

    /// The listeners app `name` holds now (none if there is no such app).
    fn held_listeners(&self, name: &str) -> Vec<Listener> {
        self.entries()
            .iter()
            .find(|e| e.sup.app().name == name)
            .map(|e| e.listeners.iter().map(|l| l.config.clone()).collect())
            .unwrap_or_default()
    }

    fn set_source(&self, name: &str, source: Source) {
        if let Some(e) = self.entries().iter_mut().find(|e| e.sup.app().name == name) {
            e.source = source;
        }
    }

    /// After a reload changed `app`: keep the listeners it still has (re-pointed at the right
    /// private port), serve the newly bound ones, close the ones it dropped.
    pub(super) fn rewire_listeners(
        &self,
        sup: &Arc<AppSupervisor>,
        app: &App,
        mut fresh: Vec<(Listener, Bound)>,
    ) {
        let mut old = {
            let mut entries = self.entries();
            let Some(entry) = entries.iter_mut().find(|e| Arc::ptr_eq(&e.sup, sup)) else {
                return;
            };
            std::mem::take(&mut entry.listeners)
        };
        let mut kept = Vec::new();
        for (index, config) in app.listen.iter().enumerate() {
            if let Some(pos) = old.iter().position(|l| same_socket(&l.config, config)) {
                let mut entry = old.remove(pos);
                entry
                    .route
                    .update(route_settings(app, index, self.flow_cap));
                entry.config = config.clone();
                kept.push(entry);
            } else if let Some(pos) = fresh.iter().position(|(l, _)| l == config) {
                let (_, socket) = fresh.remove(pos);
                kept.push(self.serve_listener(sup, config.clone(), index, socket));
            }
        }
        for closed in old {
            tracing::info!(app = %app.name, listener = %closed.config, "listener closed");
            closed.stop.cancel();
        }
        if let Some(entry) = self.entries().iter_mut().find(|e| Arc::ptr_eq(&e.sup, sup)) {
            entry.listeners = kept;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Load;
    use balancer_config::LoadOptions;

    fn options() -> LoadOptions {
        LoadOptions {
            env: None,
            default_policy: Policy::RoundRobin,
            cpus: 4,
        }
    }

    fn config(dir: &std::path::Path, apps: &str) -> Config {
        balancer_config::parse(apps, &dir.join("balancer.toml"), &options()).unwrap()
    }

    /// An app whose worker needs no listener: ready as soon as it runs.
    fn sleeper(name: &str, instances: u32, extra: &str) -> String {
        format!(
            "[[app]]\nname = \"{name}\"\ncommand = [\"sleep\", \"1000\"]\ninstances = {instances}\n\
             kill_timeout = \"2s\"\n{extra}\n"
        )
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    fn master(dir: &std::path::Path) -> Master {
        Master::new(dir.join("home"), options(), CancellationToken::new(), None)
    }

    fn names(master: &Master) -> Vec<(String, usize)> {
        master
            .apps()
            .iter()
            .map(|(app, statuses)| (app.name.clone(), statuses.len()))
            .collect()
    }

    #[test]
    fn changes_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let a = &config(dir.path(), &sleeper("a", 2, "")).apps[0];
        let three = &config(dir.path(), &sleeper("a", 3, "")).apps[0];
        let other = &config(dir.path(), &sleeper("a", 2, "min_uptime = \"5s\"")).apps[0];
        assert_eq!(Change::of(None, a), Change::New);
        assert_eq!(Change::of(Some(a), a), Change::Unchanged);
        assert_eq!(Change::of(Some(a), three), Change::Count);
        assert_eq!(Change::of(Some(a), other), Change::Changed);
        assert_eq!(Change::of(Some(three), other), Change::Changed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_applied_again_starts_scales_and_deletes_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        let file = Source::File(dir.path().join("balancer.toml"));
        let first = config(dir.path(), &(sleeper("a", 1, "") + &sleeper("b", 1, "")));
        let done = m.apply(first, file.clone(), Apply::Start).await.unwrap();
        assert_eq!(done, "started a; started b");
        assert_eq!(names(&m), [("a".into(), 1), ("b".into(), 1)]);

        // Unchanged stays; a new count scales; an app the file no longer has is deleted.
        let second = config(dir.path(), &(sleeper("a", 1, "") + &sleeper("c", 2, "")));
        let done = m.apply(second, file.clone(), Apply::Start).await.unwrap();
        assert_eq!(done, "a unchanged; started c; deleted b");
        let third = config(dir.path(), &(sleeper("a", 2, "") + &sleeper("c", 2, "")));
        let done = m.apply(third, file.clone(), Apply::Start).await.unwrap();
        assert!(done.starts_with("scaled a from 1 to 2"), "{done}");
        assert_eq!(names(&m), [("a".into(), 2), ("c".into(), 2)]);

        // Another source's apps are not this file's to delete.
        let other = Source::File(dir.path().join("other.toml"));
        let solo = config(dir.path(), &sleeper("d", 1, ""));
        m.apply(solo, other, Apply::Start).await.unwrap();
        let fourth = config(dir.path(), &sleeper("a", 2, ""));
        let done = m.apply(fourth, file, Apply::Reload).await.unwrap();
        assert_eq!(done, "reloaded 2 worker(s) of a; deleted c");
        assert_eq!(names(&m), [("a".into(), 2), ("d".into(), 1)]);
        m.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn command_line_apps_are_each_their_own_and_a_taken_name_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        let file = Source::File(dir.path().join("balancer.toml"));
        m.apply(config(dir.path(), &sleeper("f", 1, "")), file, Apply::Start)
            .await
            .unwrap();
        for name in ["a", "b"] {
            let one = config(dir.path(), &sleeper(name, 1, ""));
            let done = m.start_from_command_line(one, false).await.unwrap();
            assert_eq!(done, format!("started {name}"));
        }
        assert_eq!(
            names(&m),
            [("f".into(), 1), ("a".into(), 1), ("b".into(), 1)]
        );
        for name in ["a", "f"] {
            let again = config(dir.path(), &sleeper(name, 2, ""));
            let err = m.start_from_command_line(again, false).await.unwrap_err();
            assert!(matches!(err, ControlError::AlreadyRunning { .. }), "{err}");
        }
        let err = m
            .start_from_command_line(config(dir.path(), &sleeper("f", 1, "")), false)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("balancer.toml"),
            "names the source: {err}"
        );
        let forced = config(dir.path(), &sleeper("f", 2, ""));
        let done = m.start_from_command_line(forced, true).await.unwrap();
        assert!(done.starts_with("reloaded"), "{done}");
        assert_eq!(
            names(&m),
            [("f".into(), 2), ("a".into(), 1), ("b".into(), 1)]
        );
        m.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_taken_port_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        let file = Source::File(dir.path().join("balancer.toml"));
        m.apply(
            config(dir.path(), &sleeper("a", 1, "")),
            file.clone(),
            Apply::Start,
        )
        .await
        .unwrap();
        let port = free_port();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let wants_it = sleeper("b", 1, &format!("listen = [\"tcp://127.0.0.1:{port}\"]"));
        let err = m
            .apply(config(dir.path(), &wants_it), file, Apply::Start)
            .await
            .unwrap_err();
        assert!(matches!(err, ControlError::Bind(_)), "{err}");
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            names(&m),
            [("a".into(), 1)],
            "a is neither deleted nor b started"
        );
        m.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_file_is_a_bad_config_and_an_unknown_target_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[[app]]\nname = \"x\"\ninstnaces = 2\n").unwrap();
        let err = m.load(&file, &Load::default()).await.unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("bad.toml:3:1"), "{err}");
        let err = m.stop("nope").await.unwrap_err();
        assert_eq!(err.to_string(), "no app or worker id named \"nope\"");
        m.shutdown().await;
    }
}
