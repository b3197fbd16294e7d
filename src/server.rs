//! The accept loop: connection cap, TLS handshake under a timeout, HTTP/1.1 and HTTP/2 serving
//! with header timeouts, an idle timeout per connection, and graceful drain at shutdown.
//!
//! Each connection task drives its hyper connection itself and asks it to shut down gracefully
//! (HTTP/1.1: after the response in flight; HTTP/2: `GOAWAY`, open streams finish) when the
//! service stops or when no request has been in flight for `idle_timeout`. The drain at
//! shutdown waits until every connection permit is back, that is until every connection task
//! has ended.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::conn_guard::FirstBytes;
use crate::routes;
use crate::state::AppState;

/// Accepts connections on `listener` until `shutdown` completes, then stops accepting and gives
/// in-flight requests up to the grace period to finish.
pub async fn run(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = state.limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);

    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(10);
    loop {
        // Take a permit before accepting: beyond the cap, connections wait in the kernel queue.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(10);
                    conn
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(tcp, peer, acceptor, state, builder).await;
        });
    }
    drop(listener);
    let grace = state.limits.shutdown_grace;
    tracing::info!("stopped accepting; draining connections for up to {grace:?}");
    // Every connection task holds a permit until it ends: all of them back means all closed.
    state.begin_shutdown();
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// The requests in flight on one connection, and since when it has had none.
///
/// Beginning and ending a request only touches these fields: the connection task does not wake
/// for it. It looks at them when its idle timer fires, and sets the timer again from there.
#[derive(Debug)]
struct Activity {
    /// Requests whose handler has not returned yet.
    in_flight: AtomicUsize,
    /// When the last request in flight ended (or the connection began).
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// Counts a request as in flight until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection will have been idle for `timeout`, or `None` while a request is in
    /// flight.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(since + timeout)
    }
}

/// A request in flight on its connection's [`Activity`].
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // The time is written before the count drops to 0, so that a timer that sees no
        // request in flight also sees when the last one ended.
        let mut since = activity
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    let _ = tcp.set_nodelay(true);
    let handshake_timeout = state.limits.handshake_timeout;
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake timed out");
            return;
        }
    };
    // The first bytes (HTTP/2 preface or HTTP/1.1 request line) must come within the header
    // timeout: nothing else bounds the protocol detection and the HTTP/2 preface.
    let tls = FirstBytes::new(tls, state.limits.header_timeout);
    let idle_timeout = state.limits.idle_timeout;
    let activity = Activity::new();
    let service = {
        let state = state.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let in_flight = activity.begin();
            // Boxed: the handler's state is several kilobytes, which hyper would otherwise
            // copy each time it moves the future.
            let handled = Box::pin(routes::handle(state.clone(), peer, req));
            async move {
                let response = handled.await;
                drop(in_flight);
                response
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let stopping = state.stopping();
    tokio::pin!(stopping);
    // Fires at the earliest moment the connection can have been idle for `idle_timeout`; what
    // happened since is looked at then.
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut stopping, if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                let now = Instant::now();
                match activity.idle_deadline(idle_timeout) {
                    Some(deadline) if deadline <= now => {
                        tracing::debug!(%peer, "closing a connection idle for {idle_timeout:?}");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    Some(deadline) => idle.as_mut().reset(deadline),
                    // A request is in flight: it cannot be idle before `idle_timeout` from now.
                    None => idle.as_mut().reset(now + idle_timeout),
                }
            }
        }
    }
}
