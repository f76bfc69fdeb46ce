//! `guard wrap [--server NAME] -- CMD [ARGS...]`: the agent's side of a stdio session. It
//! starts CMD (same uid, environment and working directory; stderr untouched) with pipes for
//! stdin and stdout, and relays newline-delimited JSON-RPC between the agent (its own stdin
//! and stdout) and CMD, every line decided by the daemon first (see [`super::session`]).
//!
//! Fail closed: without the daemon CMD is not started; when the daemon goes away mid-session,
//! what was waiting for a decision is answered with an error, nothing more reaches CMD (nor
//! the agent unread) until it is back, and wrap reconnects every second. Signals wrap gets
//! are passed to CMD; wrap exits as CMD did (its status, or its signal).

use std::{collections::HashMap, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::mpsc,
};

use super::proto::{self, encode, read_frame, Frame, Hello, Kind, Problem, Welcome};
use crate::mcp::{wire, RefusalKind};

/// What `guard wrap` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon's stdio socket (`paths.stdio_socket`).
    pub socket: PathBuf,
    pub server: Option<String>,
    pub command: Vec<String>,
}

/// How wrap ends: as CMD did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// CMD was killed by this signal: wrap dies of it too.
    Signal(i32),
}

/// Signals passed on to CMD.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// How often wrap tries to reach a daemon that went away.
const RECONNECT: Duration = Duration::from_secs(1);

/// Runs the session; returns how wrap should exit. Errors before CMD starts (no daemon, a
/// refused session, CMD cannot be run) are errors; CMD was not started then.
pub fn run(o: Options) -> Result<Exit> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(relay(o));
    // The agent's stdin may be read on a blocking thread that never returns: not waited for.
    rt.shutdown_background();
    out
}

/// One line read from the agent or the server.
#[derive(Debug)]
enum Line {
    Whole(Vec<u8>),
    /// Longer than allowed: not read to its end (skipped up to its newline). Its length so far.
    Over(usize),
    /// The stream ended inside a line.
    Partial(usize),
}

/// Reads lines of at most `max` bytes from `r` into `tx` until the end (blank lines skipped:
/// they carry nothing).
async fn read_lines<R: AsyncRead + Unpin>(r: R, max: usize, tx: mpsc::Sender<Line>) {
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut line = Vec::new();
    let mut skipping: Option<usize> = None;
    loop {
        let buf = match r.fill_buf().await {
            Ok(b) => b,
            Err(_) => &[][..],
        };
        if buf.is_empty() {
            let last = match skipping {
                Some(n) => Some(Line::Over(n)),
                None if !line.trim_ascii().is_empty() => Some(Line::Partial(line.len())),
                None => None,
            };
            if let Some(l) = last {
                let _ = tx.send(l).await;
            }
            return;
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        let ends = done > chunk.len();
        match &mut skipping {
            Some(n) => *n += chunk.len(),
            None if line.len() + chunk.len() > max => skipping = Some(line.len() + chunk.len()),
            None => line.extend_from_slice(chunk),
        }
        r.consume(done);
        if !ends {
            continue;
        }
        let out = match skipping.take() {
            Some(n) => Some(Line::Over(n)),
            None if line.trim_ascii().is_empty() => None,
            None => Some(Line::Whole(std::mem::take(&mut line))),
        };
        line.clear();
        if let Some(l) = out {
            if tx.send(l).await.is_err() {
                return;
            }
        }
    }
}

/// Writes each line it is given (a newline added) to `w`; ends when the channel closes, and
/// then closes `w`.
fn writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut w: W,
) -> (mpsc::UnboundedSender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let task = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(mut line) = rx.recv().await {
            buf.clear();
            line.push(b'\n');
            buf.append(&mut line);
            while let Ok(mut more) = rx.try_recv() {
                more.push(b'\n');
                buf.append(&mut more);
            }
            if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    (tx, task)
}

/// The connection to the daemon: frames out, frames in.
struct Link {
    out: mpsc::UnboundedSender<Vec<u8>>,
    frames: mpsc::UnboundedReceiver<Frame>,
    welcome: Welcome,
}

/// Connects to the daemon and says hello: the session's [`Welcome`], or why not.
async fn connect(o: &Options) -> Result<Link> {
    let stream = UnixStream::connect(&o.socket).await.map_err(|e| {
        anyhow!(
            "cannot reach the guard daemon at {}: {e}. Is it running? (`guard daemon` as root, or `systemctl start guard`)",
            o.socket.display()
        )
    })?;
    let (mut rd, mut wr) = stream.into_split();
    let hello = serde_json::to_vec(&Hello {
        v: proto::VERSION,
        server: o.server.clone(),
        command: o.command.clone(),
    })?;
    wr.write_all(&encode(Kind::Hello, 0, &hello)).await?;
    let answer = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd))
        .await
        .map_err(|_| anyhow!("the guard daemon did not answer within 30 s"))?
        .context("reading the guard daemon's answer")?;
    let welcome: Welcome = match answer {
        Some(f) if f.kind == Kind::Welcome => {
            serde_json::from_slice(&f.payload).context("the daemon's answer is not valid")?
        }
        Some(f) => bail!("the daemon answered with an unexpected {:?} frame", f.kind),
        None => bail!("the guard daemon closed the session without answering"),
    };
    if !welcome.ok {
        bail!(
            "{}",
            welcome
                .error
                .clone()
                .unwrap_or_else(|| "the daemon refused the session".into())
        );
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                break;
            }
        }
    });
    let (ftx, frames) = mpsc::unbounded_channel();
    // Buffered: a frame is one read, not one for its kind, one for the rest of its header and
    // one for its payload.
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    tokio::spawn(async move {
        while let Ok(Some(f)) = read_frame(&mut rd).await {
            if ftx.send(f).is_err() {
                break;
            }
        }
    });
    Ok(Link {
        out: tx,
        frames,
        welcome,
    })
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Agent,
    Server,
}

