//! Transparent interception, the TPROXY deployment: hypervisors migrate to the real
//! destination address, a gateway on the path diverts those connections with an
//! nftables TPROXY rule to the edge's `--transparent` listener, and the edge pair
//! delivers each to its original destination.
//!
//! Three network namespaces made by the test: the source host, the gateway (both edges,
//! the tunnel on its loopback) and the destination host, joined by veth pairs and
//! routed through the gateway, dual-stack (IPv4 and IPv6). One nftables `inet` rule
//! diverts both families to one `[::]` transparent listener. Real QEMU on both hosts;
//! the destination's RAM must equal the source's byte for byte. Needs root (namespaces, nftables, IP_TRANSPARENT):
//! the CI runs as root; elsewhere set SHRINKER_SKIP_NETNS=1 to skip it knowingly.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::qemu::{builds, migrate_with_mode, workload_ram, Mode};
use common::*;
use serde_json::json;
use testkit::wan_path::needs_root;

const RAM_MIB: u64 = 128;
/// The destination host's addresses and the migration port the gateway intercepts.
const DST_HOST: &str = "10.77.2.2";
const DST_HOST6: &str = "fd77:2::2";
const MIGRATION_PORT: u16 = 4444;
/// The gateway edge's transparent listener (a port nothing is addressed to).
const TPROXY_PORT: u16 = 15001;

fn s(v: &str) -> String {
    v.to_string()
}

