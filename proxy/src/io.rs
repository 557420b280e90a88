//! I/O wrappers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::EdgeStats;

/// WAN bytes of one tunnel connection.
#[derive(Debug, Default)]
pub struct ConnWan {
    /// Bytes read from the tunnel socket.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Bytes written to the tunnel socket.
    pub bytes_out: std::sync::atomic::AtomicU64,
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
