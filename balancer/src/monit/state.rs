//! `monit`'s model: what the dashboard knows and does, fed by snapshots and key presses and
//! producing the admin requests to send. Pure (no clock, no terminal, no socket), so every
//! behaviour of the dashboard is a unit test and every frame a snapshot of fixture data.

use std::collections::{HashMap, VecDeque};

use crate::protocol::{
    AppSnapshot, LogLine, Reply, Request, ScaleTo, Snapshot, Start, WorkerSnapshot,
};

use super::keys::Key;

/// Log lines kept for the logs pane; older ones scroll away.
const MAX_LOG_LINES: usize = 500;
/// Points kept per history (a sparkline or the chart is at most as wide as the terminal).
const MAX_HISTORY: usize = 240;

/// The four panes `tab` moves between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    /// The process list (arrows move the selection).
    List,
    /// The selected app's logs (arrows scroll).
    Logs,
    /// The selected worker's metrics (arrows move the selection).
    Metrics,
    /// The selected app's configuration and last exits (arrows scroll).
    Info,
}

impl Pane {
    fn next(self) -> Pane {
        match self {
            Pane::List => Pane::Logs,
            Pane::Logs => Pane::Metrics,
            Pane::Metrics => Pane::Info,
            Pane::Info => Pane::List,
        }
    }

    fn previous(self) -> Pane {
        match self {
            Pane::List => Pane::Info,
            Pane::Logs => Pane::List,
            Pane::Metrics => Pane::Logs,
            Pane::Info => Pane::Metrics,
        }
    }
}

/// What the loop must do after the model took an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond drawing again.
    None,
    /// Leave the dashboard.
    Quit,
    /// Send this request on its own connection and hand its reply to [`Model::on_reply`].
    Send(Request),
    /// Subscribe again with the logs of this app (the selection moved to another app).
    Follow(Option<String>),
}

/// An action waiting for its `y`/`n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// The question on the confirmation line.
    pub prompt: String,
    /// What `y` sends.
    pub request: Request,
}

/// One row of the process list: a worker, or an app that has none (scaled to 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Index in [`Model::apps`].
    pub app: usize,
    /// Index in that app's workers.
    pub worker: Option<usize>,
}

/// What the rows of one worker remember between snapshots, for its rates and sparkline.
#[derive(Debug, Clone, Default)]
pub struct WorkerHistory {
    pid: Option<u32>,
    connections_total: u64,
    bytes_total: u64,
    /// Connections per second over the last interval.
    pub connections_rate: f64,
    /// Bytes per second over the last interval.
    pub bytes_rate: f64,
    /// CPU % per snapshot, oldest first.
    pub cpu: VecDeque<f64>,
}

/// The dashboard's whole state.
#[derive(Debug, Clone)]
pub struct Model {
    /// The apps of the last snapshot.
    pub apps: Vec<AppSnapshot>,
    /// Per worker id.
    pub history: HashMap<u32, WorkerHistory>,
    /// Per app: its connections (requests) per second, one point per snapshot.
    pub app_rate: HashMap<String, VecDeque<u64>>,
    /// The selected row's app and worker id, kept across snapshots by identity.
    selected: Option<(String, Option<u32>)>,
    /// The selected row's index, the fallback when its worker or app goes away.
    index: usize,
    /// The pane `tab` is on.
    pub focus: Pane,
    /// Log lines of [`Model::logs_app`], oldest first.
    pub logs: VecDeque<LogLine>,
    /// The app whose logs are subscribed to.
    pub logs_app: Option<String>,
    /// Lines the master left out (over its per-frame cap) since the subscription began.
    pub logs_dropped: u64,
    /// Lines scrolled up from the bottom of the logs pane.
    pub log_scroll: usize,
    /// Lines scrolled down in the info pane.
    pub info_scroll: usize,
    /// The action waiting for confirmation.
    pub confirm: Option<Confirm>,
    /// What the last action did, or why the connection failed.
    pub status: Option<String>,
    /// The request sent and not answered yet: no second one is sent meanwhile.
    pub busy: Option<String>,
    last_elapsed: Option<u64>,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// A dashboard that has seen nothing yet.
    pub fn new() -> Model {
        Model {
            apps: Vec::new(),
            history: HashMap::new(),
            app_rate: HashMap::new(),
            selected: None,
            index: 0,
            focus: Pane::List,
            logs: VecDeque::new(),
            logs_app: None,
            logs_dropped: 0,
            log_scroll: 0,
            info_scroll: 0,
            confirm: None,
            status: None,
            busy: None,
            last_elapsed: None,
        }
    }