/// Runs a command that must succeed (set-up of the test's own namespaces).
fn run(args: &[&str], stdin: Option<&str>) {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (install iproute2 and nftables)"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How the gateway diverts the migration port to the transparent listener: the two
/// recipes of docs/DEPLOY.md.
#[derive(Clone, Copy)]
enum Divert {
    /// One nftables `inet` table for both families.
    Nftables,
    /// iptables and ip6tables TPROXY targets in the mangle table.
    Iptables,
}

/// Source host, gateway and destination host namespaces; removed on drop.
struct Sites {
    src: String,
    gw: String,
    dst: String,
}

impl Sites {
    /// The sites; `tag` keeps the names of tests running at once apart.
    fn new(tag: char, divert: Divert) -> Sites {
        let p = format!("sh{tag}{}", std::process::id() % 100_000);
        let (src, gw, dst) = (format!("{p}-src"), format!("{p}-gw"), format!("{p}-dst"));
        let sites = Sites { src, gw, dst };
        for ns in [&sites.src, &sites.gw, &sites.dst] {
            // Left over from a run that was killed.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            run(&["ip", "netns", "add", ns], None);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"], None);
        }
        // Interface names (at most 15 bytes): {p}s / {p}a on the source side,
        // {p}d / {p}b on the destination side.
        let (s_if, ga_if, d_if, gb_if) = (
            format!("{p}s"),
            format!("{p}a"),
            format!("{p}d"),
            format!("{p}b"),
        );
        let link = |a: &str, ns_a: &str, b: &str, ns_b: &str| {
            run(
                &[
                    "ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b,
                    "netns", ns_b,
                ],
                None,
            );
        };
        link(&s_if, &sites.src, &ga_if, &sites.gw);
        link(&d_if, &sites.dst, &gb_if, &sites.gw);
        for (ns, dev, addr, addr6) in [
            (&sites.src, &s_if, "10.77.1.2/24", "fd77:1::2/64"),
            (&sites.gw, &ga_if, "10.77.1.1/24", "fd77:1::1/64"),
            (&sites.gw, &gb_if, "10.77.2.1/24", "fd77:2::1/64"),
            (&sites.dst, &d_if, "10.77.2.2/24", "fd77:2::2/64"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev], None);
            // No duplicate address detection: the addresses are usable at once.
            run(
                &[
                    "ip", "-n", ns, "-6", "addr", "add", addr6, "dev", dev, "nodad",
                ],
                None,
            );
            run(&["ip", "-n", ns, "link", "set", dev, "up"], None);
        }
        run(
            &[
                "ip",
                "-n",
                &sites.src,
                "route",
                "add",
                "default",
                "via",
                "10.77.1.1",
            ],
            None,
        );
        run(
            &[
                "ip",
                "-n",
                &sites.dst,
                "route",
                "add",
                "default",
                "via",
                "10.77.2.1",
            ],
            None,
        );
        for (ns, via6) in [(&sites.src, "fd77:1::1"), (&sites.dst, "fd77:2::1")] {
            run(
                &["ip", "-n", ns, "-6", "route", "add", "default", "via", via6],
                None,
            );
        }
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run(
                &["ip", "netns", "exec", &sites.gw, "sysctl", "-qw", sysctl],
                None,
            );
        }
        // The deployment recipe of docs/DEPLOY.md: divert the migration port arriving
        // from the source site to the transparent listener, and deliver marked packets
        // locally.
        // Both families in one `inet` table, as docs/DEPLOY.md shows.
        let rules = format!(
            "table inet shrinker {{
  chain divert {{
    type filter hook prerouting priority mangle; policy accept;
    iifname \"{ga_if}\" meta nfproto ipv4 tcp dport {MIGRATION_PORT} tproxy ip to :{TPROXY_PORT} meta mark set 1 accept
    iifname \"{ga_if}\" meta nfproto ipv6 tcp dport {MIGRATION_PORT} tproxy ip6 to :{TPROXY_PORT} meta mark set 1 accept
  }}
}}
"
        );
        match divert {
            Divert::Nftables => run(
                &["ip", "netns", "exec", &sites.gw, "nft", "-f", "-"],
                Some(&rules),
            ),
            Divert::Iptables => {
                for tables in ["iptables", "ip6tables"] {
                    let port = MIGRATION_PORT.to_string();
                    let on_port = TPROXY_PORT.to_string();
                    run(
                        &[
                            "ip",
                            "netns",
                            "exec",
                            &sites.gw,
                            tables,
                            "-t",
                            "mangle",
                            "-A",
                            "PREROUTING",
                            "-i",
                            &ga_if,
                            "-p",
                            "tcp",
                            "--dport",
                            &port,
                            "-j",
                            "TPROXY",
                            "--on-port",
                            &on_port,
                            "--tproxy-mark",
                            "1",
                        ],
                        None,
                    );
                }
            }
        }
        run(
            &[
                "ip", "-n", &sites.gw, "rule", "add", "fwmark", "1", "lookup", "100",
            ],
            None,
        );
        run(
            &[
                "ip",
                "-n",
                &sites.gw,
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ],
            None,
        );
        run(
            &[
                "ip", "-n", &sites.gw, "-6", "rule", "add", "fwmark", "1", "lookup", "100",
            ],
            None,
        );
        run(
            &[
                "ip", "-n", &sites.gw, "-6", "route", "add", "local", "::/0", "dev", "lo", "table",
                "100",
            ],
            None,
        );
        sites
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for ns in [&self.src, &self.gw, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_diverted_by_nftables_tproxy_reach_their_destination_exactly() {
    if !needs_root("the TPROXY test (network namespaces, nftables, IP_TRANSPARENT)") {
        return;
    }
    // Over IPv4, VM 0 migrates plainly and VM 1 with four multifd channels, which must
    // reach the destination in the order the source opened them; VM 2 over IPv6 with
    // two.
    through_tproxy(
        "tproxy-nft",
        Sites::new('n', Divert::Nftables),
        &[(0, 0, false), (1, 4, false), (2, 2, true)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_diverted_by_iptables_tproxy_reach_their_destination_exactly() {
    if !needs_root("the TPROXY test (network namespaces, nftables, IP_TRANSPARENT)") {
        return;
    }
    // Over IPv4 with two multifd channels, over IPv6 plainly.
    through_tproxy(
        "tproxy-ipt",
        Sites::new('i', Divert::Iptables),
        &[(0, 2, false), (1, 0, true)],
    )
    .await;
}

/// Migrates `(vm, multifd channels, over IPv6)` one after another from the source host
/// to the destination host's own address, through the gateway's rule and edges.
async fn through_tproxy(name: &str, sites: Sites, migrations: &[(u64, u64, bool)]) {
    let build = &builds()[0];
    let dir = Scratch::new(name);
    certs(dir.path(), &["a", "b"]);
    let tunnel: SocketAddr = "127.0.0.1:7700".parse().unwrap();
    let _b = EdgeProc::start_in(
        Some(&sites.gw),
        dir.path(),
        "b",
        &[
            s("--tunnel-listen"),
            tunnel.to_string(),
            s("--cache-mem"),
            s("1GiB"),
        ],
        tunnel,
    );
    let a = EdgeProc::start_in(
        Some(&sites.gw),
        dir.path(),
        "a",
        &[
            s("--transparent"),
            format!("[::]:{TPROXY_PORT}={tunnel}"),
            s("--cache-mem"),
            s("1GiB"),
        ],
        tunnel,
    );
    let target: SocketAddr = format!("{DST_HOST}:{MIGRATION_PORT}").parse().unwrap();
    let target6: SocketAddr = format!("[{DST_HOST6}]:{MIGRATION_PORT}").parse().unwrap();
    // The source migrates to the destination's own address: only the gateway's rule
    // brings the edges into the path.
    let mut completed = 0;
    for &(vm, channels, v6) in migrations {
        let target = if v6 { target6 } else { target };
        let mode = if channels > 0 {
            Mode {
                caps: vec!["multifd"],
                params: json!({"multifd-channels": channels}),
            }
        } else {
            Mode::default()
        };
        migrate_with_mode(
            (Some(&sites.src), Some(&sites.dst)),
            build,
            dir.path(),
            &format!("tp{vm}"),
            (target, target),
            RAM_MIB,
            Box::new(workload_ram(
                testkit::Workload::cluster(2026, 48 << 20),
                vm,
                RAM_MIB,
            )),
            &mode,
        )
        .await;
        completed += 1 + channels;
        a.wait_for("the migration's connections through edge A", |c| {
            c["connections_completed"].as_u64().unwrap() >= completed
        });
    }
    let st = a.stats();
    let c = &st["counters"];
    assert_eq!(c["connections_failed"], 0, "{c}\n{}", a.log());
    let streams = migrations.len() as u64;
    let channels: u64 = migrations.iter().map(|m| m.1).sum();
    assert_eq!(c["qemu_streams"], streams, "{c}");
    assert_eq!(c["multifd_channels"], channels, "{c}");
    for original in [target, target6] {
        assert!(
            a.log().contains(&format!("target={original}")),
            "edge A should name the original destination {original}:\n{}",
            a.log()
        );
    }
    let (lan, wan) = (
        c["lan_bytes_in"].as_u64().unwrap(),
        c["wan_bytes_out"].as_u64().unwrap(),
    );
    eprintln!("through TPROXY: LAN {lan} B, WAN {wan} B");
    assert!(
        wan * 2 < lan,
        "the second VM's shared pages should cross as references: WAN {wan} of LAN {lan}"
    );
}
