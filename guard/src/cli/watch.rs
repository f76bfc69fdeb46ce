//! `guard approvals watch`: the held calls in a terminal view (ratatui), refreshed every second;
//! arrow keys choose a call, `a` approves it, `d` denies it with a reason, `f` approves it and
//! identical calls for a duration, `q` leaves. What to do with a key is [`App::key`], pure; the
//! terminal and the control socket stay around it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState, Wrap},
    Frame,
};
use serde_json::Value;

use crate::daemon::control::{self, Request};

/// What a key asks the daemon for.
#[derive(Debug, PartialEq)]
pub enum Action {
    Approve { id: String, for_s: Option<u64> },
    Deny { id: String, reason: Option<String> },
    Quit,
}

#[derive(Debug, PartialEq)]
enum Prompt {
    None,
    /// Typing a reason to deny `id`.
    Reason(String),
    /// Typing how long identical calls of `id` pass.
    Duration(String),
}

/// The view's state: the held calls (as `approvals list` gives them), the selection, a prompt.
pub struct App {
    held: Vec<Value>,
    selected: usize,
    prompt: Prompt,
    input: String,
    /// The chosen call went away: nothing is chosen until a move.
    lost: bool,
    pub message: String,
}

fn text(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => clean(s),
        Some(Value::Null) | None => "-".into(),
        Some(x) => clean(&x.to_string()),
    }
}

/// Agent-chosen text without control characters: an escape sequence in a tool name or an
/// argument must not reach the approver's terminal, nor a bidi override reorder what it shows.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || crate::daemon::misleading(c) {
                '·'
            } else {
                c
            }
        })
        .collect()
}

impl App {
    pub fn new(held: Vec<Value>) -> App {
        App {
            held,
            selected: 0,
            prompt: Prompt::None,
            input: String::new(),
            lost: false,
            message: String::new(),
        }
    }

    /// New list from the daemon; the selection follows the call it was on.
    /// When the chosen call is gone (answered, timed out) and others wait, nothing is chosen
    /// until the approver moves: a key pressed just then never answers a call they were not
    /// looking at.
    pub fn set_held(&mut self, held: Vec<Value>) {
        let current = self.selected_id();
        self.held = held;
        if let Some(id) = current {
            match self.held.iter().position(|h| text(h, "id") == id) {
                Some(i) => self.selected = i,
                None if !self.held.is_empty() => {
                    self.lost = true;
                    self.message = format!("call {id} is no longer waiting; choose again");
                }
                None => {}
            }
        }
        if self.held.is_empty() {
            // The screen says nothing waits: whatever comes next is seen arriving.
            self.lost = false;
        }
        self.selected = self.selected.min(self.held.len().saturating_sub(1));
    }

    fn selected_id(&self) -> Option<String> {
        if self.lost {
            return None;
        }
        self.held.get(self.selected).map(|h| text(h, "id"))
    }

