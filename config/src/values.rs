//! Parsers for the scalar values of `balancer.toml`: durations, sizes, signals, listen URLs,
//! policies and instance counts.
//!
//! They are public so the command line gives `-l :8080` or `--kill-timeout 5s` exactly the
//! meaning the file gives them. Each returns a message that reads well after `` `key`: ``.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::model::{Balance, Instances, Io, Policy, Proto, ProxyVersion, Signal};

/// Parses a duration: `"1s"`, `"500ms"`, `"2m"`, `"1h30m"` (humantime), or a bare integer meaning
/// milliseconds, as PM2's ecosystem files write them.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const EXPECTED: &str =
        "expected e.g. \"500ms\", \"5s\", \"1h30m\" or an integer of milliseconds";
    let text = s.trim();
    if text.is_empty() {
        return Err(format!("empty duration; {EXPECTED}"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("duration `{text}` is too large"));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration `{text}` ({e}); {EXPECTED}"))
}

/// Parses a memory size the way PM2's `max_memory_restart` does: a bare integer is bytes and
/// `K`, `M`, `G` are 1024-based (`"300M"`). Two-letter units (`"512MiB"`, `"1.5GB"`) are also
/// understood, with their usual meaning (`MB` = 10^6, `MiB` = 2^20).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let unit_at = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = (text[..unit_at].trim(), &text[unit_at..]);
    let pm2_multiplier = match unit {
        "" => Some(1),
        "K" | "k" => Some(1 << 10),
        "M" | "m" => Some(1 << 20),
        "G" | "g" => Some(1 << 30),
        _ => None,
    };
    if let Some(multiplier) = pm2_multiplier
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
    {
        return number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .ok_or_else(|| format!("size `{text}` is too large"));
    }
    if unit.len() >= 2
        && let Ok(size) = text.parse::<bytesize::ByteSize>()
    {
        return Ok(size.as_u64());
    }
    Err(format!(
        "invalid size `{text}`; expected bytes, or a whole number with K, M or G (1024-based) such as \"300M\""
    ))
}

/// Parses a signal name: `"SIGTERM"`, `"TERM"`, `"sigterm"`, or its number (`"15"`).
/// SIGSTOP is refused: it pauses a worker instead of asking it to stop.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let text = s.trim();
    let signal = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<i32>()
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
    } else {
        let upper = text.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        name.parse::<Signal>().ok()
    };
    match signal {
        Some(Signal::SIGSTOP) => Err(
            "SIGSTOP cannot stop a worker, only pause it; use SIGTERM, SIGINT or SIGKILL"
                .to_owned(),
        ),
        Some(signal) => Ok(signal),
        None => Err(format!(
            "unknown signal `{text}`; expected a name such as \"SIGTERM\", \"TERM\" or \"SIGINT\""
        )),
    }
}

/// Parses a public listen address: `"tcp://0.0.0.0:8080"`, `"udp://[::1]:53"`,
/// `"http://localhost:80"`. Without a scheme it is TCP; without a host (`"tcp://:8080"`,
/// `":8080"`, `"8080"`) it is every IPv4 address. `localhost` means 127.0.0.1; other host names
/// are refused because a listener must not depend on DNS at start-up.
pub fn parse_listen_url(s: &str) -> Result<(Proto, SocketAddr), String> {
    let text = s.trim();
    if text.is_empty() {
        return Err(
            "empty listen address; expected e.g. \"tcp://0.0.0.0:8080\" or \":8080\"".to_owned(),
        );
    }
    let (proto, rest) = match text.split_once("://") {
        None => (Proto::Tcp, text),
        Some((scheme, rest)) => {
            let proto = match scheme.to_ascii_lowercase().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                "http" => Proto::Http,
                _ => {
                    return Err(format!(
                        "unknown scheme `{scheme}://` in `{text}`; expected tcp://, udp:// or http://"
                    ));
                }
            };
            (proto, rest)
        }
    };
    // `http://host:port/` is how people write HTTP addresses; any other path means something
    // this listener would not do.
    let rest = match (proto, rest.find('/')) {
        (_, None) => rest,
        (Proto::Http, Some(i)) if &rest[i..] == "/" => &rest[..i],
        (_, Some(i)) => {
            return Err(format!(
                "unexpected path `{}` in `{text}`; a listen address is host:port",
                &rest[i..]
            ));
        }
    };
    let addr = parse_host_port(rest).map_err(|e| format!("{e} in `{text}`"))?;
    if addr.port() == 0 {
        return Err(format!(
            "port 0 in `{text}`; expected a port between 1 and 65535"
        ));
    }
    Ok((proto, addr))
}

