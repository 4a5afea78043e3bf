//! `monit`'s keys: terminal key events turned into the few keys the model knows, so the model
//! never sees crossterm, and the key help the footer shows.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// A key the dashboard acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// Ctrl-C: quits, even on the confirmation line.
    Interrupt,
    /// Esc: cancels a confirmation, else quits.
    Esc,
    /// Tab: the next pane.
    Tab,
    /// Shift-Tab: the previous pane.
    BackTab,
    /// Up arrow.
    Up,
    /// Down arrow.
    Down,
    /// Page up.
    PageUp,
    /// Page down.
    PageDown,
    /// Home.
    Home,
    /// End.
    End,
    /// A printable character (`q`, `r`, `+`, `-`, `s`, `y`, `n`, …).
    Char(char),
}

/// The key an event is, if the dashboard knows it. Releases and repeats of the kitty protocol
/// are ignored, so one press is one action.
pub fn from_event(event: &KeyEvent) -> Option<Key> {
    if event.kind == KeyEventKind::Release {
        return None;
    }
    let ctrl = event.modifiers.contains(KeyModifiers::CONTROL);
    Some(match event.code {
        KeyCode::Char('c') if ctrl => Key::Interrupt,
        KeyCode::Char(_) if ctrl => return None,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab => Key::Tab,
        KeyCode::BackTab => Key::BackTab,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        _ => return None,
    })
}

/// The footer's key help, longest first: the draw code takes the first that fits.
pub const HELP: [&str; 3] = [
    "↑↓ select  tab pane  r reload  +/- scale  s stop/start  q quit",
    "↑↓ tab  r reload  +/- scale  s stop/start  q quit",
    "r +/- s  q quit",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_c_interrupts_and_other_controls_are_ignored() {
        let ctrl = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL);
        assert_eq!(from_event(&ctrl('c')), Some(Key::Interrupt));
        assert_eq!(from_event(&ctrl('r')), None);
        let plain = KeyEvent::new(KeyCode::Char('+'), KeyModifiers::SHIFT);
        assert_eq!(from_event(&plain), Some(Key::Char('+')));
        let mut release = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(from_event(&release), None);
        assert_eq!(
            from_event(&KeyEvent::new(KeyCode::BackTab, KeyModifiers::SHIFT)),
            Some(Key::BackTab)
        );
    }
}
