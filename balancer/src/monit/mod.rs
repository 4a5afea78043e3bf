//! `balancer monit`: the terminal dashboard. This file is the loop — the terminal, one thread
//! reading its keys, one holding the master's subscription, and one per action sent — around
//! the pure [`state::Model`] (`state.rs`), drawn by `draw.rs`, with keys from `keys.rs`.
//!
//! The master pushes a snapshot every interval on one admin connection (`subscribe`), so the
//! dashboard costs the master one frame per interval however often it is redrawn. Moving the
//! selection to another app subscribes again with that app's logs. Actions (reload, scale,
//! stop/start) are the ordinary admin requests, each on its own connection and thread, so a
//! reload that takes a minute never freezes the screen. The terminal is restored on every way
//! out: quit, error, or panic (ratatui's hook).
//!
//! The socket itself is reached through [`Admin`], which `ctl` implements: this module never
//! imports the CLI's client, and the CLI only dispatches here.

pub mod draw;
pub mod keys;
pub mod state;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ratatui::DefaultTerminal;
use ratatui::crossterm::event::{self, Event};

use crate::protocol::{Reply, Request};
use state::{Effect, Model};

/// How long after losing the master the subscription is tried again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// The screen is redrawn at least this often, even with nothing new (e.g. after a resize).
const REDRAW_EVERY: Duration = Duration::from_secs(1);

/// The master, as the dashboard reaches it.
pub trait Admin: Send + Sync + 'static {
    /// Opens a connection and sends `request` (a `subscribe`) on it.
    fn subscribe(&self, request: &Request) -> Result<Box<dyn Subscription>, String>;
    /// Sends one request on its own connection and waits for its reply.
    fn call(&self, request: &Request) -> Result<Reply, String>;
}

/// An open subscription.
pub trait Subscription: Send {
    /// The next reply; `None` once the master closed the connection.
    fn next(&mut self) -> Result<Option<Reply>, String>;
    /// Something that, called from another thread, makes a blocked [`next`](Self::next)
    /// return (it shuts the connection down).
    fn closer(&self) -> Closer;
}

/// Why the dashboard stopped other than by a quit key.
#[derive(Debug, thiserror::Error)]
pub enum MonitError {
    /// The terminal could not be set up, read or drawn on.
    #[error("terminal error")]
    Terminal(#[source] io::Error),
}

/// What the loop waits for.
enum Message {
    /// A terminal event.
    Input(Event),
    /// Reading the terminal failed.
    InputFailed(io::Error),
    /// A frame of subscription number `.0`.
    Frame(u64, Box<crate::protocol::Snapshot>),
    /// Subscription `.0` broke, and why (it is being tried again).
    Lost(u64, String),
    /// The reply to an action.
    Reply(Result<Reply, String>),
}

/// Runs the dashboard until a quit key. `first` is the subscription the caller opened (so a
/// missing master is reported before the terminal is touched), asking for no logs.
pub fn run(
    admin: Arc<dyn Admin>,
    first: Box<dyn Subscription>,
    interval_ms: u64,
) -> Result<(), MonitError> {
    let (tx, rx) = mpsc::channel();
    let mut feed = Feed::start(
        Arc::clone(&admin),
        Some(first),
        None,
        interval_ms,
        0,
        tx.clone(),
    );
    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(e) => {
            // Raw mode may be on already: undo what was done.
            ratatui::restore();
            feed.stop();
            return Err(MonitError::Terminal(e));
        }
    };
    let input = tx.clone();
    std::thread::spawn(move || {
        loop {
            let message = match event::read() {
                Ok(event) => Message::Input(event),
                Err(e) => Message::InputFailed(e),
            };
            let failed = matches!(message, Message::InputFailed(_));
            if input.send(message).is_err() || failed {
                return;
            }
        }
    });
    let result = event_loop(&mut terminal, &admin, &rx, &tx, &mut feed, interval_ms);
    feed.stop();
    ratatui::restore();
    result
}

