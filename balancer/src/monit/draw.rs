//! `monit`'s frames: the [`Model`] drawn into a ratatui [`Frame`], and nothing else (no state,
//! no I/O), so a frame is a snapshot test on a `TestBackend`.
//!
//! 80×24 holds all four panes and the chart. Smaller terminals lose panes in order of need
//! (the chart and the metrics/info row first, the logs last), and below [`MIN_WIDTH`]×
//! [`MIN_HEIGHT`] only a notice is drawn: every layout is cut to fit, never wrapped over
//! another pane.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Cell, Paragraph, Row as TableRow, Sparkline, Table, TableState, Wrap,
};

use super::keys::HELP;
use super::state::{Model, Pane};
use crate::protocol::{AppSnapshot, WorkerSnapshot};
use crate::ui;

/// Below this width only a notice is drawn.
pub const MIN_WIDTH: u16 = 40;
/// Below this height only a notice is drawn.
pub const MIN_HEIGHT: u16 = 10;
/// From this size up (80×24 included) every pane is drawn.
const FULL: (u16, u16) = (60, 20);

/// Draws the whole dashboard.
pub fn draw(frame: &mut Frame, model: &Model) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let notice = format!(
            "terminal too small for monit ({}×{}, needs {MIN_WIDTH}×{MIN_HEIGHT}); q quits",
            area.width, area.height
        );
        frame.render_widget(Paragraph::new(notice).wrap(Wrap { trim: true }), area);
        return;
    }
    // The footer is one line whatever the size: it carries the confirmation, which must never
    // be cut away while an action waits for its `y`.
    let [body, footer] = Layout::vertical([Constraint::Fill(1), Constraint::Length(1)]).areas(area);
    if area.width >= FULL.0 && area.height >= FULL.1 {
        // At 24 rows: 9 for the list and logs (7 workers visible), 8 for metrics and info (their
        // 6 lines exactly), 6 for the chart. Taller terminals give the extra to the list.
        let (middle, chart) = if area.height >= 34 { (12, 9) } else { (8, 6) };
        let [top, mid, bottom] = Layout::vertical([
            Constraint::Fill(1),
            Constraint::Length(middle),
            Constraint::Length(chart),
        ])
        .areas(body);
        let columns = [Constraint::Percentage(55), Constraint::Percentage(45)];
        let [list, logs] = Layout::horizontal(columns).areas(top);
        let [metrics, info] = Layout::horizontal(columns).areas(mid);
        draw_list(frame, model, list);
        draw_logs(frame, model, logs);
        draw_metrics(frame, model, metrics);
        draw_info(frame, model, info);
        draw_chart(frame, model, bottom);
    } else {
        let [list, logs] = Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(body);
        draw_list(frame, model, list);
        draw_logs(frame, model, logs);
    }
    draw_footer(frame, model, footer);
}

fn pane(title: String, focused: bool) -> Block<'static> {
    let style = if focused {
        Style::new().fg(Color::Cyan)
    } else {
        Style::new()
    };
    Block::bordered().title(title).border_style(style)
}

