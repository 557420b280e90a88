//! A plain TCP relay: the baseline hop (what a pair of port forwards would do).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Relay settings.
#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// Listen here.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Forward to here.
    #[arg(long)]
    pub to: SocketAddr,
}

/// Relays every accepted connection to `to`, both ways, half-close included.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    loop {
        let (mut a, _) = listener.accept().await?;
        let to = args.to;
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
        tokio::spawn(run(RelayArgs { listen, to: taddr }));
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
}