/// The relay's state.
struct Relay {
    link: Option<Link>,
    /// Lines sent to the daemon and not decided yet.
    pending: HashMap<u64, (From, Vec<u8>)>,
    seq: u64,
    to_agent: mpsc::UnboundedSender<Vec<u8>>,
    /// None once the server's stdin is closed (the agent's input ended), or without a server.
    to_server: Option<mpsc::UnboundedSender<Vec<u8>>>,
    agent_done: bool,
}

impl Relay {
    fn send(&mut self, from: From, line: Vec<u8>) {
        let Some(link) = &self.link else {
            self.undecided(from, &line, "the guard daemon is not reachable");
            return;
        };
        self.seq += 1;
        let kind = match from {
            From::Agent => Kind::FromAgent,
            From::Server => Kind::FromServer,
        };
        let _ = link.out.send(encode(kind, self.seq, &line));
        self.pending.insert(self.seq, (from, line));
    }

    fn problem(&mut self, from: From, what: &str, bytes: usize) {
        let Some(link) = &self.link else {
            let side = if from == From::Agent {
                "agent's"
            } else {
                "server's"
            };
            eprintln!("guard wrap: a {side} line could not be read whole ({what}, {bytes} bytes) and the daemon is not reachable: dropped");
            return;
        };
        self.seq += 1;
        let p = Problem {
            from: if from == From::Agent {
                "agent"
            } else {
                "server"
            }
            .into(),
            what: what.into(),
            bytes,
        };
        let payload = serde_json::to_vec(&p).unwrap_or_default();
        let _ = link.out.send(encode(Kind::Problem, self.seq, &payload));
        self.pending.insert(self.seq, (from, Vec::new()));
    }

    /// A line the daemon did not decide: never passed on. An agent's request gets an error
    /// (ids read leniently, only to answer them); an answer of the server becomes an error for
    /// the agent's request; anything else is dropped with a note on stderr.
    fn undecided(&mut self, from: From, line: &[u8], why: &str) {
        let v: Option<Value> = serde_json::from_slice(line).ok();
        let items: Vec<&Value> = match &v {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(m) => vec![m],
            None => Vec::new(),
        };
        let ids: Vec<Value> = items
            .iter()
            .filter(|m| match from {
                From::Agent => m.get("method").is_some(),
                From::Server => m.get("method").is_none(),
            })
            .filter_map(|m| m.get("id").filter(|id| !id.is_null()).cloned())
            .collect();
        let message = match from {
            From::Agent => format!(
                "guard: {why}, so this message was not forwarded; try again when it is back"
            ),
            From::Server => format!(
                "guard: {why}, so the server's answer could not be inspected and was not passed on"
            ),
        };
        if ids.is_empty() {
            eprintln!(
                "guard wrap: {why}: a {} line was dropped",
                match from {
                    From::Agent => "agent's",
                    From::Server => "server's",
                }
            );
        }
        for id in ids {
            let e = wire::error(&id, RefusalKind::Unreadable.code(), &message);
            let _ = self.to_agent.send(e.to_string().into_bytes());
        }
    }

    /// The daemon's word on one line.
    fn verdict(&mut self, f: Frame) {
        let Some((from, line)) = self.pending.remove(&f.seq) else {
            return;
        };
        match f.kind {
            Kind::Forward if from == From::Agent => {
                if let Some(s) = &self.to_server {
                    let _ = s.send(line);
                }
            }
            Kind::Pass if from == From::Server => {
                let _ = self.to_agent.send(line);
            }
            Kind::ToAgent => {
                let _ = self.to_agent.send(f.payload);
            }
            Kind::ToServer => {
                if let Some(s) = &self.to_server {
                    let _ = s.send(f.payload);
                }
            }
            Kind::Drop => {
                eprintln!("guard wrap: {}", String::from_utf8_lossy(&f.payload));
            }
            other => {
                // Never from a daemon of this release: not passed on.
                eprintln!("guard wrap: the daemon answered a line with {other:?}: dropped");
            }
        }
    }

    /// The daemon went away: whatever waited for it is answered (agents' requests, answers to
    /// them) or dropped, and nothing goes on until it is back.
    fn lost(&mut self) {
        self.link = None;
        eprintln!("guard wrap: lost the guard daemon; every message is refused until it is back");
        let mut waiting: Vec<(u64, (From, Vec<u8>))> = self.pending.drain().collect();
        waiting.sort_by_key(|(seq, _)| *seq);
        for (_, (from, line)) in waiting {
            self.undecided(from, &line, "the guard daemon went away before deciding");
        }
    }