/// Parses `host:port`, `:port` or `port` (any port, 0 included). The host is an IP address
/// (IPv6 in brackets), `localhost`, `*`, or empty for 0.0.0.0.
pub(crate) fn parse_host_port(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => (host, port),
        None if s.bytes().all(|b| b.is_ascii_digit()) => ("", s),
        None => return Err("missing port (expected host:port)".to_owned()),
    };
    if host.contains(':') && !host.starts_with('[') {
        return Err("IPv6 addresses need brackets, as in [::1]:53".to_owned());
    }
    let port = match port.parse::<u32>() {
        Ok(port) => u16::try_from(port)
            .map_err(|_| format!("port {port} is out of range; expected 1 to 65535"))?,
        Err(_) if port.is_empty() => return Err("missing port".to_owned()),
        Err(_) => return Err(format!("invalid port `{port}`")),
    };
    let ip = match host {
        "" | "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6
                .parse()
                .map_err(|_| format!("invalid IPv6 address `{v6}`"))?,
            None => host.parse().map_err(|_| {
                format!("invalid host `{host}`; expected an IP address or localhost")
            })?,
        },
    };
    Ok(SocketAddr::new(ip, port))
}

/// `"rr"` or `"reuseport"` (any case), as in `policy` and `BALANCER_SCHED_POLICY`.
impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rr" => Ok(Policy::RoundRobin),
            "reuseport" => Ok(Policy::ReusePort),
            _ => Err(format!(
                "unknown policy \"{}\"; expected \"rr\" or \"reuseport\"",
                s.trim()
            )),
        }
    }
}

impl FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "round_robin" | "roundrobin" | "rr" => Ok(Balance::RoundRobin),
            "least_conn" | "leastconn" => Ok(Balance::LeastConn),
            "p2c" => Ok(Balance::P2c),
            "source" => Ok(Balance::Source),
            _ => Err(format!(
                "unknown balance \"{}\"; expected \"round_robin\", \"least_conn\", \"p2c\" or \"source\"",
                s.trim()
            )),
        }
    }
}

impl FromStr for Io {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Io::Auto),
            "epoll" => Ok(Io::Epoll),
            "io_uring" | "iouring" | "uring" => Ok(Io::IoUring),
            _ => Err(format!(
                "unknown io \"{}\"; expected \"auto\", \"epoll\" or \"io_uring\"",
                s.trim()
            )),
        }
    }
}

impl FromStr for ProxyVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(ProxyVersion::V1),
            "v2" | "2" => Ok(ProxyVersion::V2),
            _ => Err(format!(
                "unknown PROXY protocol version \"{}\"; expected \"v1\" or \"v2\"",
                s.trim()
            )),
        }
    }
}

impl Instances {
    /// What an integer `instances` means: a count, or CPUs minus `|n|` when negative.
    pub fn from_integer(n: i64) -> Result<Self, String> {
        let too_many = || format!("{n} instances is out of range");
        if n >= 0 {
            u32::try_from(n)
                .map(Instances::Count)
                .map_err(|_| too_many())
        } else {
            u32::try_from(n.unsigned_abs())
                .map(Instances::CpusMinus)
                .map_err(|_| too_many())
        }
    }
}