    /// One key: moves, opens or edits a prompt, or asks for an action.
    pub fn key(&mut self, code: KeyCode, ctrl: bool) -> Option<Action> {
        if ctrl && code == KeyCode::Char('c') {
            return Some(Action::Quit);
        }
        if self.prompt != Prompt::None {
            match code {
                KeyCode::Esc => {
                    self.prompt = Prompt::None;
                    self.input.clear();
                    self.message = "cancelled".into();
                }
                KeyCode::Backspace => {
                    self.input.pop();
                }
                KeyCode::Enter => {
                    let input = std::mem::take(&mut self.input);
                    match std::mem::replace(&mut self.prompt, Prompt::None) {
                        Prompt::Reason(id) => {
                            let reason = (!input.trim().is_empty()).then(|| input.trim().into());
                            return Some(Action::Deny { id, reason });
                        }
                        Prompt::Duration(id) => {
                            let d = if input.trim().is_empty() {
                                "10m"
                            } else {
                                input.trim()
                            };
                            match crate::mcp::approvals::parse_duration(d) {
                                Ok(d) => {
                                    return Some(Action::Approve {
                                        id,
                                        for_s: Some(d.as_secs()),
                                    })
                                }
                                Err(e) => {
                                    self.message = format!("{e:#}");
                                    self.prompt = Prompt::Duration(id);
                                    self.input = input;
                                }
                            }
                        }
                        Prompt::None => {}
                    }
                }
                KeyCode::Char(c) if self.input.chars().count() < 200 => self.input.push(c),
                _ => {}
            }
            return None;
        }
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return Some(Action::Quit),
            KeyCode::Up | KeyCode::Char('k') if self.lost => self.lost = false,
            KeyCode::Down | KeyCode::Char('j') if self.lost => self.lost = false,
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(self.held.len().saturating_sub(1))
            }
            KeyCode::Char('a') => {
                return self
                    .selected_id()
                    .map(|id| Action::Approve { id, for_s: None })
            }
            KeyCode::Char('d') => {
                if let Some(id) = self.selected_id() {
                    self.prompt = Prompt::Reason(id);
                }
            }
            KeyCode::Char('f') => {
                if let Some(id) = self.selected_id() {
                    self.prompt = Prompt::Duration(id);
                }
            }
            _ => {}
        }
        None
    }

    fn draw(&self, f: &mut Frame) {
        let [top, table, detail, bottom] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(5),
            Constraint::Length(8),
            Constraint::Length(2),
        ])
        .areas(f.area());
        f.render_widget(
            Paragraph::new(format!(
                "guard approvals watch: {} waiting   ↑/↓ choose  a approve  d deny  f approve for a time  q quit",
                self.held.len()
            )),
            top,
        );
        let rows = self.held.iter().map(|h| {
            let args = h
                .get("arguments")
                .map(|a| clean(&a.to_string()))
                .unwrap_or_default();
            Row::new(vec![
                Cell::from(text(h, "id")),
                Cell::from(text(h, "agent")),
                Cell::from(text(h, "uid")),
                Cell::from(text(h, "server")),
                Cell::from(text(h, "tool")),
                Cell::from(format!("{}s", text(h, "remaining_s"))),
                Cell::from(args),
            ])
        });
        let widths = [
            Constraint::Length(6),
            Constraint::Length(16),
            Constraint::Length(7),
            Constraint::Length(16),
            Constraint::Length(20),
            Constraint::Length(6),
            Constraint::Min(10),
        ];
        let t = Table::new(rows, widths)
            .header(
                Row::new(["ID", "AGENT", "UID", "SERVER", "TOOL", "LEFT", "ARGUMENTS"])
                    .style(Style::new().add_modifier(Modifier::BOLD)),
            )
            .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
            .highlight_symbol("> ")
            .block(Block::new().borders(Borders::TOP | Borders::BOTTOM));
        let mut state = TableState::default();
        if !self.held.is_empty() && !self.lost {
            state.select(Some(self.selected));
        }
        f.render_stateful_widget(t, table, &mut state);
        let detail_text = match self.held.get(self.selected) {
            Some(h) => clean_lines(
                &serde_json::to_string_pretty(h.get("arguments").unwrap_or(&Value::Null))
                    .unwrap_or_default(),
            ),
            None => vec![Line::from("no calls are waiting for approval")],
        };
        f.render_widget(
            Paragraph::new(detail_text)
                .wrap(Wrap { trim: false })
                .block(Block::new().title("arguments").borders(Borders::BOTTOM)),
            detail,
        );
        let line = match &self.prompt {
            Prompt::Reason(id) => format!("deny {id}, reason (Enter, Esc cancels): {}", self.input),
            Prompt::Duration(id) => format!(
                "approve {id} and identical calls for (90s, 10m, 1h; Enter = 10m): {}",
                self.input
            ),
            Prompt::None => self.message.clone(),
        };
        f.render_widget(Paragraph::new(line), bottom);
    }
}

fn clean_lines(s: &str) -> Vec<Line<'static>> {
    s.lines().map(|l| Line::from(clean(l))).collect()
}

