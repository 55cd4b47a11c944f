//! `--metrics-listen`: a minimal HTTP/1.1 server for `GET /metrics`, as one task on the
//! runtime's thread beside the signal task and the sync, which it must never hold up.
//!
//! Nothing a client does can make it wait: at most `MAX_CONNECTIONS` connections are
//! served at once and any beyond them are closed at once (so many idle connections cost a
//! scrape or two, never memory or a thread); a request must arrive whole, at most
//! `REQUEST_LIMIT` bytes, within `READ_LIMIT` from the connection's start (a client sending
//! byte by byte is cut off then, however steadily it sends); the answer must be taken
//! within `WRITE_LIMIT`; one request per connection. Each step is a non-blocking socket
//! operation or the rendering of the text (microseconds), so the signal task and the
//! sync's work, scheduled on the same thread, never wait for more than that. The request
//! is parsed by `httparse`; a whole HTTP stack would cost PID 1 more code than everything
//! this needs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Exposition;

/// Connections served at once; a scraper needs one.
const MAX_CONNECTIONS: usize = 4;
/// The largest request head read (a scraper's is a few hundred bytes).
const REQUEST_LIMIT: usize = 8 * 1024;
/// The time a client has to send its whole request.
const READ_LIMIT: Duration = Duration::from_secs(5);
/// The time a client has to take the whole answer.
const WRITE_LIMIT: Duration = Duration::from_secs(5);
/// The pause after a failed accept (no descriptor left): the loop must not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Binds `addr` (non-blocking, for the runtime to take over).
pub(super) fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening on {addr} (--metrics-listen)"))?;
    listener
        .set_nonblocking(true)
        .context("making the metrics listener non-blocking")?;
    Ok(listener)
}

/// Starts serving on the runtime; returns the address it listens on.
pub(super) fn serve(
    listener: std::net::TcpListener,
    exposition: Arc<Exposition>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::from_std(listener).context("serving the metrics")?;
    let addr = listener.local_addr().context("serving the metrics")?;
    tokio::spawn(accept_loop(listener, exposition));
    Ok(addr)
}

async fn accept_loop(listener: TcpListener, exposition: Arc<Exposition>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::debug!("metrics listener: accepting a connection: {err}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        // Busy: closed at once (dropped), rather than queued behind the others.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            answer(stream, &exposition).await;
            drop(slot);
        });
    }
}

/// What a request asked for, or what was wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    Malformed,
    TooLarge,
    Late,
}

/// Reads one request and answers it; every wait bounded.
async fn answer(mut stream: TcpStream, exposition: &Exposition) {
    let request = match tokio::time::timeout(READ_LIMIT, read_request(&mut stream)).await {
        Ok(request) => request,
        Err(_) => Request::Late,
    };
    let response = respond(request, exposition);
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_LIMIT, write).await;
}

/// Reads until the request head is complete, too large, malformed or the client is gone.
async fn read_request(stream: &mut TcpStream) -> Request {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Request::Malformed,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = parse(&buf) {
            return request;
        }
        if buf.len() >= REQUEST_LIMIT {
            return Request::TooLarge;
        }
    }
}

/// The request in `buf`, once its head is complete (`None`: not yet).
fn parse(buf: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Request::TooLarge),
        Err(_) => Some(Request::Malformed),
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            Some(match (request.method, path) {
                (Some("GET"), "/metrics") => Request::Metrics { head_only: false },
                (Some("HEAD"), "/metrics") => Request::Metrics { head_only: true },
                (Some("GET" | "HEAD"), _) => Request::NotFound,
                _ => Request::BadMethod,
            })
        }
    }
}

/// The whole response to `request`.
fn respond(request: Request, exposition: &Exposition) -> Vec<u8> {
    let (status, body) = match request {
        Request::Metrics { head_only } => {
            let body = exposition.render();
            let mut response = head(
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body.len(),
            );
            if !head_only {
                response.extend_from_slice(&body);
            }
            return response;
        }
        Request::NotFound => ("404 Not Found", "only /metrics is served\n"),
        Request::BadMethod => ("405 Method Not Allowed", "GET /metrics\n"),
        Request::Malformed => ("400 Bad Request", "malformed request\n"),
        Request::TooLarge => ("431 Request Header Fields Too Large", "request too large\n"),
        Request::Late => ("408 Request Timeout", "request not complete in time\n"),
    };
    let mut response = head(status, "text/plain; charset=utf-8", body.len());
    response.extend_from_slice(body.as_bytes());
    response
}

fn head(status: &str, content_type: &str, length: usize) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart() {
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n";
        assert_eq!(parse(get), Some(Request::Metrics { head_only: false }));
        assert_eq!(parse(&get[..20]), None, "incomplete: read on");
        assert_eq!(
            parse(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Request::Metrics { head_only: true })
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Some(Request::NotFound));
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Request::BadMethod)
        );
        assert_eq!(
            parse(b"\x16\x03\x01 hello\r\n\r\n"),
            Some(Request::Malformed)
        );
        let many = format!("GET /metrics HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(40));
        assert_eq!(parse(many.as_bytes()), Some(Request::TooLarge));
    }
}
