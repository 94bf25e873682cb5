//! The one HTTP/1.1 listener under every front (KMS JSON with or without TLS, TDE): what an
//! unauthenticated client can make the service hold, and for how long.
//!
//! - a cap on open connections, shared by the fronts (file descriptors are per process), sized
//!   so that token workers, pipes and SQLite always find descriptors left;
//! - per connection: a TLS handshake timeout, hyper's header read timeout, a deadline for the
//!   whole request body, and an idle timeout (no byte moving either way);
//! - a request whose body was not read to its end closes its connection after the answer, so
//!   that nobody's unread (unauthenticated) body is drained;
//! - graceful shutdown: no new connections, requests in flight finish within a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The listeners' timeouts (all configurable, `[listener]` in docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// What a front does with a connection beyond the cap.
#[derive(Debug, Clone, Copy)]
pub enum WhenFull {
    /// Writes a minimal `503` with a KMS `ThrottlingException` body and `Connection: close`,
    /// without waiting (one non-blocking write into the new socket's empty send buffer).
    Throttle,
    /// Closes at once: MariaDB treats any 5xx from its key server as final, while a dropped
    /// connection makes it use the key it has cached (see `tde::front`).
    Close,
}

/// The connection cap and limits shared by every front, and the shutdown signal they obey.
pub struct Door {
    connections: Arc<Semaphore>,
    capacity: usize,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
}

impl Door {
    pub fn new(capacity: usize, limits: Limits, shutdown: watch::Receiver<bool>) -> Arc<Door> {
        let capacity = capacity.max(1);
        Arc::new(Door {
            connections: Arc::new(Semaphore::new(capacity)),
            capacity,
            limits,
            shutdown,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Waits until every connection of every front has ended, or the grace period is over.
    async fn drained(&self) {
        let all = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(
            self.limits.shutdown_grace,
            self.connections.acquire_many(all),
        )
        .await;
    }
}

/// Serves an axum router (the KMS front), over TLS when `tls` is given, until shutdown.
pub async fn serve_router(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    door: Arc<Door>,
    router: axum::Router,
) {
    serve_http1(
        listener,
        tls,
        "KMS front",
        door,
        WhenFull::Throttle,
        move |_peer| {
            let router = router.clone();
            hyper::service::service_fn(move |req: hyper::Request<RequestBody>| {
                let router = router.clone();
                async move {
                    use tower::ServiceExt;
                    Ok::<_, std::convert::Infallible>(
                        router
                            .oneshot(req.map(axum::body::Body::new))
                            .await
                            .unwrap_or_else(|e| match e {}),
                    )
                }
            })
        },
    )
    .await
}

/// Resolves once shutdown is asked for (or the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

const THROTTLED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/x-amz-json-1.1\r\nConnection: close\r\nContent-Length: 88\r\n\r\n\
{\"__type\":\"ThrottlingException\",\"message\":\"Too many open connections; try again later.\"}";

/// Accepts connections until shutdown, serving each with HTTP/1.1 (over TLS when `tls` is
/// given) with the service `make_service` builds for the peer; then lets the connections in
/// flight finish (within the grace period). `front` names the listener in log lines.
pub async fn serve_http1<M, S, B, E>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    front: &'static str,
    door: Arc<Door>,
    when_full: WhenFull,
    make_service: M,
) where
    M: Fn(SocketAddr) -> S,
    S: hyper::service::Service<
            hyper::Request<RequestBody>,
            Response = hyper::Response<B>,
            Error = E,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    E: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut shutdown = door.shutdown.clone();
    let mut refused: u64 = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(front, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let Ok(permit) = door.connections.clone().try_acquire_owned() else {
            if let WhenFull::Throttle = when_full {
                let _ = tcp.try_write(THROTTLED);
            }
            refused += 1;
            // One line per 1,000 refusals: a flood must not flood the log too.
            if refused % 1000 == 1 {
                tracing::warn!(front, %peer, refused, capacity = door.capacity, "connection cap reached; refusing connections");
            }
            continue;
        };
        // Small request/response pairs on kept-alive connections: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let service = make_service(peer);
        let (tls, door) = (tls.clone(), door.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Activity::new();
            let io = Watched {
                inner: tcp,
                activity: activity.clone(),
            };
            match tls {
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(door.limits.tls_handshake_timeout, tls.accept(io));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            drive(stream, service, &door, &activity, front, peer).await
                        }
                        Ok(Err(e)) => {
                            tracing::info!(front, %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::info!(front, %peer, "TLS handshake timed out"),
                    }
                }
                None => drive(io, service, &door, &activity, front, peer).await,
            }
        });
    }
    drop(listener);
    door.drained().await;
}

