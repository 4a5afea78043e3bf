//! What the CLI prints: tables of workers and apps, log lines, uptimes. Pure functions of the
//! admin protocol's types, so the output is unit-tested and stable when piped.

pub mod table;

use std::io::IsTerminal;

use crate::protocol::LogLine;

/// Whether output may be styled (colors, terminal width) or must be plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Not a terminal (a pipe, a file, a test), or `NO_COLOR` is set: no escape codes, no
    /// wrapping to a width.
    Plain,
    /// A terminal: colors, and tables fit its width.
    Terminal,
}

impl Output {
    /// [`Output::Terminal`] when stdout is a terminal and `NO_COLOR` is unset or empty.
    pub fn stdout() -> Output {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        if std::io::stdout().is_terminal() && !no_color {
            Output::Terminal
        } else {
            Output::Plain
        }
    }
}

/// An uptime the way PM2 shows it: the largest whole unit, `5s`, `3m`, `2h`, `4D`.
pub fn uptime(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}D", secs / 86_400),
    }
}

/// A size the way `ls` shows memory: binary units, one decimal from MiB up (`512 KiB`,
/// `45.2 MiB`, `1.3 GiB`).
pub fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let n = n as f64;
    if n < KIB {
        format!("{n} B")
    } else if n < KIB * KIB {
        format!("{:.0} KiB", n / KIB)
    } else if n < KIB * KIB * KIB {
        format!("{:.1} MiB", n / (KIB * KIB))
    } else {
        format!("{:.1} GiB", n / (KIB * KIB * KIB))
    }
}

/// A CPU share the way `ls` shows it: `0.3%`, `112.0%` (several cores).
pub fn percent(p: f64) -> String {
    format!("{p:.1}%")
}

/// One log line as `<app>-<instance> | <line>`; lines from any stream but `out` carry its name
/// (`web-0 err | …`), in red on a terminal.
pub fn log_line(log: &LogLine, output: Output) -> String {
    let source = format!("{}-{}", log.app, log.instance);
    if log.stream == "out" {
        return format!("{source} | {}", log.line);
    }
    match output {
        Output::Plain => format!("{source} {} | {}", log.stream, log.line),
        Output::Terminal => format!("{source} \x1b[31m{}\x1b[0m | {}", log.stream, log.line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shares_read_like_ls() {
        assert_eq!(bytes(900), "900 B");
        assert_eq!(bytes(300 * 1024), "300 KiB");
        assert_eq!(bytes(45 * 1024 * 1024 + 200 * 1024), "45.2 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(percent(0.24), "0.2%");
        assert_eq!(percent(112.0), "112.0%");
    }

    #[test]
    fn uptimes_read_like_pm2() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(5_999), "5s");
        assert_eq!(uptime(59_999), "59s");
        assert_eq!(uptime(60_000), "1m");
        assert_eq!(uptime(3 * 60_000 + 59_000), "3m");
        assert_eq!(uptime(2 * 3_600_000 + 1), "2h");
        assert_eq!(uptime(86_400_000 - 1), "23h");
        assert_eq!(uptime(4 * 86_400_000 + 5), "4D");
        assert_eq!(uptime(400 * 86_400_000), "400D");
    }

    #[test]
    fn log_lines_name_their_worker_and_mark_errors() {
        let mut log = LogLine {
            app: "web".into(),
            instance: 2,
            stream: "out".into(),
            line: "listening on 127.0.0.1:40001".into(),
        };
        assert_eq!(
            log_line(&log, Output::Plain),
            "web-2 | listening on 127.0.0.1:40001"
        );
        log.stream = "err".into();
        log.line = "TypeError: x is undefined".into();
        assert_eq!(
            log_line(&log, Output::Plain),
            "web-2 err | TypeError: x is undefined"
        );
        assert_eq!(
            log_line(&log, Output::Terminal),
            "web-2 \x1b[31merr\x1b[0m | TypeError: x is undefined"
        );
    }
}
