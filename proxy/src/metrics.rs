//! Prometheus metrics over HTTP (`--metrics-listen`): the counters of the JSON snapshot
//! (docs/METRICS.md) in the text exposition format, so an edge appliance or sidecar
//! can be scraped like the rest of a site. One `GET /metrics` per connection; nothing
//! else is served.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::stats::Snapshot;

/// A request head longer than this is refused (a scrape's is a few hundred bytes).
const MAX_HEAD: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Counters that go up and down (everything else only goes up).
const GAUGES: &[&str] = &["active_connections"];

/// The snapshot in Prometheus' text format (version 0.0.4).
pub fn render(s: &Snapshot) -> String {
    let edge = format!("edge=\"{}\"", escape(&s.edge));
    let mut out = String::with_capacity(8 * 1024);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP shrinker_{name} {}", help.trim());
        let _ = writeln!(out, "# TYPE shrinker_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "shrinker_{name}{{{labels}}} {v}");
        }
    };
    for (name, help, value) in s.counters.entries() {
        let sample = [(edge.clone(), value as f64)];
        if GAUGES.contains(&name) {
            metric(name, "gauge", help, &sample);
        } else {
            metric(&format!("{name}_total"), "counter", help, &sample);
        }
    }
    let st = &s.store;
    for (name, kind, help, value) in [
        (
            "uptime_seconds",
            "gauge",
            "Seconds since the edge started.",
            s.uptime_secs,
        ),
        (
            "store_entries",
            "gauge",
            "Chunks held in the shared store.",
            st.entries as f64,
        ),
        (
            "store_bytes",
            "gauge",
            "Bytes held in the shared store (weighted, with per-entry overhead).",
            st.bytes as f64,
        ),
        (
            "store_capacity_bytes",
            "gauge",
            "The shared store's budget (--cache-mem).",
            st.capacity_bytes as f64,
        ),
        (
            "store_hits_total",
            "counter",
            "Store lookups that found the chunk.",
            st.hits as f64,
        ),
        (
            "store_misses_total",
            "counter",
            "Store lookups that did not.",
            st.misses as f64,
        ),
        (
            "store_evictions_total",
            "counter",
            "Chunks evicted from the store.",
            st.evictions as f64,
        ),
    ] {
        metric(name, kind, help, &[(edge.clone(), value)]);
    }
    let peers: Vec<(String, f64)> = s
        .peers
        .iter()
        .map(|p| {
            (
                format!("{edge},peer=\"{}\"", escape(&p.name)),
                p.modelled_entries as f64,
            )
        })
        .collect();
    metric(
        "peer_modelled_entries",
        "gauge",
        "Chunks this edge believes the peer edge holds.",
        &peers,
    );
    out
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` until `stop`; `snapshot` is taken per request.
pub(crate) async fn serve(
    listener: TcpListener,
    snapshot: impl Fn() -> Snapshot + Send + Sync + Clone + 'static,
    stop: CancellationToken,
) {
    loop {
        let (conn, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, snapshot).await {
                debug!(%from, "metrics request failed: {e}");
            }
        });
    }
}

/// Reads one request head and answers it, then closes.
async fn answer(mut conn: TcpStream, snapshot: impl Fn() -> Snapshot) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(true)
    })
    .await
    .unwrap_or(Ok(false))?;
    let (status, body) = match route(complete.then_some(&head[..])) {
        Route::Metrics => ("200 OK", render(&snapshot())),
        Route::Reject(status, body) => (status, body.to_string()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    /// Status line and body of a refusal.
    Reject(&'static str, &'static str),
}

/// Routes a request head (`None`: it never completed). Any bytes are handled: the
/// head comes from whoever can reach the metrics port.
fn route(head: Option<&[u8]>) -> Route {
    let Some(head) = head else {
        return Route::Reject("400 Bad Request", "incomplete request\n");
    };
    let line = String::from_utf8_lossy(head);
    let mut words = line.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", _) => Route::Reject("404 Not Found", "metrics are at /metrics\n"),
        _ => Route::Reject("405 Method Not Allowed", "only GET /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{CountersSnapshot, PeerSnapshot, StoreSnapshot};

    #[test]
    fn requests_are_routed() {
        assert_eq!(
            route(Some(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")),
            Route::Metrics
        );
        assert!(matches!(
            route(Some(b"GET / HTTP/1.1\r\n\r\n")),
            Route::Reject("404 Not Found", _)
        ));
        assert!(matches!(
            route(Some(b"DELETE /metrics HTTP/1.1\r\n\r\n")),
            Route::Reject("405 Method Not Allowed", _)
        ));
        assert!(matches!(route(None), Route::Reject("400 Bad Request", _)));
    }

    proptest::proptest! {
        #[test]
        fn any_request_head_gets_an_answer(head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            // Never a panic; the metrics only for a GET of /metrics.
            if route(Some(&head)) == Route::Metrics {
                proptest::prop_assert!(head.starts_with(b"GET /metrics"));
            }
        }
    }

    #[test]
    fn text_format_with_help_types_and_labels() {
        let s = Snapshot {
            edge: "site \"a\"".into(),
            epoch: 1,
            uptime_secs: 2.5,
            counters: CountersSnapshot {
                lan_bytes_in: 1234,
                active_connections: 3,
                ..Default::default()
            },
            store: StoreSnapshot {
                entries: 10,
                ..Default::default()
            },
            peers: vec![PeerSnapshot {
                name: "b".into(),
                epoch: 7,
                modelled_entries: 42,
            }],
            reduction_ratio: 0.0,
            recent_connections: vec![],
        };
        let text = render(&s);
        for want in [
            "# HELP shrinker_lan_bytes_in_total Bytes read from local sockets (hypervisor side).\n",
            "# TYPE shrinker_lan_bytes_in_total counter\n",
            "shrinker_lan_bytes_in_total{edge=\"site \\\"a\\\"\"} 1234\n",
            "# TYPE shrinker_active_connections gauge\n",
            "shrinker_active_connections{edge=\"site \\\"a\\\"\"} 3\n",
            "shrinker_store_entries{edge=\"site \\\"a\\\"\"} 10\n",
            "shrinker_uptime_seconds{edge=\"site \\\"a\\\"\"} 2.5\n",
            "shrinker_peer_modelled_entries{edge=\"site \\\"a\\\"\",peer=\"b\"} 42\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }
}