/// The process list: one row per worker, with cpu, memory and a cpu sparkline.
fn draw_list(frame: &mut Frame, model: &Model, area: Rect) {
    let block = pane(" Processes ".into(), model.focus == Pane::List);
    let inner = block.inner(area);
    // name, status, cpu, mem: fixed, so columns line up from frame to frame; the sparkline
    // takes what is left, and is cut to that width here (a table would cut its newest end).
    const FIXED: [u16; 4] = [9, 8, 6, 8];
    // Highlight symbol, the fixed columns and their spacing.
    let used = 2 + FIXED.iter().sum::<u16>() + FIXED.len() as u16;
    let spark = usize::from(inner.width.saturating_sub(used));
    let rows: Vec<TableRow> = model
        .rows()
        .iter()
        .map(|row| {
            let app = &model.apps[row.app];
            let Some(w) = row.worker.map(|w| &app.workers[w]) else {
                return TableRow::new(vec![Cell::from(app.name.clone()), Cell::from("0 workers")]);
            };
            let cpu = model
                .history
                .get(&w.info.id)
                .map(|h| sparkline(h.cpu.iter().copied(), spark))
                .unwrap_or_default();
            TableRow::new(vec![
                Cell::from(format!("{}-{}", w.info.app, w.info.instance)),
                Cell::from(short_status(&w.info.status)).style(status_style(&w.info.status)),
                Cell::from(w.info.cpu.map(ui::percent).unwrap_or_else(|| "-".into())),
                Cell::from(w.info.memory.map(ui::bytes).unwrap_or_else(|| "-".into())),
                Cell::from(cpu).style(Style::new().fg(Color::Green)),
            ])
        })
        .collect();
    let widths = FIXED
        .iter()
        .map(|&w| Constraint::Length(w))
        .chain([Constraint::Fill(1)]);
    let header = TableRow::new(["name", "status", "cpu", "mem", "trend"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    // The table's own state scrolls the selection into view when there are more workers
    // than rows; it is rebuilt each frame because the model, not the widget, owns selection.
    let mut state = TableState::default()
        .with_selected((!model.apps.is_empty()).then_some(model.selected_index()));
    frame.render_stateful_widget(table, area, &mut state);
}

/// `ls`'s statuses in 8 columns.
fn short_status(status: &str) -> &str {
    match status {
        "waiting-restart" => "waiting",
        "unhealthy" => "unhealty",
        other => other,
    }
}

fn status_style(status: &str) -> Style {
    match status {
        "ready" => Style::new().fg(Color::Green),
        "errored" | "unhealthy" => Style::new().fg(Color::Red),
        "stopped" => Style::new().fg(Color::DarkGray),
        _ => Style::new().fg(Color::Yellow),
    }
}

/// The last `width` values as block characters, scaled to their own peak so a worker at 20%
/// still shows its shape; the scale never goes below 10%, so an idle worker reads low.
fn sparkline(values: impl DoubleEndedIterator<Item = f64>, width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let mut last: Vec<f64> = values.rev().take(width).collect();
    last.reverse();
    let peak = last.iter().copied().fold(10.0, f64::max);
    last.iter()
        .map(|v| {
            let level = (v / peak * (BARS.len() - 1) as f64).round();
            BARS[(level.max(0.0) as usize).min(BARS.len() - 1)]
        })
        .collect()
}

/// The followed app's merged logs, newest at the bottom; arrows scroll back.
fn draw_logs(frame: &mut Frame, model: &Model, area: Rect) {
    let mut title = match &model.logs_app {
        Some(app) => format!(" Logs {app} "),
        None => " Logs ".into(),
    };
    if model.log_scroll > 0 {
        title.push_str(&format!("(-{}) ", model.log_scroll));
    }
    if model.logs_dropped > 0 {
        title.push_str(&format!("({} skipped) ", model.logs_dropped));
    }
    let block = pane(title, model.focus == Pane::Logs);
    let height = usize::from(block.inner(area).height);
    let end = model.logs.len().saturating_sub(model.log_scroll);
    let start = end.saturating_sub(height);
    let lines: Vec<Line> = model
        .logs
        .range(start..end)
        .map(|log| {
            let source = format!("{}-{} ", log.app, log.instance);
            let mut spans = vec![Span::styled(source, Style::new().fg(Color::Blue))];
            if log.stream != "out" {
                spans.push(Span::styled(
                    format!("{} ", log.stream),
                    Style::new().fg(Color::Red),
                ));
            }
            spans.push(Span::raw(log.line.clone()));
            Line::from(spans)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// The selected worker's figures: rates from the last two snapshots, then its state.
fn draw_metrics(frame: &mut Frame, model: &Model, area: Rect) {
    let worker = model.selected_worker();
    let title = worker.map_or(" Metrics ".into(), |w| {
        format!(" Metrics {}-{} ", w.info.app, w.info.instance)
    });
    let block = pane(title, model.focus == Pane::Metrics);
    let Some(w) = worker else {
        frame.render_widget(Paragraph::new("no worker selected").block(block), area);
        return;
    };
    let history = model.history.get(&w.info.id);
    let rate = |f: fn(&super::state::WorkerHistory) -> f64| history.map_or(0.0, f);
    let lines = vec![
        field("conns/s", format!("{:.1}", rate(|h| h.connections_rate))),
        field("live", w.info.connections.to_string()),
        field(
            "bytes/s",
            // Only the TCP proxy counts bytes per worker (HTTP bodies stream uncounted).
            if model
                .selected_app()
                .is_some_and(|a| a.listeners.iter().any(|l| l.starts_with("tcp://")))
            {
                ui::bytes(rate(|h| h.bytes_rate).round() as u64)
            } else {
                "- (tcp:// only)".into()
            },
        ),
        field("restarts", restarts(w)),
        field(
            "memory",
            w.info.memory.map(ui::bytes).unwrap_or_else(|| "-".into()),
        ),
        field(
            "pid",
            match (w.info.pid, w.info.uptime_ms) {
                (Some(pid), Some(up)) => format!("{pid}, up {}", ui::uptime(up)),
                (Some(pid), None) => pid.to_string(),
                _ => format!("- ({})", w.info.status),
            },
        ),
    ];
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn restarts(w: &WorkerSnapshot) -> String {
    let by = &w.info.restarts_by;
    let parts: Vec<String> = [
        ("crash", by.crash),
        ("memory", by.memory),
        ("reload", by.reload),
        ("restart", by.restart),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(reason, n)| format!("{reason} {n}"))
    .collect();
    if parts.is_empty() {
        w.info.restarts.to_string()
    } else {
        format!("{} ({})", w.info.restarts, parts.join(", "))
    }
}

fn field(name: &str, value: String) -> Line<'static> {
    Line::from(vec![
        Span::styled(format!("{name:<9}"), Style::new().fg(Color::DarkGray)),
        Span::raw(value),
    ])
}

/// The selected app: policy, listeners, the program and its main settings, last exits.
fn draw_info(frame: &mut Frame, model: &Model, area: Rect) {
    let app = model.selected_app();
    let title = app.map_or(" App ".into(), |a| format!(" App {} ", a.name));
    let block = pane(title, model.focus == Pane::Info);
    let Some(app) = app else {
        frame.render_widget(Paragraph::new("no app").block(block), area);
        return;
    };
    let lines = info_lines(app);
    let most = lines
        .len()
        .saturating_sub(usize::from(block.inner(area).height));
    let scroll = u16::try_from(model.info_scroll.min(most)).unwrap_or(u16::MAX);
    frame.render_widget(Paragraph::new(lines).block(block).scroll((scroll, 0)), area);
}

/// The info pane's lines, read from the resolved config `show` also prints (JSON), so a key
/// added to the config needs no change here unless the pane should show it.
fn info_lines(app: &AppSnapshot) -> Vec<Line<'static>> {
    let config = &app.config;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let ready = app
        .workers
        .iter()
        .filter(|w| w.info.status == "ready")
        .count();
    let mut program = text(&config["program"]);
    if let Some(args) = config["args"].as_array() {
        for arg in args {
            program.push(' ');
            program.push_str(&text(arg));
        }
    }
    let health = &config["health"];
    let mut health_text = text(&health["check"]);
    if let Some(path) = health["path"].as_str() {
        health_text.push(' ');
        health_text.push_str(path);
    }
    let memory = config["max_memory_restart"]
        .as_u64()
        .map_or("-".into(), ui::bytes);
    let mut lines = vec![
        field(
            "policy",
            format!(
                "{} {}, {ready}/{} ready",
                app.policy, app.balance, app.instances
            ),
        ),
        field(
            "listen",
            if app.listeners.is_empty() {
                "-".into()
            } else {
                app.listeners.join(" ")
            },
        ),
        field("program", program),
        field("health", health_text),
        field("mem max", memory),
    ];
    // The last exit of each worker that had one, the first on the `exits` line itself.
    let exits: Vec<String> = app
        .workers
        .iter()
        .filter_map(|w| {
            let why = w.info.last_restart.as_ref().or(w.info.last_exit.as_ref())?;
            Some(format!("{}-{}: {why}", w.info.app, w.info.instance))
        })
        .collect();
    let mut exits = exits.into_iter();
    lines.push(field(
        "exits",
        exits.next().unwrap_or_else(|| "none".into()),
    ));
    lines.extend(exits.map(|exit| Line::from(format!("{:9}{exit}", ""))));
    lines
}

/// The selected app's connections (requests, with an `http://` listener) per second.
fn draw_chart(frame: &mut Frame, model: &Model, area: Rect) {
    let Some(app) = model.selected_app() else {
        frame.render_widget(pane(" Rate ".into(), false), area);
        return;
    };
    let unit = if app.listeners.iter().any(|l| l.starts_with("http://")) {
        "req/s"
    } else {
        "conn/s"
    };
    let points = model.app_rate.get(&app.name);
    // Only the newest points that fit: ratatui's sparkline draws from the oldest and would cut
    // the present off the right edge.
    let width = usize::from(area.width.saturating_sub(2));
    let data: Vec<u64> = points
        .map(|p| p.iter().rev().take(width).rev().copied().collect())
        .unwrap_or_default();
    let now = data.last().copied().unwrap_or(0);
    let peak = data.iter().copied().max().unwrap_or(0);
    let title = format!(" {} {unit}: now {now}, peak {peak} ", app.name);
    let chart = Sparkline::default()
        .block(pane(title, false))
        .data(&data)
        .style(Style::new().fg(Color::Cyan));
    frame.render_widget(chart, area);
}

/// The confirmation line, else what is being waited for or the last outcome, else key help.
fn draw_footer(frame: &mut Frame, model: &Model, area: Rect) {
    let line = if let Some(confirm) = &model.confirm {
        Line::from(vec![
            Span::styled(
                format!("{} ", confirm.prompt),
                Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            ),
            Span::raw("y/n"),
        ])
    } else if let Some(busy) = &model.busy {
        Line::from(format!("{busy}…"))
    } else if let Some(status) = &model.status {
        Line::from(status.clone())
    } else {
        let width = usize::from(area.width);
        let help = HELP
            .iter()
            .find(|h| h.chars().count() <= width)
            .unwrap_or(&HELP[HELP.len() - 1]);
        Line::styled(*help, Style::new().fg(Color::DarkGray))
    };
    frame.render_widget(Paragraph::new(line), area);
}

#[cfg(test)]
mod tests {
    use super::super::keys::Key;
    use super::super::state::tests::{app, frame, worker};
    use super::*;
    use crate::protocol::{LogLine, Snapshot};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn render(model: &Model, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, model)).unwrap();
        terminal.backend().to_string()
    }

    fn log(instance: u32, stream: &str, line: &str) -> LogLine {
        LogLine {
            app: "web".into(),
            instance,
            stream: stream.into(),
            line: line.into(),
        }
    }

    /// Two apps seen over four snapshots a second apart, with web's logs.
    fn fixture() -> Model {
        let mut model = Model::new();
        for (second, conns) in [(0u64, 0u64), (1, 12), (2, 40), (3, 52)] {
            let mut web = app(
                "web",
                vec![worker("web", 0, 0, conns), worker("web", 1, 1, conns / 2)],
            );
            web.workers[1].info.restarts = 1;
            web.workers[1].info.restarts_by.crash = 1;
            web.workers[1].info.last_exit = Some("exit code 1".into());
            web.workers[0].info.cpu = Some([0.5, 3.0, 7.5, 2.0][second as usize]);
            let mut api = app("api", vec![worker("api", 2, 0, 0)]);
            api.listeners = vec!["tcp://127.0.0.1:9000".into()];
            let mut snapshot: Snapshot = frame(second * 1000, vec![web, api]);
            if second == 3 {
                snapshot.logs = vec![
                    log(0, "out", "listening on 127.0.0.1:40001"),
                    log(1, "out", "GET / 200"),
                    log(1, "err", "warning: slow request"),
                ];
            }
            model.on_snapshot(snapshot);
        }
        model
    }

    #[test]
    fn the_dashboard_at_80x24() {
        insta::assert_snapshot!(render(&fixture(), 80, 24));
    }

    #[test]
    fn the_list_with_the_second_app_selected() {
        let mut model = fixture();
        model.on_key(Key::Down);
        model.on_key(Key::Down);
        insta::assert_snapshot!(render(&model, 80, 24));
    }

    #[test]
    fn the_logs_pane_scrolled_back() {
        let mut model = fixture();
        model.on_key(Key::Tab);
        model.on_key(Key::Up);
        insta::assert_snapshot!(render(&model, 100, 30));
    }

    #[test]
    fn a_scale_asks_then_shows_its_outcome_and_the_new_worker() {
        let mut model = fixture();
        model.on_key(Key::Char('+'));
        insta::assert_snapshot!("scale_confirm", render(&model, 80, 24));
        model.on_key(Key::Char('y'));
        model.on_reply(Ok(crate::protocol::Reply::done(
            "scaled web from 2 to 3: all ready",
        )));
        let mut web = app(
            "web",
            vec![
                worker("web", 0, 0, 60),
                worker("web", 1, 1, 30),
                worker("web", 3, 2, 0),
            ],
        );
        web.workers[2].info.status = "starting".into();
        web.workers[2].info.cpu = None;
        web.workers[2].info.memory = None;
        model.on_snapshot(frame(
            4000,
            vec![web, app("api", vec![worker("api", 2, 0, 0)])],
        ));
        insta::assert_snapshot!("scale_done", render(&model, 80, 24));
    }

    #[test]
    fn small_terminals_lose_panes_then_show_a_notice() {
        let model = fixture();
        insta::assert_snapshot!("compact_50x14", render(&model, 50, 14));
        let tiny = render(&model, 30, 6);
        assert!(tiny.contains("terminal too small"), "{tiny}");
        // Nothing is drawn outside the terminal, at any size.
        for (w, h) in [(1, 1), (39, 9), (40, 10), (59, 19), (60, 20), (200, 60)] {
            render(&model, w, h);
        }
        render(&Model::new(), 80, 24);
    }

    #[test]
    fn sparklines_scale_to_their_peak_and_keep_the_newest() {
        assert_eq!(sparkline([0.0, 50.0, 100.0].into_iter(), 3), "▁▅█");
        assert_eq!(sparkline([9.0, 0.0, 20.0].into_iter(), 2), "▁█");
        assert_eq!(sparkline([1.0, 1.0].into_iter(), 2), "▂▂", "idle reads low");
        assert_eq!(sparkline(std::iter::empty(), 5), "");
    }
}
