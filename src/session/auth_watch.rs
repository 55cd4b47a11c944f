//! The one guard on every password we send: a server connection read through `AuthWatch`
//! fails before anything is answered when the other end asks for the password in clear
//! text or as an MD5 hash. Whoever listens where the server should be (another local user
//! on a port or socket the server left, a name that resolves elsewhere) could ask for
//! either and keep what it gets; through SCRAM, the only way a password leaves, it gets
//! nothing to replay, and tokio-postgres checks the server's final signature, which only
//! a holder of the verifier can make. Used by `verify` (every login it checks) and by the
//! superuser sessions (`connect`, so the sync, its watchdog and `rotate`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads the server's messages as they pass until authentication is over (only message
/// heads are kept, at most 9 bytes) and refuses the two requests that would send the
/// password itself: `AuthenticationCleartextPassword` (3) and `AuthenticationMD5Password`
/// (5: a hash under a salt the listener picks, open to offline guessing and to relaying
/// to the real server). SASL (10–12) and anything else pass; `AuthenticationOk` (0) ends
/// the watch, and `scram_done` tells whether a SCRAM exchange reached its final message
/// (12) before it. The sync stores SCRAM verifiers, for which the server asks for SCRAM under
/// both `scram-sha-256` and `md5` lines; only a `password` line asks for clear text.
#[derive(Debug, Default)]
struct AuthWatch {
    head: Vec<u8>,
    /// Bytes of the current message still to pass unread.
    skip: usize,
    done: bool,
    scram_done: Arc<AtomicBool>,
}

impl AuthWatch {
    /// Takes the next bytes from the server.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), &'static str> {
        loop {
            if self.done {
                return Ok(());
            }
            if self.skip > 0 {
                if bytes.is_empty() {
                    return Ok(());
                }
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            // Tag and length (5 bytes); an authentication request's code too (9).
            let need = if self.head.len() >= 5 && self.head[0] == b'R' {
                9
            } else {
                5
            };
            if self.head.len() < need {
                if bytes.is_empty() {
                    return Ok(());
                }
                let n = (need - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                continue;
            }
            let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if self.head[0] == b'R' {
                match u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) {
                    0 => self.done = true,
                    12 => self.scram_done.store(true, Ordering::Relaxed),
                    3 => {
                        return Err("the server asked for the password in clear text \
                                    (pg_hba.conf `password`, or not the server at all); \
                                    passwords are sent only through SCRAM");
                    }
                    5 => {
                        return Err("the server asked for an MD5 password hash (pg_hba.conf \
                                    `md5` with an MD5 verifier, or not the server at all); \
                                    passwords are sent only through SCRAM");
                    }
                    _ => {}
                }
                self.skip = len.saturating_sub(8);
            } else {
                self.skip = len.saturating_sub(4);
            }
            self.head.clear();
        }
    }
}

/// A server connection read through an `AuthWatch`.
pub struct Watched<S> {
    inner: S,
    watch: AuthWatch,
}

impl<S> Watched<S> {
    /// `inner`, watched (whether SCRAM ran is not looked at).
    pub fn new(inner: S) -> Watched<S> {
        Watched::reporting(inner, Arc::default())
    }

    /// `inner`, watched; `scram_done` is set when a SCRAM exchange reaches its final
    /// message (`verify`: only such a login proves the password).
    pub fn reporting(inner: S, scram_done: Arc<AtomicBool>) -> Watched<S> {
        Watched {
            inner,
            watch: AuthWatch {
                scram_done,
                ..AuthWatch::default()
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        // The bytes are checked before tokio-postgres sees them, so it never answers a
        // refused request.
        let this = &mut *self;
        this.watch
            .feed(&buf.filled()[before..])
            .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server message: tag, length, body.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(u32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(rest);
        message(b'R', &body)
    }

    /// Feeds `stream` in pieces of `chunk` bytes; whether a SCRAM exchange was completed.
    fn watch(stream: &[u8], chunk: usize) -> Result<bool, &'static str> {
        let mut watch = AuthWatch::default();
        stream
            .chunks(chunk)
            .try_for_each(|piece| watch.feed(piece))?;
        Ok(watch.scram_done.load(Ordering::Relaxed))
    }

    #[test]
    fn the_watch_refuses_clear_text_and_md5_requests_in_any_split() {
        let scram = [
            auth(10, b"SCRAM-SHA-256\0\0"),
            auth(11, b"r=abc,s=c2FsdA==,i=4096"),
            auth(12, b"v=sig"),
            auth(0, b""),
            // After AuthenticationOk nothing is looked at, a clear-text request included.
            message(b'S', b"server_version\x0015\0"),
            auth(3, b""),
        ]
        .concat();
        let clear = [message(b'N', b"SNOTICE\0\0"), auth(3, b"")].concat();
        let md5 = auth(5, b"salt");
        for chunk in [1, 2, 3, 5, 8, 9, 1000] {
            assert_eq!(watch(&scram, chunk), Ok(true), "chunk {chunk}");
            // Let in at once (trust, or a stand-in): no SCRAM exchange.
            assert_eq!(watch(&auth(0, b""), chunk), Ok(false));
            assert!(watch(&clear, chunk).unwrap_err().contains("clear text"));
            assert!(watch(&md5, chunk).unwrap_err().contains("MD5"));
        }
        let refused = message(b'E', b"SFATAL\0C28P01\0\0");
        assert_eq!(watch(&refused, 3), Ok(false));
    }
}
