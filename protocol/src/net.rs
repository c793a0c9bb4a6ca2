//! gRPC connections that open with the cluster handshake ([`crate::auth`]): the listener side
//! for a worker's tonic server, the connector for a scheduler's channels.

use crate::auth::{self, ClusterSecret, Plane};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};

/// Connections a worker's gRPC server holds open at most by default (a scheduler keeps one
/// per worker; the rest of the room is for several schedulers and reconnects).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// How long a TCP connect to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An accepted connection whose peer proved the cluster secret; holds its place under the
/// connection cap until dropped.
pub struct AuthedStream {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for AuthedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for AuthedStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections of `listener` that pass the handshake, for
/// `tonic::transport::Server::serve_with_incoming_shutdown`. Each handshake runs in its own
/// task under [`auth::HANDSHAKE_TIMEOUT`] (a slow or silent peer holds up no one); beyond
/// `max_connections` open at once, new ones are closed at accept. Stops accepting when the
/// server drops the stream.
pub fn incoming(
    listener: tokio::net::TcpListener,
    secret: Option<ClusterSecret>,
    max_connections: usize,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<AuthedStream>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accepting an internal connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max_connections, "internal connection refused: too many open");
                continue;
            };
            let (tx, secret) = (tx.clone(), secret.clone());
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                match auth::server_async(&mut s, secret.as_ref(), Plane::Grpc).await {
                    Ok(()) => {
                        let _ = tx
                            .send(Ok(AuthedStream {
                                inner: s,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "internal connection refused"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A lazy gRPC channel to a worker at `addr` (`host:port`): each connection it opens runs
/// the client handshake first, and fails (the call gets `Unavailable`) when the peer does
/// not prove the secret or speaks another version.
pub fn channel(addr: &str, secret: Option<ClusterSecret>) -> Result<Channel, String> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad worker address {addr}: {e}"))?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let connector = tower::service_fn(move |uri: Uri| {
        let secret = secret.clone();
        async move {
            let host = uri.host().unwrap_or("127.0.0.1");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(80);
            let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            s.set_nodelay(true)?;
            auth::client_async(&mut s, secret.as_ref(), Plane::Grpc).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    Ok(ep.connect_with_connector_lazy(connector))
}

/// Runs a worker's gRPC `server` beside its compute `thread` (batch loop): returns the
/// server's result once it stops and the thread has drained, or an error as soon as the
/// thread ends first — a compute loop ends only after the service is gone, so ending first it
/// failed (a panic), and the process must exit for its supervisor to restart it rather than
/// live on serving nothing.
pub async fn serve_beside(
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    thread: std::thread::JoinHandle<()>,
    what: &str,
) -> io::Result<()> {
    let mut compute = tokio::task::spawn_blocking(move || thread.join());
    tokio::select! {
        r = server => {
            let _ = compute.await;
            r.map_err(io::Error::other)
        }
        j = &mut compute => {
            let why = match j {
                Ok(Err(p)) => p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into()),
                Ok(Ok(())) => "it returned".into(),
                Err(e) => e.to_string(),
            };
            tracing::error!(loop_ = what, why = %why, "compute loop died; exiting");
            Err(io::Error::other(format!("the {what} loop died: {why}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compute loop that dies ends the serving at once, with its panic's message, while
    /// the server would have run forever; one that outlives the server is waited for.
    #[tokio::test]
    async fn a_dead_compute_loop_ends_the_worker() {
        let forever = async { std::future::pending::<Result<(), tonic::transport::Error>>().await };
        let dies = std::thread::spawn(|| panic!("kernel assertion"));
        let r = tokio::time::timeout(Duration::from_secs(10), serve_beside(forever, dies, "test"))
            .await
            .expect("serving went on after the loop died");
        let e = r.expect_err("a dead loop is an error");
        assert!(e.to_string().contains("kernel assertion"), "{e}");

        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let drains = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let server = async move {
            drop(tx);
            Ok(())
        };
        serve_beside(server, drains, "test").await.unwrap();
    }
}
