//! Learning an app's public address from its workers (capture with no `listen`): the hook the
//! workers crate calls when a worker binds a fixed port, and the change it sets off.
//!
//! As Node's cluster primary does, the first bind wins: the master binds that address itself
//! (under rr; under reuseport it only checks it can be shared), and reloads the app with it as
//! its one listener, so every new worker's bind of it is redirected like a configured one. The
//! first workers, whose bind was answered with a private port nobody connects to, are replaced
//! by that reload (drained first, as always). `ls` and `show` mark the listener "captured".

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use balancer_config::{Listener, Proto};
use balancer_workers::Target;
use balancer_workers::capture::Learn;

use super::Master;
use super::apply::{bind_for, same_socket};

/// What the hook has learned, per app: the address, and whether the master is still setting
/// it up.
#[derive(Default)]
pub(super) struct Learned(Mutex<Vec<(String, Listener, bool)>>);

/// The hook given to the workers crate: answers at once, sets the change off in the background.
pub(super) fn hook(master: Weak<Master>) -> Learn {
    Arc::new(move |app: &str, proto: Proto, addr: SocketAddr| {
        let Some(m) = master.upgrade() else {
            return false;
        };
        let mut listener = Listener::new(proto, addr, "PORT");
        listener.captured = true;
        // The app's own view decides what is stale: an app that has no listener now (it was
        // deleted and started again, or its file re-applied) learns afresh.
        let has_none = m.supervisor(app).is_some_and(|s| s.app().listen.is_empty());
        let mut learned = m.learned.0.lock().unwrap_or_else(|e| e.into_inner());
        match learned.iter_mut().find(|(name, _, _)| name == app) {
            Some((_, known, pending)) if same_socket(known, &listener) => {
                if *pending || !has_none {
                    return true;
                }
                *pending = true;
            }
            Some((_, known, pending)) => {
                if *pending || !has_none {
                    return false;
                }
                *known = listener.clone();
                *pending = true;
            }
            None => learned.push((app.to_owned(), listener.clone(), true)),
        }
        drop(learned);
        let app = app.to_owned();
        tokio::spawn(async move { m.learn_listener(&app, listener).await });
        true
    })
}

impl Master {
    /// Makes `listener` the public listener of app `name` (which has none): bound, the app
    /// reloaded onto it, served.
    async fn learn_listener(&self, name: &str, listener: Listener) {
        let _change = self.changes.lock().await;
        let result = self.learn_locked(name, &listener).await;
        if let Err(e) = &result {
            tracing::error!(
                app = %name, listener = %listener,
                "cannot listen on the address the app's worker bound: {e}"
            );
        }
        let mut learned = self.learned.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = learned.iter_mut().find(|(app, _, _)| app == name) {
            entry.2 = false;
        }
    }

    async fn learn_locked(&self, name: &str, listener: &Listener) -> Result<(), String> {
        let Some(sup) = self.supervisor(name) else {
            return Ok(());
        };
        let mut app = (*sup.app()).clone();
        if !app.listen.is_empty() {
            return Ok(());
        }
        app.listen = vec![listener.clone()];
        let socket = bind_for(&app, listener).map_err(|e| e.to_string())?;
        tracing::info!(app = %name, listener = %listener, "learned the app's public address from its worker's bind");
        let message = sup
            .reload(Some(app.clone()), Target::All)
            .await
            .map_err(|e| e.to_string())?;
        let fresh = socket.map(|s| (listener.clone(), s)).into_iter().collect();
        self.rewire_listeners(&sup, &app, fresh);
        tracing::info!(app = %name, "{message}");
        Ok(())
    }
}
