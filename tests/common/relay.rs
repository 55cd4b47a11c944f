//! A TCP relay on the loopback that holds every connection it accepts until the test
//! releases it, then forwards both ways to the server: a way to stop a client of the
//! binary at a chosen point (its connect, after it read its files) and let it go on once
//! the test has done what it wants to happen meanwhile. Every wait is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a held connection waits for the release before it is dropped (a liveness
/// bound: a test that never releases fails on its own bound first).
const HOLD_LIMIT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct State {
    released: Mutex<bool>,
    release: Condvar,
    accepted: AtomicUsize,
    stop: AtomicBool,
}

/// A relay from `127.0.0.1:port` to `127.0.0.1:upstream`.
pub struct Relay {
    pub port: u16,
    state: Arc<State>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts holding every connection to the returned relay's port.
    pub fn hold(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                std::thread::spawn(move || forward_when_released(&shared, client, upstream));
            }
        });
        Relay {
            port,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// How many connections the relay has accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Lets every held connection (and every later one) through.
    pub fn release(&self) {
        *self
            .state
            .released
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.state.release.notify_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.release();
        // Wakes the acceptor, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Waits (bounded) for the release, then connects upstream and copies both ways until
/// either side closes.
fn forward_when_released(state: &State, client: TcpStream, upstream: u16) {
    let released = state
        .released
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (released, _) = state
        .release
        .wait_timeout_while(released, HOLD_LIMIT, |released| !*released)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !*released || state.stop.load(Ordering::SeqCst) {
        return;
    }
    drop(released);
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (Ok(client_read), Ok(server_read)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pump(client_read, server));
    pump(server_read, client);
    let _ = up.join();
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s sending side.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
