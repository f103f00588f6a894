//! One shutdown signal shared by every server and worker of a process, and the one way a role bounds its
//! shutdown: [`drain`] runs the role's remaining work until a deadline after the signal.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// A cloneable handle that resolves once shutdown was requested (SIGTERM, SIGINT or programmatically).
#[derive(Clone, Debug)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// The side that triggers shutdown.
#[derive(Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (ShutdownTrigger { sender }, Shutdown { receiver })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.sender.send(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }
}

impl Shutdown {
    /// True once shutdown was requested, or once every trigger is gone (an owner that dropped its trigger,
    /// for example while unwinding, can never request shutdown any more, so waiting on would hang).
    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow() || self.receiver.has_changed().is_err()
    }

    /// Resolves when shutdown is requested (immediately if it already was), or when every trigger is dropped.
    pub async fn wait(mut self) {
        let _ = self.receiver.wait_for(|triggered| *triggered).await;
    }

    /// Resolves `grace` after shutdown was requested: a role's shutdown deadline.
    pub async fn deadline(self, grace: Duration) {
        self.wait().await;
        tokio::time::sleep(grace).await;
    }
}

/// Runs `work` (a server draining its in-flight calls, a worker committing what it holds) to completion, or
/// until `grace` after `shutdown` was requested, whichever comes first: `None` when the deadline cut it off.
/// Every role bounds its shutdown with this, so "how long may shutdown take" has one answer per role.
pub async fn drain<F: Future>(shutdown: Shutdown, grace: Duration, work: F) -> Option<F::Output> {
    tokio::select! {
        output = work => Some(output),
        () = shutdown.deadline(grace) => None,
    }
}

/// Accepts the next connection on `listener`, or `None` once `stop` resolved (the server stops accepting).
/// Accept errors (out of file descriptors, a connection reset before it was accepted) are logged with
/// `server` and retried after a short pause instead of spinning. Every hand-written accept loop uses this.
pub async fn accept_until<S: Future<Output = ()> + Unpin>(
    listener: &tokio::net::TcpListener,
    stop: &mut S,
    server: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            () = &mut *stop => return None,
            accepted = listener.accept() => match accepted {
                Ok(connection) => return Some(connection),
                Err(error) => {
                    tracing::warn!(server, %error, "accepting a connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
