//! I/O wrappers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::EdgeStats;

/// WAN bytes of one tunnel connection.
#[derive(Debug)]
pub struct ConnWan {
    /// Bytes read from the tunnel socket.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Bytes written to the tunnel socket.
    pub bytes_out: std::sync::atomic::AtomicU64,
    /// The tunnel socket's descriptor (-1: none recorded), for reading its kernel
    /// state (`tcp_info`) while the connection that owns the socket runs.
    fd: std::sync::atomic::AtomicI32,
}

impl ConnWan {
    /// A counter for a tunnel connection over `tcp`.
    pub fn for_socket(tcp: &impl std::os::fd::AsRawFd) -> Self {
        let wan = ConnWan::default();
        wan.fd.store(tcp.as_raw_fd(), Relaxed);
        wan
    }

    /// Records the tunnel socket's descriptor.
    pub fn set_socket(&self, tcp: &impl std::os::fd::AsRawFd) {
        self.fd.store(tcp.as_raw_fd(), Relaxed);
    }

    /// Counts from zero again: a tunnel connection that carried one proxied
    /// connection and now carries the next.
    pub fn reset(&self) {
        self.bytes_in.store(0, Relaxed);
        self.bytes_out.store(0, Relaxed);
    }

    /// The tunnel socket's descriptor, if recorded. Valid only while the tunnel
    /// stream that owns the socket is alive (the connection's own tasks).
    pub fn socket_fd(&self) -> Option<std::os::fd::RawFd> {
        let fd = self.fd.load(Relaxed);
        (fd >= 0).then_some(fd)
    }
}

impl Default for ConnWan {
    fn default() -> Self {
        ConnWan {
            bytes_in: Default::default(),
            bytes_out: Default::default(),
            fd: std::sync::atomic::AtomicI32::new(-1),
        }
    }
}

/// Counts the bytes that really cross the WAN (the tunnel's TCP payload, TLS included)
/// at the socket, so no counter has to be sprinkled through the logic.
#[derive(Debug)]
pub struct WanCountingIo<T> {
    inner: T,
    stats: Arc<EdgeStats>,
    conn: Arc<ConnWan>,
}

impl<T> WanCountingIo<T> {
    /// Wraps a tunnel socket.
    pub fn new(inner: T, stats: Arc<EdgeStats>, conn: Arc<ConnWan>) -> Self {
        WanCountingIo { inner, stats, conn }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WanCountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.stats.wan_bytes_in.fetch_add(n as u64, Relaxed);
        self.conn.bytes_in.fetch_add(n as u64, Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WanCountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.wan_bytes_out.fetch_add(n as u64, Relaxed);
            self.conn.bytes_out.fetch_add(n as u64, Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.wan_bytes_out.fetch_add(n as u64, Relaxed);
            self.conn.bytes_out.fetch_add(n as u64, Relaxed);
        }
        r
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

/// Makes closing `stream` send RST instead of FIN, so the application on that side sees
/// its stream broke rather than a clean end.
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    // SO_LINGER is deprecated in tokio because a non-zero linger blocks on drop; a zero
    // linger never blocks: the kernel discards unsent data and sends RST at once.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
}
