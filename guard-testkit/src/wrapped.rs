//! `guard wrap` driven line by line, as an agent drives a stdio MCP server: each line written
//! to its stdin, each line it writes read back as JSON.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

pub struct Wrapped {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
}

impl Wrapped {
    /// Starts `argv` (a `guard wrap` command line) with piped stdin and stdout.
    pub fn start(argv: &[String]) -> Wrapped {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        Wrapped::spawn(cmd)
    }

    /// Starts `cmd` (e.g. `guard exec ... -- guard wrap ...`) with piped stdin and stdout.
    pub fn spawn(mut cmd: Command) -> Wrapped {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("guard wrap wrote a line that is not JSON ({e}): {line}")
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Wrapped {
            child,
            stdin: Some(stdin),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, line: &str) {
        self.write_raw(line.as_bytes());
        self.write_raw(b"\n");
    }

    /// Writes bytes as they are (a partial line, say).
    pub fn write_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Closes guard wrap's stdin (the agent's end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for guard wrap to end (at most `wait`).
    pub fn wait_exit(&mut self, wait: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < wait, "guard wrap did not end within {wait:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The next line guard wrap writes (20 s at most).
    pub fn next(&self) -> Value {
        self.next_within(Duration::from_secs(20))
            .expect("an answer from guard wrap")
    }

    pub fn next_within(&self, wait: Duration) -> Option<Value> {
        self.lines.recv_timeout(wait).ok()
    }

    /// Sends `initialize` and `notifications/initialized`.
    pub fn initialize(&mut self) {
        self.send(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#);
        let answer = self.next();
        assert!(answer["result"]["serverInfo"].is_object(), "{answer}");
        self.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    }

    /// Sends a `tools/call` without waiting for its answer.
    pub fn send_call(&mut self, id: u64, tool: &str, args: Value) {
        let m = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                       "params": {"name": tool, "arguments": args}});
        self.send(&m.to_string());
    }

    pub fn call(&mut self, id: u64, tool: &str, args: Value) -> Value {
        self.send_call(id, tool, args);
        self.next()
    }
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