    /// The process list's rows, in order.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for (a, app) in self.apps.iter().enumerate() {
            if app.workers.is_empty() {
                rows.push(Row {
                    app: a,
                    worker: None,
                });
            }
            for w in 0..app.workers.len() {
                rows.push(Row {
                    app: a,
                    worker: Some(w),
                });
            }
        }
        rows
    }

    /// The index of the selected row (0 when there are none).
    pub fn selected_index(&self) -> usize {
        self.index
    }

    /// The selected app.
    pub fn selected_app(&self) -> Option<&AppSnapshot> {
        let row = self.rows().get(self.index).copied()?;
        self.apps.get(row.app)
    }

    /// The selected worker (none when the selected app has no worker).
    pub fn selected_worker(&self) -> Option<&WorkerSnapshot> {
        let row = self.rows().get(self.index).copied()?;
        self.apps.get(row.app)?.workers.get(row.worker?)
    }

    fn key_of(&self, row: Row) -> (String, Option<u32>) {
        let app = &self.apps[row.app];
        (app.name.clone(), row.worker.map(|w| app.workers[w].info.id))
    }

    /// Takes one frame of the subscription: new rates, histories and log lines, and the
    /// selection kept on the same worker (or moved to a neighbour when it went away).
    pub fn on_snapshot(&mut self, snapshot: Snapshot) -> Effect {
        let dt_ms = self
            .last_elapsed
            .map(|last| snapshot.elapsed_ms.saturating_sub(last))
            .filter(|&dt| dt > 0);
        self.last_elapsed = Some(snapshot.elapsed_ms);
        let mut seen = HashMap::new();
        for app in &snapshot.apps {
            let mut app_rate = 0.0;
            for w in &app.workers {
                let mut h = self.history.remove(&w.info.id).unwrap_or_default();
                // A new process starts its counters from 0.
                let (conns_before, bytes_before) = if h.pid == w.info.pid {
                    (h.connections_total, h.bytes_total)
                } else {
                    (0, 0)
                };
                if let Some(dt) = dt_ms {
                    let per_second = |now: u64, before: u64| {
                        now.saturating_sub(before) as f64 * 1000.0 / dt as f64
                    };
                    h.connections_rate = per_second(w.connections_total, conns_before);
                    h.bytes_rate = per_second(w.bytes_total, bytes_before);
                }
                h.pid = w.info.pid;
                h.connections_total = w.connections_total;
                h.bytes_total = w.bytes_total;
                push(&mut h.cpu, w.info.cpu.unwrap_or(0.0));
                app_rate += h.connections_rate;
                seen.insert(w.info.id, h);
            }
            if dt_ms.is_some() {
                let points = self.app_rate.entry(app.name.clone()).or_default();
                push(points, app_rate.round() as u64);
            }
        }
        self.history = seen;
        self.app_rate
            .retain(|name, _| snapshot.apps.iter().any(|a| &a.name == name));
        self.apps = snapshot.apps;
        self.reselect();
        if snapshot.logs_dropped > 0 {
            self.logs_dropped += snapshot.logs_dropped;
        }
        for line in snapshot.logs {
            if self.logs_app.as_deref() == Some(line.app.as_str()) {
                if self.logs.len() == MAX_LOG_LINES {
                    self.logs.pop_front();
                }
                self.logs.push_back(line);
            }
        }
        self.follow_selection()
    }

    /// Keeps the selection on the same worker; else on the same app (nearest row); else on
    /// the row at the same place.
    fn reselect(&mut self) {
        let rows = self.rows();
        if rows.is_empty() {
            self.index = 0;
            self.selected = None;
            return;
        }
        let keys: Vec<_> = rows.iter().map(|&r| self.key_of(r)).collect();
        let found = self.selected.as_ref().and_then(|(app, worker)| {
            keys.iter()
                .position(|k| &k.0 == app && k.1 == *worker)
                .or_else(|| {
                    keys.iter()
                        .enumerate()
                        .filter(|(_, k)| &k.0 == app)
                        .min_by_key(|(i, _)| i.abs_diff(self.index))
                        .map(|(i, _)| i)
                })
        });
        self.index = found.unwrap_or(self.index.min(rows.len() - 1));
        self.selected = Some(keys[self.index].clone());
    }

    /// Asks for the selected app's logs when the selection moved to another app.
    fn follow_selection(&mut self) -> Effect {
        let app = self.selected.as_ref().map(|(app, _)| app.clone());
        if app == self.logs_app {
            return Effect::None;
        }
        self.logs_app = app.clone();
        self.logs.clear();
        self.log_scroll = 0;
        self.info_scroll = 0;
        Effect::Follow(app)
    }

    fn select(&mut self, index: usize) -> Effect {
        let rows = self.rows();
        if rows.is_empty() {
            return Effect::None;
        }
        self.index = index.min(rows.len() - 1);
        self.selected = Some(self.key_of(rows[self.index]));
        self.follow_selection()
    }

    /// Takes one key press.
    pub fn on_key(&mut self, key: Key) -> Effect {
        if key == Key::Interrupt {
            return Effect::Quit;
        }
        if let Some(confirm) = self.confirm.take() {
            if key == Key::Char('y') || key == Key::Char('Y') {
                self.busy = Some(confirm.prompt.trim_end_matches('?').to_owned());
                self.status = None;
                return Effect::Send(confirm.request);
            }
            self.status = Some("cancelled".into());
            return Effect::None;
        }
        let rows = self.rows().len();
        match key {
            Key::Char('q') | Key::Esc => Effect::Quit,
            Key::Tab => {
                self.focus = self.focus.next();
                Effect::None
            }
            Key::BackTab => {
                self.focus = self.focus.previous();
                Effect::None
            }
            Key::Up | Key::Down | Key::PageUp | Key::PageDown | Key::Home | Key::End => {
                self.arrow(key, rows)
            }
            Key::Char('r') => self.ask(|app| {
                (
                    format!("reload {}?", app.name),
                    Request::Reload(crate::protocol::Reload::Target {
                        target: app.name.clone(),
                        progress: false,
                    }),
                )
            }),
            Key::Char('+') => self.ask(|app| {
                (
                    format!(
                        "scale {} from {} to {}?",
                        app.name,
                        app.instances,
                        app.instances + 1
                    ),
                    Request::Scale {
                        app: app.name.clone(),
                        to: ScaleTo::Up(1),
                    },
                )
            }),
            Key::Char('-') => {
                if self.selected_app().is_some_and(|a| a.instances == 0) {
                    self.status = Some("already at 0 workers".into());
                    return Effect::None;
                }
                self.ask(|app| {
                    (
                        format!(
                            "scale {} from {} to {}?",
                            app.name,
                            app.instances,
                            app.instances - 1
                        ),
                        Request::Scale {
                            app: app.name.clone(),
                            to: ScaleTo::Down(1),
                        },
                    )
                })
            }
            Key::Char('s') => self.ask(|app| {
                let running = app.workers.iter().any(|w| w.info.status != "stopped");
                if running && app.instances > 0 {
                    (
                        format!("stop {}?", app.name),
                        Request::Stop {
                            target: app.name.clone(),
                        },
                    )
                } else {
                    (
                        format!("start {}?", app.name),
                        Request::Start(Start::Stopped {
                            target: app.name.clone(),
                        }),
                    )
                }
            }),
            _ => Effect::None,
        }
    }

    fn arrow(&mut self, key: Key, rows: usize) -> Effect {
        let page = 5;
        match self.focus {
            Pane::List | Pane::Metrics => {
                let index = match key {
                    Key::Up => self.index.saturating_sub(1),
                    Key::Down => self.index + 1,
                    Key::PageUp => self.index.saturating_sub(page),
                    Key::PageDown => self.index + page,
                    Key::Home => 0,
                    _ => rows.saturating_sub(1),
                };
                self.select(index)
            }
            Pane::Logs => {
                let most = self.logs.len().saturating_sub(1);
                self.log_scroll = match key {
                    Key::Up => self.log_scroll + 1,
                    Key::Down => self.log_scroll.saturating_sub(1),
                    Key::PageUp => self.log_scroll + page,
                    Key::PageDown => self.log_scroll.saturating_sub(page),
                    Key::Home => most,
                    _ => 0,
                }
                .min(most);
                Effect::None
            }
            Pane::Info => {
                self.info_scroll = match key {
                    Key::Up => self.info_scroll.saturating_sub(1),
                    Key::Down => self.info_scroll + 1,
                    Key::PageUp => self.info_scroll.saturating_sub(page),
                    Key::PageDown => self.info_scroll + page,
                    Key::Home => 0,
                    _ => usize::MAX / 2,
                };
                Effect::None
            }
        }
    }

    /// Puts an action on the confirmation line (nothing is sent before `y`).
    fn ask(&mut self, action: impl FnOnce(&AppSnapshot) -> (String, Request)) -> Effect {
        if let Some(busy) = &self.busy {
            self.status = Some(format!("still waiting: {busy}"));
            return Effect::None;
        }
        let Some(app) = self.selected_app() else {
            self.status = Some("no app selected".into());
            return Effect::None;
        };
        let (prompt, request) = action(app);
        self.confirm = Some(Confirm { prompt, request });
        Effect::None
    }

    /// Takes the reply (or the failure) of a request [`Effect::Send`] asked for.
    pub fn on_reply(&mut self, reply: Result<Reply, String>) {
        self.busy = None;
        self.status = Some(match reply {
            Ok(Reply::Done { message, .. }) => message,
            Ok(Reply::Failed { error, .. }) => format!("failed: {error}"),
            Ok(_) => "done".into(),
            Err(e) => format!("failed: {e}"),
        });
    }

    /// Says the subscription broke (the master went away): shown until a frame comes again.
    pub fn on_disconnect(&mut self, error: String) {
        self.status = Some(error);
    }
}