fn list(socket: &Path) -> Result<Vec<Value>> {
    let v = control::call(socket, Request::ApprovalsList)?;
    Ok(v.get("held")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

pub(super) fn watch(socket: &Path) -> Result<()> {
    // Asked before the terminal is taken: no daemon, or no right to list, is a plain error.
    let mut app = App::new(list(socket)?);
    let mut terminal = ratatui::init();
    let result = run(&mut terminal, socket, &mut app);
    ratatui::restore();
    result
}

fn run(terminal: &mut ratatui::DefaultTerminal, socket: &Path, app: &mut App) -> Result<()> {
    let mut refreshed = Instant::now();
    loop {
        terminal.draw(|f| app.draw(f))?;
        if event::poll(Duration::from_millis(250))? {
            if let Event::Key(k) = event::read()? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
                match app.key(k.code, ctrl) {
                    Some(Action::Quit) => return Ok(()),
                    Some(Action::Approve { id, for_s }) => {
                        app.message = match control::call(
                            socket,
                            Request::Approve {
                                id: id.clone(),
                                for_s,
                            },
                        ) {
                            Ok(_) => match for_s {
                                Some(s) => format!("approved {id}; identical calls pass for {s} s"),
                                None => format!("approved {id}"),
                            },
                            Err(e) => format!("approving {id}: {e:#}"),
                        };
                        refreshed = Instant::now() - Duration::from_secs(2);
                    }
                    Some(Action::Deny { id, reason }) => {
                        app.message = match control::call(
                            socket,
                            Request::Deny {
                                id: id.clone(),
                                reason,
                            },
                        ) {
                            Ok(_) => format!("denied {id}"),
                            Err(e) => format!("denying {id}: {e:#}"),
                        };
                        refreshed = Instant::now() - Duration::from_secs(2);
                    }
                    None => {}
                }
            }
        }
        if refreshed.elapsed() >= Duration::from_secs(1) {
            match list(socket) {
                Ok(h) => app.set_held(h),
                Err(e) => app.message = format!("the daemon: {e:#}"),
            }
            refreshed = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app() -> App {
        App::new(vec![
            json!({"id": "1", "agent": "a", "tool": "t1", "arguments": {}}),
            json!({"id": "2", "agent": "b", "tool": "t2\u{1b}[2J", "arguments": {}}),
        ])
    }

    #[test]
    fn keys_choose_and_answer_calls() {
        let mut a = app();
        assert_eq!(
            a.key(KeyCode::Char('a'), false),
            Some(Action::Approve {
                id: "1".into(),
                for_s: None
            })
        );
        a.key(KeyCode::Down, false);
        a.key(KeyCode::Down, false);
        assert_eq!(a.selected, 1, "stops at the last call");
        assert_eq!(a.key(KeyCode::Char('d'), false), None);
        for c in "no".chars() {
            assert_eq!(a.key(KeyCode::Char(c), false), None, "typing, not commands");
        }
        assert_eq!(
            a.key(KeyCode::Enter, false),
            Some(Action::Deny {
                id: "2".into(),
                reason: Some("no".into())
            })
        );
        a.key(KeyCode::Char('f'), false);
        for c in "1h".chars() {
            a.key(KeyCode::Char(c), false);
        }
        assert_eq!(
            a.key(KeyCode::Enter, false),
            Some(Action::Approve {
                id: "2".into(),
                for_s: Some(3600)
            })
        );
        a.key(KeyCode::Char('f'), false);
        a.key(KeyCode::Char('x'), false);
        assert_eq!(a.key(KeyCode::Enter, false), None, "a bad duration is said");
        assert!(!a.message.is_empty());
        a.key(KeyCode::Esc, false);
        assert_eq!(a.key(KeyCode::Char('q'), false), Some(Action::Quit));
    }

    #[test]
    fn the_selection_follows_its_call_and_text_is_cleaned() {
        let mut a = app();
        a.key(KeyCode::Down, false);
        a.set_held(vec![json!({"id": "2", "tool": "t2"})]);
        assert_eq!(a.selected_id().as_deref(), Some("2"));
        // The chosen call goes; another arrives: `a` answers nothing until the approver moves.
        a.set_held(vec![json!({"id": "3", "tool": "t3"})]);
        assert_eq!(a.key(KeyCode::Char('a'), false), None);
        a.key(KeyCode::Down, false);
        assert_eq!(a.selected_id().as_deref(), Some("3"));
        a.set_held(vec![]);
        assert_eq!(a.key(KeyCode::Char('a'), false), None);
        assert!(!clean("t2\u{1b}[2J").contains('\u{1b}'));
        assert!(!clean("abc\u{202e}fed").contains('\u{202e}'));
    }
}
