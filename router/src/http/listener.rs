//! Accepting connections: each one served by hyper (HTTP/1.1 or HTTP/2) under limits
//! that keep misbehaving clients from taking the router down: at most
//! `max_connections` at once (more get a 503 and are closed), and a client that does
//! not send a whole request head within `header_timeout` is dropped.
//!
//! Every connection gets TCP_NODELAY: a streamed response is written as small
//! pieces (the headers, then one event per token), and with Nagle's algorithm
//! the kernel holds each piece until the client acknowledges the previous one.
//! Clients that keep their connection alive delay that acknowledgement (up to
//! 40 ms on Linux), which would hold back the first token by as much.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// File descriptors kept for everything but client connections (shard sockets, model
/// files, tokenizer threads, logs).
const OTHER_DESCRIPTORS: u64 = 256;

impl ConnectionLimits {
    /// Raises the open-file limit to its hard maximum (the default soft limit, often
    /// 1,024, would make `accept` fail long before `max_connections`), and lowers
    /// `max_connections` to what the limit then allows.
    pub fn fit_open_file_limit(mut self) -> Self {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return self;
        };
        let limit = match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        };
        let allowed = limit.saturating_sub(OTHER_DESCRIPTORS).max(1) as usize;
        if self.max_connections > allowed {
            tracing::warn!(
                "--max-connections {} lowered to {allowed}: the open-file limit is {limit}",
                self.max_connections
            );
            self.max_connections = allowed;
        }
        self
    }
}

/// Answered, without reading the request, to a connection beyond the limit.
const TOO_MANY_CONNECTIONS: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: application/json\r\n\
content-length: 63\r\n\r\n{\"error\":\"Too many open connections\",\"error_type\":\"overloaded\"}";

/// Serves `app` on `listener` until `shutdown` completes, then waits for the
/// connections in flight to finish their requests (new ones are no longer accepted).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: keep serving the others.
                Err(err) => {
                    tracing::warn!("accepting a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = shutdown.as_mut() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("tgi_connection_refused_total").increment(1);
            tokio::spawn(refuse(stream));
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY on a connection: {err}");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (a reset, a header timeout): nothing to report.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn refuse(mut stream: TcpStream) {
    let _ = stream.write_all(TOO_MANY_CONNECTIONS).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::AsyncReadExt;

    async fn start(limits: ConnectionLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        addr
    }

    /// What the server sends on `stream` until it closes the connection.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_get_a_503_and_the_others_are_served() {
        let addr = start(ConnectionLimits {
            max_connections: 2,
            header_timeout: Duration::from_secs(10),
        })
        .await;
        let mut idle = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        // The server takes both before the third arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let refused = read_to_close(&mut extra).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        let body = refused.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error_type"], "overloaded");

        // A slot freed by a closed connection serves the next one.
        drop(idle.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let served = read_to_close(&mut next).await;
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_head_is_dropped() {
        let addr = start(ConnectionLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
        })
        .await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_to_close(&mut slow).await;
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
        assert!(!answer.contains("200 OK"), "{answer}");
    }
}