/// Serves one connection until it ends, goes idle too long, or shutdown (then the request in
/// flight finishes first, within the grace period).
async fn drive<I, S, B, E>(
    io: I,
    service: S,
    door: &Door,
    activity: &Activity,
    front: &'static str,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<RequestBody>,
            Response = hyper::Response<B>,
            Error = E,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    E: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let body_timeout = door.limits.body_timeout;
    let busy = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (parts, body) = req.into_parts();
        let (body, read_to_end) = RequestBody::new(body, body_timeout);
        let answer = service.call(hyper::Request::from_parts(parts, body));
        // While the service works on a request no byte may move for a while (a slow token):
        // that is not idleness. The body deadline covers a stalled body meanwhile.
        let working = busy.working();
        async move {
            let answer = answer.await;
            drop(working);
            let mut response = answer?;
            if !read_to_end.load(Ordering::Acquire) {
                // hyper closes a connection whose request body was left unread; say so.
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, E>(response)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(door.limits.header_read_timeout);
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut shutdown = door.shutdown.clone();
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = activity.idle_for(door.limits.idle_timeout) => {
                tracing::debug!(front, %peer, "idle connection closed");
                return;
            }
            _ = stopped(&mut shutdown), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(front, %peer, error = %e, "connection ended");
    }
}

/// The request body as the fronts see it: hyper's, with a deadline for the whole of it, and a
/// flag that says whether it was read to its end.
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    started: Instant,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read_to_end: Arc<AtomicBool>,
}

impl RequestBody {
    fn new(inner: Incoming, timeout: Duration) -> (RequestBody, Arc<AtomicBool>) {
        let read_to_end = Arc::new(AtomicBool::new(inner.is_end_stream()));
        let body = RequestBody {
            inner,
            timeout,
            started: Instant::now(),
            deadline: None,
            read_to_end: read_to_end.clone(),
        };
        (body, read_to_end)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || this.inner.is_end_stream() {
                this.read_to_end.store(true, Ordering::Release);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        // The timer is made only for bodies that keep the handler waiting.
        let (started, timeout) = (this.started, this.timeout);
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until((started + timeout).into())));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// When a byte last moved on a connection, in milliseconds since the process's first use of it,
/// and how many of its requests the service is working on.
#[derive(Clone)]
struct Activity(Arc<(AtomicU64, AtomicU64)>);

/// Marks a request as being worked on until dropped (also when its future is cancelled).
struct Working(Activity);

impl Drop for Working {
    fn drop(&mut self) {
        self.0 .0 .1.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Activity {
    fn new() -> Activity {
        let a = Activity(Arc::new((AtomicU64::new(0), AtomicU64::new(0))));
        a.touch();
        a
    }

    fn touch(&self) {
        let ms = epoch().elapsed().as_millis() as u64;
        self.0 .0.store(ms, Ordering::Relaxed);
    }

    fn working(&self) -> Working {
        self.0 .1.fetch_add(1, Ordering::AcqRel);
        Working(self.clone())
    }

    /// Resolves once nothing has moved for `limit` while no request was being worked on.
    async fn idle_for(&self, limit: Duration) {
        loop {
            if self.0 .1.load(Ordering::Acquire) > 0 {
                self.touch();
            }
            let last = epoch() + Duration::from_millis(self.0 .0.load(Ordering::Relaxed));
            let due = last + limit;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// A stream that records its activity.
struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    // Vectored writes let hyper send an answer's body straight from its (zeroizing) buffer;
    // without them it copies the body into its own write buffer, which is never zeroed.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises this process's soft limit of open files to its hard limit (connections and token
/// workers draw on the same table) and returns the soft limit now in force.
///
/// `libc` rather than `rustix`: it is already built for tokio, while rustix's `process` feature
/// is not enabled in our tree; the unsafe part is two calls on a stack value.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit; it changes only this process's limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, not on every target
    let soft = limit.rlim_cur as u64;
    soft
}

/// File descriptors this process has open now (Linux: /proc/self/fd); None elsewhere.
pub fn open_files() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64)
}

/// Descriptors kept free of connections beyond those open at start: token workers restarted
/// (each takes its pipes), SQLite reader connections and journal files, TLS and PIN files,
/// backups, log files.
pub const RESERVED_FILES: u64 = 128;

/// The default connection cap: at most 4,096 (a memory bound: each open connection holds
/// buffers and a task) and never more than the file limit leaves after the descriptors open
/// now and [`RESERVED_FILES`].
pub fn default_max_connections(file_limit: u64, open_now: u64) -> usize {
    let left = file_limit.saturating_sub(open_now + RESERVED_FILES);
    left.clamp(16, 4096) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_idle_only_while_no_request_is_worked_on() {
        let activity = Activity::new();
        let working = activity.working();
        let limit = Duration::from_millis(50);
        let waited = tokio::time::timeout(Duration::from_millis(300), activity.idle_for(limit));
        assert!(waited.await.is_err(), "idle while a request was worked on");
        drop(working);
        let waited = tokio::time::timeout(Duration::from_millis(300), activity.idle_for(limit));
        assert!(waited.await.is_ok(), "not idle after the answer");
    }

    #[test]
    fn the_throttling_answer_is_well_formed() {
        let text = std::str::from_utf8(THROTTLED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["__type"], "ThrottlingException");
    }

    #[test]
    fn the_connection_cap_leaves_room_for_workers() {
        assert_eq!(default_max_connections(1024, 40), 1024 - 40 - 128);
        assert_eq!(default_max_connections(1 << 20, 40), 4096);
        // A limit too small to serve at all still takes a few connections.
        assert_eq!(default_max_connections(100, 90), 16);
    }

    #[test]
    fn raising_the_file_limit_reaches_the_hard_limit() {
        let soft = raise_open_file_limit();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_open_file_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        #[allow(clippy::unnecessary_cast)] // as in raise_open_file_limit
        let now = limit.rlim_cur as u64;
        assert_eq!(soft, now);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
