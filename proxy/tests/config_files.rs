//! Every shipped example configuration parses and validates.

use clap::Parser;
use proxy::config::{
    DEFAULT_DELTA_MEM, DEFAULT_GROUP_MEM, DEFAULT_PREFAULT_MEM, DEFAULT_READ_AHEAD_MEM,
    DEFAULT_SEND_AHEAD_MEM, DEFAULT_STREAM_MEM,
};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    edge: proxy::config::EdgeArgs,
}

#[test]
fn shipped_configs_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
            let cfg = cli
                .edge
                .resolve()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                cfg.tls.is_some(),
                "{}: shipped configs use TLS",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 2, "expected the shipped configs in {dir}");
}

#[test]
fn unknown_keys_and_bad_values_are_rejected() {
    let dir = std::env::temp_dir().join(format!("shrinker-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("listen_tunnel = \"127.0.0.1:1\"\n", "listen_tunnel"),
        ("tunnel_listen = \"127.0.0.1:1\"\ninsecure_plaintext = true\ncache_mem = \"12 bananas\"\n", "bananas"),
        ("tunnel_listen = \"127.0.0.1:1\"\ninsecure_plaintext = true\ncompress = \"maybe\"\n", "maybe"),
        ("forward = [\"1.2.3.4:5=x\"]\ninsecure_plaintext = true\n", "LISTEN=PEER=TARGET"),
        ("tunnel_listen = \"127.0.0.1:1\"\ninsecure_plaintext = true\nwindow = \"4KiB\"\n", "--window"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        let err = cli.edge.resolve().unwrap_err().to_string();
        assert!(err.contains(needle), "case {i}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flags_override_the_file_and_tables_work() {
    let dir = std::env::temp_dir().join(format!("shrinker-cfg2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("e.toml");
    std::fs::write(
        &path,
        "insecure_plaintext = true\ncache_mem = \"2GiB\"\n[[forward]]\nlisten = \"127.0.0.1:4444\"\npeer = \"127.0.0.2:7700\"\ntarget = \"10.0.0.1:4444\"\n",
    )
    .unwrap();
    let cli = Cli::parse_from([
        "x",
        "--config",
        path.to_str().unwrap(),
        "--cache-mem",
        "512MiB",
    ]);
    let cfg = cli.edge.resolve().unwrap();
    assert_eq!(cfg.cache_bytes, 512 << 20);
    assert_eq!(cfg.forwards.len(), 1);
    assert_eq!(cfg.forwards[0].target, "10.0.0.1:4444");
    // Memory budgets: defaults, then the file, then a flag over the file.
    assert_eq!(
        (
            cfg.stream_bytes,
            cfg.delta_bytes,
            cfg.read_ahead_bytes,
            cfg.send_ahead_bytes,
            cfg.group_bytes
        ),
        (
            DEFAULT_STREAM_MEM,
            DEFAULT_DELTA_MEM,
            DEFAULT_READ_AHEAD_MEM,
            DEFAULT_SEND_AHEAD_MEM,
            DEFAULT_GROUP_MEM
        )
    );
    let budgets = dir.join("budgets.toml");
    std::fs::write(
        &budgets,
        "tunnel_listen = \"127.0.0.1:7700\"\ninsecure_plaintext = true\nstream_mem = \"64MiB\"\ndelta_mem = \"0\"\nread_ahead_mem = \"8MiB\"\nsend_ahead_mem = \"2MiB\"\ngroup_mem = \"1MiB\"\n",
    )
    .unwrap();
    let from_file = |extra: &[&str]| {
        let args = [&["x", "--config", budgets.to_str().unwrap()][..], extra].concat();
        let c = Cli::parse_from(args).edge.resolve().unwrap();
        (
            c.stream_bytes,
            c.delta_bytes,
            c.read_ahead_bytes,
            c.send_ahead_bytes,
            c.group_bytes,
        )
    };
    assert_eq!(from_file(&[]), (64 << 20, 0, 8 << 20, 2 << 20, 1 << 20));
    assert_eq!(
        from_file(&[
            "--stream-mem",
            "0",
            "--read-ahead-mem",
            "1MiB",
            "--send-ahead-mem",
            "0",
            "--group-mem",
            "0"
        ]),
        (0, 0, 1 << 20, 0, 0)
    );
    // The heap touched before serving: the default, the file's, a flag over it, and
    // never more than the budgets together (64 MiB store + the file's 75 MiB).
    let prefault = |text: &str, extra: &[&str]| {
        let path = dir.join("prefault.toml");
        std::fs::write(
            &path,
            format!("tunnel_listen = \"127.0.0.1:7700\"\ninsecure_plaintext = true\n{text}"),
        )
        .unwrap();
        let args = [&["x", "--config", path.to_str().unwrap()][..], extra].concat();
        Cli::parse_from(args).edge.resolve().unwrap().prefault_bytes
    };
    assert_eq!(prefault("", &[]), DEFAULT_PREFAULT_MEM);
    assert_eq!(prefault("prefault_mem = \"1GiB\"\n", &[]), 1 << 30);
    assert_eq!(
        prefault("prefault_mem = \"1GiB\"\n", &["--prefault-mem", "0"]),
        0
    );
    let small = "cache_mem = \"64MiB\"\nstream_mem = \"64MiB\"\ndelta_mem = \"0\"\nread_ahead_mem = \"8MiB\"\nsend_ahead_mem = \"2MiB\"\ngroup_mem = \"1MiB\"\n";
    assert_eq!(
        prefault(small, &["--prefault-mem", "1GiB"]),
        (64 + 64 + 8 + 2 + 1) << 20
    );
    // Transparent listeners: short form, table, and a flag replacing the file's.
    let transparent = |name: &str, text: &str, extra: &[&str]| {
        let path = dir.join(name);
        std::fs::write(&path, format!("insecure_plaintext = true\n{text}")).unwrap();
        let args = [&["x", "--config", path.to_str().unwrap()][..], extra].concat();
        let c = Cli::parse_from(args).edge.resolve().unwrap();
        c.transparent
            .iter()
            .map(|t| format!("{}={}", t.listen, t.peer))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        transparent(
            "t1.toml",
            "transparent = [\"0.0.0.0:15001=edge-b:7700\"]\n",
            &[]
        ),
        ["0.0.0.0:15001=edge-b:7700"]
    );
    let table = "[[transparent]]\nlisten = \"[::]:15002\"\npeer = \"edge-c:7700\"\n";
    assert_eq!(
        transparent("t2.toml", table, &[]),
        ["[::]:15002=edge-c:7700"]
    );
    assert_eq!(
        transparent(
            "t2.toml",
            table,
            &["--transparent", "0.0.0.0:15003=edge-d:7700"]
        ),
        ["0.0.0.0:15003=edge-d:7700"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