fn push<T>(points: &mut VecDeque<T>, value: T) {
    if points.len() == MAX_HISTORY {
        points.pop_front();
    }
    points.push_back(value);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::{RestartsBy, WorkerInfo};

    /// A worker of fixture data: no clock, fixed pids.
    pub(crate) fn worker(app: &str, id: u32, instance: u32, conns: u64) -> WorkerSnapshot {
        WorkerSnapshot {
            info: WorkerInfo {
                id,
                app: app.into(),
                instance,
                pid: Some(4100 + id),
                policy: "rr".into(),
                status: "ready".into(),
                restarts: 0,
                uptime_ms: Some(95_000),
                connections: 2,
                listeners: vec![],
                private: vec![],
                last_exit: None,
                reason: None,
                cpu: Some(1.5 + f64::from(id)),
                memory: Some(40 * 1024 * 1024 + u64::from(id) * 1024 * 1024),
                cpu_seconds: Some(1.0),
                processes: Some(1),
                history: None,
                restarts_by: RestartsBy::default(),
                last_restart: None,
            },
            connections_total: conns,
            bytes_total: conns * 1000,
        }
    }

    pub(crate) fn app(name: &str, workers: Vec<WorkerSnapshot>) -> AppSnapshot {
        AppSnapshot {
            name: name.into(),
            instances: workers.len() as u32,
            policy: "rr".into(),
            balance: "round_robin".into(),
            listeners: vec!["http://127.0.0.1:8080".into()],
            config: serde_json::json!({
                "program": "node", "args": ["server.js"],
                "health": { "check": "http", "path": "/health" },
                "kill_timeout": "5s", "max_memory_restart": null,
            }),
            workers,
        }
    }

    pub(crate) fn frame(elapsed_ms: u64, apps: Vec<AppSnapshot>) -> Snapshot {
        Snapshot {
            elapsed_ms,
            apps,
            logs: vec![],
            logs_dropped: 0,
        }
    }

    fn two_apps(conns: u64) -> Vec<AppSnapshot> {
        vec![
            app(
                "web",
                vec![worker("web", 0, 0, conns), worker("web", 1, 1, conns)],
            ),
            app("api", vec![worker("api", 2, 0, 0)]),
        ]
    }

    #[test]
    fn the_first_snapshot_selects_the_first_worker_and_follows_its_app() {
        let mut m = Model::new();
        assert_eq!(
            m.on_snapshot(frame(0, two_apps(0))),
            Effect::Follow(Some("web".into()))
        );
        assert_eq!(m.selected_worker().unwrap().info.id, 0);
        assert_eq!(m.on_snapshot(frame(1000, two_apps(10))), Effect::None);
        assert_eq!(m.history[&0].connections_rate, 10.0);
        assert_eq!(m.app_rate["web"], [20]);
    }

    #[test]
    fn arrows_move_the_selection_and_another_app_is_followed() {
        let mut m = Model::new();
        m.on_snapshot(frame(0, two_apps(0)));
        assert_eq!(m.on_key(Key::Down), Effect::None, "same app");
        assert_eq!(m.on_key(Key::Down), Effect::Follow(Some("api".into())));
        assert_eq!(m.on_key(Key::Down), Effect::None, "stays on the last row");
        assert_eq!(m.selected_index(), 2);
        m.on_key(Key::Tab);
        assert_eq!(m.focus, Pane::Logs);
        m.on_key(Key::BackTab);
        assert_eq!(m.focus, Pane::List);
    }

    #[test]
    fn actions_wait_for_y_and_send_the_existing_requests() {
        let mut m = Model::new();
        m.on_snapshot(frame(0, two_apps(0)));
        assert_eq!(m.on_key(Key::Char('+')), Effect::None, "nothing sent yet");
        assert_eq!(m.confirm.as_ref().unwrap().prompt, "scale web from 2 to 3?");
        assert_eq!(
            m.on_key(Key::Char('y')),
            Effect::Send(Request::Scale {
                app: "web".into(),
                to: ScaleTo::Up(1)
            })
        );
        assert!(m.confirm.is_none());
        // While it is in flight, another action is refused.
        m.on_key(Key::Char('r'));
        assert!(m.confirm.is_none());
        assert!(m.status.as_ref().unwrap().starts_with("still waiting"));
        m.on_reply(Ok(Reply::done("scaled web from 2 to 3: all ready")));
        assert_eq!(
            m.status.as_deref(),
            Some("scaled web from 2 to 3: all ready")
        );

        m.on_key(Key::Char('r'));
        assert_eq!(m.on_key(Key::Char('n')), Effect::None);
        assert_eq!(m.status.as_deref(), Some("cancelled"));
        assert!(m.confirm.is_none());
        // Esc on a confirmation cancels; it does not quit.
        m.on_key(Key::Char('s'));
        assert_eq!(m.on_key(Key::Esc), Effect::None);
        m.on_key(Key::Char('s'));
        assert_eq!(
            m.on_key(Key::Char('y')),
            Effect::Send(Request::Stop {
                target: "web".into()
            })
        );
        m.on_reply(Err("the master closed the connection".into()));
        assert!(m.status.as_ref().unwrap().starts_with("failed"));
        m.on_key(Key::Char('r'));
        assert!(matches!(
            m.on_key(Key::Char('y')),
            Effect::Send(Request::Reload(_))
        ));
    }

    #[test]
    fn a_stopped_app_is_started_and_an_empty_one_not_scaled_below_zero() {
        let mut m = Model::new();
        let mut stopped = app("web", vec![worker("web", 0, 0, 0)]);
        stopped.workers[0].info.status = "stopped".into();
        m.on_snapshot(frame(0, vec![stopped, app("api", vec![])]));
        m.on_key(Key::Char('s'));
        assert_eq!(
            m.on_key(Key::Char('y')),
            Effect::Send(Request::Start(Start::Stopped {
                target: "web".into()
            }))
        );
        m.on_reply(Ok(Reply::done("started")));
        m.on_key(Key::Down);
        assert_eq!(m.selected_app().unwrap().name, "api");
        assert!(m.selected_worker().is_none());
        m.on_key(Key::Char('-'));
        assert!(m.confirm.is_none());
        assert_eq!(m.status.as_deref(), Some("already at 0 workers"));
    }

    #[test]
    fn quit_keys_quit() {
        let mut m = Model::new();
        assert_eq!(m.on_key(Key::Char('q')), Effect::Quit);
        assert_eq!(m.on_key(Key::Esc), Effect::Quit);
        m.on_snapshot(frame(0, two_apps(0)));
        m.on_key(Key::Char('r'));
        assert_eq!(
            m.on_key(Key::Interrupt),
            Effect::Quit,
            "even while confirming"
        );
    }

    #[test]
    fn the_selection_survives_apps_and_workers_going_away() {
        let mut m = Model::new();
        m.on_snapshot(frame(0, two_apps(0)));
        m.on_key(Key::Down);
        assert_eq!(m.selected_worker().unwrap().info.id, 1);
        // web scaled down to one worker: the selection stays in web.
        let apps = vec![
            app("web", vec![worker("web", 0, 0, 0)]),
            app("api", vec![worker("api", 2, 0, 0)]),
        ];
        assert_eq!(m.on_snapshot(frame(1000, apps)), Effect::None);
        assert_eq!(m.selected_worker().unwrap().info.id, 0);
        // web deleted: the row at its place (api) is selected and followed.
        let apps = vec![app("api", vec![worker("api", 2, 0, 0)])];
        assert_eq!(
            m.on_snapshot(frame(2000, apps)),
            Effect::Follow(Some("api".into()))
        );
        assert_eq!(m.selected_app().unwrap().name, "api");
        assert!(!m.app_rate.contains_key("web"));
        // Everything deleted: nothing selected, no logs followed.
        assert_eq!(m.on_snapshot(frame(3000, vec![])), Effect::Follow(None));
        assert!(m.selected_app().is_none());
        assert_eq!(m.on_key(Key::Down), Effect::None);
        m.on_key(Key::Char('r'));
        assert!(m.confirm.is_none());
    }

    #[test]
    fn only_the_followed_apps_lines_are_kept_and_a_new_process_restarts_its_rate() {
        let mut m = Model::new();
        m.on_snapshot(frame(0, two_apps(100)));
        let mut next = frame(500, two_apps(150));
        next.apps[0].workers[1].info.pid = Some(9999);
        next.apps[0].workers[1].connections_total = 5;
        let line = |app: &str| LogLine {
            app: app.into(),
            instance: 0,
            stream: "out".into(),
            line: "GET /".into(),
        };
        next.logs = vec![line("web"), line("api")];
        m.on_snapshot(next);
        assert_eq!(m.history[&0].connections_rate, 100.0);
        assert_eq!(m.history[&1].connections_rate, 10.0, "5 since its start");
        assert_eq!(m.logs.len(), 1);
    }
}