    fn waiting_from(&self, from: From) -> bool {
        self.pending.values().any(|(f, _)| *f == from)
    }
}

/// Receives the forwarded signals.
fn signals() -> Result<mpsc::UnboundedReceiver<libc::c_int>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::unbounded_channel();
    for sig in FORWARDED {
        let mut s = signal(SignalKind::from_raw(sig))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

/// Starts CMD with piped stdin and stdout; it dies with wrap (a server no one relays for
/// has nothing to do).
fn spawn(command: &[String]) -> Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(false);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", command[0]))
}

async fn relay(o: Options) -> Result<Exit> {
    if o.command.is_empty() {
        bail!("guard wrap needs the server's command after --");
    }
    let shown = o.command.join(" ");
    let link = connect(&o)
        .await
        .map_err(|e| anyhow!("{e:#}\n{shown} was not started: guard wrap fails closed without the daemon's decisions"))?;
    let max_body = link.welcome.max_body.max(1);
    let start = link.welcome.start;
    let mut signals = signals()?;
    let (agent_tx, mut agent_lines) = mpsc::channel(64);
    match super::pipe::open(0) {
        Some(p) => tokio::spawn(read_lines(p, max_body, agent_tx)),
        None => tokio::spawn(read_lines(tokio::io::stdin(), max_body, agent_tx)),
    };
    let (to_agent, agent_writer) = match super::pipe::open(1) {
        Some(p) => writer(p),
        None => writer(tokio::io::stdout()),
    };
    let (mut child, to_server, mut server_lines) = match start {
        true => {
            let mut child = spawn(&o.command)?;
            let stdin = child.stdin.take().context("the server's stdin")?;
            let stdout = child.stdout.take().context("the server's stdout")?;
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(read_lines(stdout, proto::MAX_FRAME - proto::HEADER, tx));
            let (to_server, _) = writer(stdin);
            (Some(child), Some(to_server), rx)
        }
        false => {
            eprintln!(
                "guard wrap: no policy names this stdio server ({shown}) and policy.unknown_servers is \"deny\": it is not started, every request is refused"
            );
            (None, None, mpsc::channel(1).1)
        }
    };
    let mut r = Relay {
        link: Some(link),
        pending: HashMap::new(),
        seq: 0,
        to_agent,
        to_server,
        agent_done: false,
    };
    let mut server_done = child.is_none();
    let mut status: Option<std::process::ExitStatus> = None;
    let mut retry = tokio::time::interval(RECONNECT);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let connected = r.link.is_some();
        let child_running = child.is_some() && status.is_none();
        tokio::select! {
            l = agent_lines.recv(), if !r.agent_done => match l {
                Some(Line::Whole(line)) => r.send(From::Agent, line),
                Some(Line::Over(n)) => r.problem(From::Agent, "over_max", n),
                Some(Line::Partial(n)) => r.problem(From::Agent, "partial", n),
                None => r.agent_done = true,
            },
            l = server_lines.recv(), if !server_done => match l {
                Some(Line::Whole(line)) => r.send(From::Server, line),
                Some(Line::Over(n)) => r.problem(From::Server, "over_max", n),
                Some(Line::Partial(n)) => r.problem(From::Server, "partial", n),
                None => server_done = true,
            },
            f = async { r.link.as_mut().map(|l| l.frames.recv()).unwrap().await }, if connected => match f {
                Some(f) => r.verdict(f),
                None => r.lost(),
            },
            _ = retry.tick(), if !connected => {
                if let Ok(link) = connect(&o).await {
                    eprintln!("guard wrap: the guard daemon is back");
                    r.link = Some(link);
                }
            },
            s = async { child.as_mut().map(|c| c.wait()).unwrap().await }, if child_running => {
                status = Some(s.context("waiting for the server")?);
            },
            Some(sig) = signals.recv() => match &child {
                Some(c) if status.is_none() => {
                    if let Some(pid) = c.id() {
                        // SAFETY: a signal to our own child, by its pid (not reaped yet).
                        unsafe { libc::kill(pid as libc::pid_t, sig) };
                    }
                }
                _ => return Ok(Exit::Signal(sig)),
            },
        }
        // The agent is done and everything it sent is decided: the server's input ends.
        if r.agent_done && !r.waiting_from(From::Agent) {
            r.to_server = None;
        }
        let server_finished = match &child {
            Some(_) => status.is_some() && server_done && !r.waiting_from(From::Server),
            None => r.agent_done && !r.waiting_from(From::Agent),
        };
        if server_finished {
            break;
        }
    }
    drop(r);
    let _ = agent_writer.await;
    Ok(match status {
        Some(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            match (s.code(), s.signal()) {
                (Some(c), _) => Exit::Code(c),
                (None, Some(sig)) => Exit::Signal(sig),
                _ => Exit::Code(1),
            }
        }
        None => Exit::Code(0),
    })
}