fn event_loop(
    terminal: &mut DefaultTerminal,
    admin: &Arc<dyn Admin>,
    rx: &Receiver<Message>,
    tx: &Sender<Message>,
    feed: &mut Feed,
    interval_ms: u64,
) -> Result<(), MonitError> {
    let mut model = Model::new();
    loop {
        terminal
            .draw(|frame| draw::draw(frame, &model))
            .map_err(MonitError::Terminal)?;
        let message = match rx.recv_timeout(REDRAW_EVERY) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let effect = match message {
            Message::Input(Event::Key(key)) => match keys::from_event(&key) {
                Some(key) => model.on_key(key),
                None => Effect::None,
            },
            Message::Input(_) => Effect::None,
            Message::InputFailed(e) => return Err(MonitError::Terminal(e)),
            Message::Frame(generation, snapshot) if generation == feed.generation => {
                if model
                    .status
                    .as_deref()
                    .is_some_and(|s| s.starts_with("lost the master"))
                {
                    model.status = None;
                }
                model.on_snapshot(*snapshot)
            }
            Message::Lost(generation, error) if generation == feed.generation => {
                model.on_disconnect(format!("lost the master: {error}; retrying"));
                Effect::None
            }
            Message::Frame(..) | Message::Lost(..) => Effect::None,
            Message::Reply(reply) => {
                model.on_reply(reply);
                Effect::None
            }
        };
        match effect {
            Effect::None => {}
            Effect::Quit => return Ok(()),
            Effect::Send(request) => {
                let admin = Arc::clone(admin);
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(Message::Reply(admin.call(&request)));
                });
            }
            Effect::Follow(app) => {
                let generation = feed.generation + 1;
                feed.stop();
                *feed = Feed::start(
                    Arc::clone(admin),
                    None,
                    app,
                    interval_ms,
                    generation,
                    tx.clone(),
                );
            }
        }
    }
}

/// Ends a subscription from another thread.
type Closer = Box<dyn FnOnce() + Send>;

/// One subscription's thread: it reads frames and, when the master goes away, subscribes
/// again until stopped. Frames carry their generation, so those of a replaced feed that were
/// already queued are ignored.
struct Feed {
    generation: u64,
    stopped: Arc<AtomicBool>,
    closer: Arc<Mutex<Option<Closer>>>,
}

impl Feed {
    fn start(
        admin: Arc<dyn Admin>,
        first: Option<Box<dyn Subscription>>,
        logs: Option<String>,
        interval_ms: u64,
        generation: u64,
        tx: Sender<Message>,
    ) -> Feed {
        let stopped = Arc::new(AtomicBool::new(false));
        let closer: Arc<Mutex<Option<Closer>>> = Arc::new(Mutex::new(None));
        let feed = Feed {
            generation,
            stopped: Arc::clone(&stopped),
            closer: Arc::clone(&closer),
        };
        let mut logs = logs;
        std::thread::spawn(move || {
            let mut next = first;
            while !stopped.load(Ordering::SeqCst) {
                let opened = match next.take() {
                    Some(subscription) => Ok(subscription),
                    None => admin.subscribe(&Request::Subscribe {
                        interval_ms,
                        logs: logs.clone(),
                    }),
                };
                let error = match opened {
                    Ok(mut subscription) => {
                        if let Ok(mut slot) = closer.lock() {
                            *slot = Some(subscription.closer());
                        }
                        // Stopped while connecting: the closer above came too late to be
                        // called, so this thread ends the subscription itself.
                        if stopped.load(Ordering::SeqCst) {
                            return;
                        }
                        let (error, refused) = read_frames(subscription.as_mut(), generation, &tx);
                        // Refused: its logs app is gone. Frames without logs let the model
                        // move the selection, which subscribes again with the new app's.
                        if refused {
                            logs = None;
                        }
                        error
                    }
                    Err(e) => e,
                };
                if stopped.load(Ordering::SeqCst)
                    || tx.send(Message::Lost(generation, error)).is_err()
                {
                    return;
                }
                std::thread::sleep(RECONNECT_AFTER);
            }
        });
        feed
    }

    /// Ends the subscription (its thread exits on its own).
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(close) = self.closer.lock().ok().and_then(|mut slot| slot.take()) {
            close();
        }
    }
}

/// Forwards frames until the subscription ends; returns why it ended, and whether the master
/// refused it.
fn read_frames(
    subscription: &mut dyn Subscription,
    generation: u64,
    tx: &Sender<Message>,
) -> (String, bool) {
    loop {
        match subscription.next() {
            Ok(Some(Reply::Snapshot(snapshot))) => {
                if tx.send(Message::Frame(generation, snapshot)).is_err() {
                    return ("stopped".into(), false);
                }
            }
            Ok(Some(Reply::Failed { error, .. })) => return (error, true),
            Ok(Some(_)) => {}
            Ok(None) => return ("the master closed the connection".into(), false),
            Err(e) => return (e, false),
        }
    }
}
