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