/// `"max"`, a count, or a negative count (CPUs minus that many), as in `-i`.
impl FromStr for Instances {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.eq_ignore_ascii_case("max") {
            return Ok(Instances::Max);
        }
        let n = text
            .parse::<i64>()
            .map_err(|_| format!("expected an integer or \"max\", found \"{text}\""))?;
        Instances::from_integer(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").unwrap_err().contains("empty duration"));
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(err.starts_with("invalid duration `5 parsecs`"), "{err}");
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes_are_1024_based_like_pm2() {
        assert_eq!(parse_size("300M"), Ok(300 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1 MB"), Ok(1_000_000));
        assert!(
            parse_size("300X")
                .unwrap_err()
                .contains("invalid size `300X`")
        );
        assert!(parse_size("M").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(
            parse_size("99999999999999G")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn signals() {
        for s in ["SIGTERM", "TERM", "sigterm", "term", " 15 "] {
            assert_eq!(parse_signal(s), Ok(Signal::SIGTERM), "{s}");
        }
        assert_eq!(parse_signal("SIGKILL"), Ok(Signal::SIGKILL));
        assert!(
            parse_signal("SIGSTOP")
                .unwrap_err()
                .contains("SIGSTOP cannot stop")
        );
        assert!(parse_signal("STOP").is_err());
        assert!(
            parse_signal("SIGFOO")
                .unwrap_err()
                .contains("unknown signal `SIGFOO`")
        );
        assert!(parse_signal("999").is_err());
    }

    #[test]
    fn listen_url_forms() {
        let tcp = |s: &str| (Proto::Tcp, s.parse::<SocketAddr>().unwrap());
        assert_eq!(
            parse_listen_url("tcp://0.0.0.0:8080"),
            Ok(tcp("0.0.0.0:8080"))
        );
        assert_eq!(
            parse_listen_url("udp://[::1]:53"),
            Ok((Proto::Udp, "[::1]:53".parse().unwrap()))
        );
        assert_eq!(
            parse_listen_url("http://localhost:80"),
            Ok((Proto::Http, "127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            parse_listen_url("http://127.0.0.1:80/"),
            Ok((Proto::Http, "127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(parse_listen_url("tcp://:8080"), Ok(tcp("0.0.0.0:8080")));
        assert_eq!(parse_listen_url(":8080"), Ok(tcp("0.0.0.0:8080")));
        assert_eq!(parse_listen_url("8080"), Ok(tcp("0.0.0.0:8080")));
        assert_eq!(parse_listen_url("TCP://[::]:9000"), Ok(tcp("[::]:9000")));
        assert_eq!(parse_listen_url("127.0.0.1:1"), Ok(tcp("127.0.0.1:1")));
        assert_eq!(parse_listen_url("*:65535"), Ok(tcp("0.0.0.0:65535")));
    }

    #[test]
    fn listen_url_errors_say_what_is_wrong() {
        let err = |s: &str| parse_listen_url(s).unwrap_err();
        assert!(err("tcp://0.0.0.0:0").starts_with("port 0 in `tcp://0.0.0.0:0`"));
        assert!(err("tcp://0.0.0.0:65536").contains("port 65536 is out of range"));
        assert!(err("tcp://0.0.0.0:http").contains("invalid port `http`"));
        assert!(err("tcp://0.0.0.0").contains("missing port"));
        assert!(err("tcp://0.0.0.0:").contains("missing port"));
        assert!(err("tls://0.0.0.0:443").contains("unknown scheme `tls://`"));
        assert!(err("tcp://example.com:80").contains("invalid host `example.com`"));
        assert!(err("tcp://::1:53").contains("IPv6 addresses need brackets"));
        assert!(err("tcp://[::g]:53").contains("invalid IPv6 address `::g`"));
        assert!(err("tcp://0.0.0.0:80/x").contains("unexpected path `/x`"));
        assert!(err("").contains("empty listen address"));
    }

    #[test]
    fn policies_and_instances_from_strings() {
        assert_eq!("rr".parse(), Ok(Policy::RoundRobin));
        assert_eq!("ReusePort".parse(), Ok(Policy::ReusePort));
        assert!(
            "random"
                .parse::<Policy>()
                .unwrap_err()
                .contains("unknown policy \"random\"")
        );
        assert_eq!("max".parse(), Ok(Instances::Max));
        assert_eq!("4".parse(), Ok(Instances::Count(4)));
        assert_eq!("-1".parse(), Ok(Instances::CpusMinus(1)));
        assert!("lots".parse::<Instances>().is_err());
    }
}
