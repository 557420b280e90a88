//! The kernel's view of one TCP connection's path (`getsockopt(TCP_INFO)` on Linux).
//!
//! The edge's compression governor needs to know whether the link or the edge itself
//! is what limits a tunnel connection. Its own waits cannot tell while kernel socket
//! buffers absorb everything written, and the peer's acknowledgements arrive late and
//! in bursts when the peer is busy. The kernel knows: bytes the application wrote that
//! TCP has not yet been allowed to send (`notsent`) pile up only when the network (or
//! the receiver) is slower than the writer, and a delivery-rate sample not limited by
//! the application measures the path's bandwidth.
//!
//! This crate holds the only `unsafe` code of the edge: one `getsockopt` into a
//! zero-initialised `libc::tcp_info`.

#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;

/// What `TCP_INFO` said about a connection at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathSample {
    /// Bytes written by the application that TCP has not sent yet (held back by the
    /// congestion or receive window).
    pub notsent: u64,
    /// The latest delivery-rate sample, bytes per second.
    pub delivery_rate: u64,
    /// Whether that sample was limited by the application (nothing to send), so that
    /// it says nothing of the path's capacity.
    pub app_limited: bool,
    /// Microseconds TCP spent limited by the receiver's window (cumulative).
    pub rwnd_limited_us: u64,
    /// Microseconds TCP spent limited by the send buffer (cumulative).
    pub sndbuf_limited_us: u64,
    /// Bytes the receiving host acknowledged (cumulative).
    pub bytes_acked: u64,
    /// Microseconds TCP spent with data in flight (cumulative; the two `*_limited_us`
    /// are parts of it).
    pub busy_us: u64,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
}

impl PathSample {
    /// This sample's cumulative figures counted from `earlier` (a sample of the same
    /// socket): what happened in between. Instantaneous ones stay this sample's.
    pub fn since(&self, earlier: &PathSample) -> PathSample {
        PathSample {
            rwnd_limited_us: self.rwnd_limited_us.saturating_sub(earlier.rwnd_limited_us),
            sndbuf_limited_us: self
                .sndbuf_limited_us
                .saturating_sub(earlier.sndbuf_limited_us),
            bytes_acked: self.bytes_acked.saturating_sub(earlier.bytes_acked),
            busy_us: self.busy_us.saturating_sub(earlier.busy_us),
            ..*self
        }
    }
}

/// Reads `TCP_INFO` of a TCP socket. `None` where the platform has no `TCP_INFO`, the
/// descriptor is not a TCP socket, or the kernel predates the fields used (they then
/// read as zero, which callers treat as "no evidence").
#[cfg(target_os = "linux")]
pub fn sample<S: AsRawFd>(socket: &S) -> Option<PathSample> {
    sample_fd(socket.as_raw_fd())
}

/// As [`sample`], by raw descriptor: the caller keeps the socket open meanwhile.
#[cfg(target_os = "linux")]
pub fn sample_fd(fd: std::os::fd::RawFd) -> Option<PathSample> {
    // SAFETY: `tcp_info` is plain data (integers only), so all-zero bytes are a valid
    // value; getsockopt writes at most `len` bytes into it and reports how many. A bad
    // or closed descriptor only makes the call fail (EBADF/ENOTSOCK), which is handled.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // The byte after `tcpi_options` holds the window scales; the next one's lowest bit
    // is `tcpi_delivery_rate_app_limited` (linux/tcp.h). libc names the first and
    // leaves the second as padding: read it from the raw bytes.
    let app_limited = {
        let base = (&info as *const libc::tcp_info).cast::<u8>();
        let at = std::mem::offset_of!(libc::tcp_info, tcpi_snd_rcv_wscale) + 1;
        // SAFETY: `at` is inside `info` (the 8-byte header precedes the first u32).
        unsafe { *base.add(at) & 1 == 1 }
    };
    Some(PathSample {
        notsent: u64::from(info.tcpi_notsent_bytes),
        delivery_rate: info.tcpi_delivery_rate,
        app_limited,
        rwnd_limited_us: info.tcpi_rwnd_limited,
        sndbuf_limited_us: info.tcpi_sndbuf_limited,
        bytes_acked: info.tcpi_bytes_acked,
        busy_us: info.tcpi_busy_time,
        rtt_us: info.tcpi_rtt,
    })
}

/// No `TCP_INFO` here: never any evidence.
#[cfg(not(target_os = "linux"))]
pub fn sample_fd(_fd: i32) -> Option<PathSample> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_reader_that_stops_leaves_bytes_unsent_and_acks_what_it_took() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        let idle = sample(&writer).expect("TCP_INFO of a TCP socket");
        assert_eq!(idle.notsent, 0);
        // 64 KiB read in full: acknowledged, nothing left to send.
        writer.write_all(&vec![7u8; 64 << 10]).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        reader.read_exact(&mut buf).unwrap();
        let mut s = sample(&writer).unwrap();
        for _ in 0..100 {
            if s.bytes_acked >= 64 << 10 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            s = sample(&writer).unwrap();
        }
        assert!(s.bytes_acked >= 64 << 10, "{s:?}");
        assert_eq!(s.notsent, 0, "{s:?}");
        assert!(s.rtt_us > 0, "a round trip was measured: {s:?}");
        // Now the reader stops: once its receive window is full, written bytes wait
        // in the sender's queue, unsent.
        writer.set_nonblocking(true).unwrap();
        let chunk = vec![1u8; 256 << 10];
        let mut written = 0usize;
        for _ in 0..4096 {
            match writer.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let s = sample(&writer).unwrap();
        assert!(written > 0);
        assert!(s.notsent > 0, "a stalled reader leaves bytes unsent: {s:?}");
    }

    #[test]
    fn not_a_tcp_socket_gives_no_sample() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(sample(&udp), None);
        assert_eq!(sample_fd(-1), None);
    }
}
