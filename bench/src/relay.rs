//! A plain TCP relay: the baseline hop (what a pair of port forwards would do).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Relay settings.
#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// Listen here (repeat for more lanes).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Forward to here (one per --listen, in the same order).
    #[arg(long, required = true)]
    pub to: Vec<SocketAddr>,
}

/// Relays every connection accepted on a lane's `listen` to its `to`, both ways,
/// half-close included.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    if args.listen.len() != args.to.len() {
        anyhow::bail!(
            "{} --listen but {} --to: give one --to per --listen",
            args.listen.len(),
            args.to.len()
        );
    }
    let mut lanes = tokio::task::JoinSet::new();
    for (&listen, &to) in args.listen.iter().zip(&args.to) {
        lanes.spawn(lane(TcpListener::bind(listen).await?, to));
    }
    while let Some(r) = lanes.join_next().await {
        r?;
    }
    Ok(())
}

async fn lane(listener: TcpListener, to: SocketAddr) {
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        let mut a = match listener.accept().await {
            Ok((a, _)) => a,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: keep serving.
                eprintln!("relay {listen}: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let Ok(mut b) = TcpStream::connect(to).await else {
                return;
            };
            let _ = a.set_nodelay(true);
            let _ = b.set_nodelay(true);
            // copy_bidirectional propagates each side's EOF as a shutdown of the other.
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taddr = target.local_addr().unwrap();
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        tokio::spawn(run(RelayArgs {
            listen: vec![listen],
            to: vec![taddr],
        }));
        tokio::spawn(async move {
            let (mut s, _) = target.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        let mut c = loop {
            if let Ok(c) = TcpStream::connect(listen).await {
                break c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        back.reverse();
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn half_close_from_the_target_side() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taddr = target.local_addr().unwrap();
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        tokio::spawn(run(RelayArgs {
            listen: vec![listen],
            to: vec![taddr],
        }));
        // The target speaks first and stops writing, then still reads the client.
        let server = tokio::spawn(async move {
            let (mut s, _) = target.accept().await.unwrap();
            s.write_all(b"hello, and that is all").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut c = loop {
            if let Ok(c) = TcpStream::connect(listen).await {
                break c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let mut greeting = Vec::new();
        c.read_to_end(&mut greeting).await.unwrap();
        assert_eq!(greeting, b"hello, and that is all");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), data);
    }
}
