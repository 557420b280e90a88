//! Which destinations peers may make this edge connect to (`--allow-target`).
//!
//! A peer edge names the target of each tunnel connection; the accepting edge connects
//! there from inside its site. Peers are authenticated (their certificates come from
//! the deployment's CA), but an edge that connects wherever a peer says reaches every
//! host and port of its site: operators restrict it to the hypervisors' networks and
//! migration ports. Checked after name resolution, on the addresses actually dialled.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// One allowed network (address and prefix length) and port range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowTarget {
    net: IpAddr,
    prefix: u8,
    ports: (u16, u16),
}

impl AllowTarget {
    /// Whether `addr` lies in this network and port range. An IPv4 rule also covers
    /// the IPv4-mapped IPv6 form of its addresses.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let port = addr.port();
        if port < self.ports.0 || port > self.ports.1 {
            return false;
        }
        match (self.net, addr.ip().to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (full, rest) = (usize::from(prefix / 8), prefix % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

impl FromStr for AllowTarget {
    type Err = String;

    /// `NET[/LEN][:PORT[-PORT]]`, IPv6 in brackets when a port follows:
    /// `10.2.0.0/16:4444-4450`, `10.2.0.5`, `[2001:db8::/32]:49152-49215`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("invalid --allow-target {s:?}: {why} (expected NET[/LEN][:PORT[-PORT]], e.g. 10.2.0.0/16:4444-4450 or [2001:db8::/32]:4444)")
        };
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            match after {
                "" => (net, None),
                p => (
                    net,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("text after ]"))?),
                ),
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 network: no port can follow without brackets.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((net, p)) => (net, Some(p)),
                None => (s, None),
            }
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (net, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| bad("prefix length out of range"))?,
            None => max,
        };
        let ports = match ports {
            None => (0, u16::MAX),
            Some(p) => {
                let port = |v: &str| v.parse::<u16>().map_err(|_| bad("not a port number"));
                let (lo, hi) = match p.split_once('-') {
                    Some((lo, hi)) => (port(lo)?, port(hi)?),
                    None => (port(p)?, port(p)?),
                };
                if lo > hi {
                    return Err(bad("port range runs backwards"));
                }
                (lo, hi)
            }
        };
        Ok(AllowTarget { net, prefix, ports })
    }
}

impl fmt::Display for AllowTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = format!("{}/{}", self.net, self.prefix);
        let net = if self.net.is_ipv6() {
            format!("[{net}]")
        } else {
            net
        };
        match self.ports {
            (0, u16::MAX) => write!(f, "{net}"),
            (lo, hi) if lo == hi => write!(f, "{net}:{lo}"),
            (lo, hi) => write!(f, "{net}:{lo}-{hi}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for AllowTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rule: &str, addr: &str) -> bool {
        rule.parse::<AllowTarget>()
            .unwrap()
            .allows(addr.parse().unwrap())
    }

    #[test]
    fn networks_and_ports() {
        assert!(allows("10.2.0.0/16:4444-4450", "10.2.200.7:4444"));
        assert!(allows("10.2.0.0/16:4444-4450", "10.2.0.1:4450"));
        assert!(!allows("10.2.0.0/16:4444-4450", "10.2.0.1:4451"));
        assert!(!allows("10.2.0.0/16:4444-4450", "10.3.0.1:4444"));
        assert!(allows("10.2.0.5", "10.2.0.5:22"));
        assert!(!allows("10.2.0.5", "10.2.0.6:22"));
        assert!(allows("10.2.0.0/23:49152", "10.2.1.255:49152"));
        assert!(!allows("10.2.0.0/23:49152", "10.2.2.0:49152"));
        assert!(allows("0.0.0.0/0:4444", "192.0.2.1:4444"));
        assert!(allows("10.2.0.0/16", "[::ffff:10.2.3.4]:4444"));
        assert!(allows("[2001:db8::/32]:4444", "[2001:db8:1::5]:4444"));
        assert!(!allows("[2001:db8::/32]:4444", "[2001:db9::5]:4444"));
        assert!(allows("2001:db8::/32", "[2001:db8::1]:1"));
        assert!(!allows("2001:db8::/32", "10.0.0.1:1"));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (rule, why) in [
            ("10.2.0.0/33", "prefix length"),
            ("10.2.0/16", "not an IP"),
            ("10.2.0.0/16:70000", "not a port"),
            ("10.2.0.0/16:4450-4444", "backwards"),
            ("[2001:db8::/32", "closing ]"),
            ("[2001:db8::]x", "after ]"),
        ] {
            let e = rule.parse::<AllowTarget>().unwrap_err();
            assert!(
                e.contains(why) && e.contains("--allow-target"),
                "{rule}: {e}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for rule in [
            "10.2.0.0/16:4444-4450",
            "10.2.0.5/32",
            "[2001:db8::/32]:4444",
        ] {
            let r: AllowTarget = rule.parse().unwrap();
            assert_eq!(r.to_string(), rule);
            assert_eq!(r.to_string().parse::<AllowTarget>().unwrap(), r);
        }
    }
}
