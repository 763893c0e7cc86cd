//! The real agent binary for a target, and a session client that talks to it.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use tether_protocol::{
    Body, ErrorInfo, Frame, Hello, IncomingConnection, Pong, PortSubscribe, PortUnsubscribe,
    Request, Response, StreamData, StreamEnd, SubscriptionMode, request, response,
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
};

/// A running agent (guard and worker processes); stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    pub addr: SocketAddr,
    pub worker_pid: u32,
    /// The tag naming this agent's rules (`<guard pid>_<start time>`).
    pub owner: String,
    pub token: String,
    _token_file: tempfile::NamedTempFile,
}

impl AgentProcess {
    /// Starts `binary` (the `tether-agent` executable) for `target`, waiting for its readiness line.
    pub fn start(binary: &Path, target: &str, extra_args: &[&str]) -> AgentProcess {
        AgentProcess::start_with_env(binary, target, extra_args, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables for the agent.
    pub fn start_with_env(
        binary: &Path,
        target: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        AgentProcess::spawn(Command::new(binary), Some(target), extra_args, env)
    }

    /// Starts `binary` with no target: it works in its own namespace.
    pub fn start_untargeted(binary: &Path, extra_args: &[&str]) -> AgentProcess {
        AgentProcess::spawn(Command::new(binary), None, extra_args, &[])
    }

    /// The agent as the `tether` binary runs it (`tether agent …`), as a user would start one
    /// for `tether exec --agent-addr`.
    pub fn start_tether(tether: &Path, target: &str, extra_args: &[&str]) -> AgentProcess {
        let mut command = Command::new(tether);
        command.arg("agent");
        AgentProcess::spawn(command, Some(target), extra_args, &[])
    }

    fn spawn(
        mut command: Command,
        target: Option<&str>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let token = format!("{:032x}", rand_u128());
        let mut token_file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut token_file, token.as_bytes()).unwrap();
        if let Some(target) = target {
            command.args(["--target", target]);
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--token-file"])
            .arg(token_file.path())
            .args(extra_args)
            // Quiet unless the test run asks for the agent's logs.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the agent {command:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let ready: serde_like::Ready = serde_like::parse(&line)
            .unwrap_or_else(|| panic!("the agent did not report readiness; it printed {line:?}"));
        AgentProcess {
            child,
            addr: ready.addr,
            worker_pid: ready.worker_pid,
            owner: ready.owner,
            token,
            _token_file: token_file,
        }
    }

    /// Starts an agent that must fail; returns its exit code and stderr.
    pub fn start_failing(binary: &Path, target: &str) -> (Option<i32>, String) {
        let token_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token_file.path(), "t0ken").unwrap();
        let output = Command::new(binary)
            .args([
                "--target",
                target,
                "--listen",
                "127.0.0.1:0",
                "--token-file",
            ])
            .arg(token_file.path())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The file holding the session token.
    pub fn token_file(&self) -> &Path {
        self._token_file.path()
    }

    pub fn guard_pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens an authenticated session.
    pub async fn session(&self) -> SessionClient {
        SessionClient::connect(self.addr, &self.token).await
    }

    /// Sends SIGTERM and waits (at most 10 s) for the agent to clean up and exit.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        wait_exit(&mut self.child, Duration::from_secs(10))
    }

    /// Waits (at most `timeout`) for the guard to exit on its own.
    /// Waits for the guard to exit without reaping it (`WNOWAIT`): it stays a zombie until this
    /// is dropped or waited for. True once it has exited.
    pub fn exited_unreaped(&self) -> bool {
        use nix::sys::wait::{Id, WaitPidFlag, waitid};
        waitid(
            Id::Pid(nix::unistd::Pid::from_raw(self.child.id() as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        )
        .is_ok()
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        wait_exit(&mut self.child, timeout)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher as _, RandomState};
    let a = RandomState::new().hash_one(std::process::id());
    let b = RandomState::new().hash_one(std::time::SystemTime::now());
    (u128::from(a) << 64) | u128::from(b)
}

/// The readiness line is one flat JSON object; read it without a JSON dependency.
mod serde_like {
    use std::net::SocketAddr;

    pub(super) struct Ready {
        pub addr: SocketAddr,
        pub worker_pid: u32,
        pub owner: String,
    }

    fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
        let start = line.find(&format!("\"{name}\":"))? + name.len() + 3;
        let rest = line[start..].trim_start_matches('"');
        let end = rest.find(['"', ',', '}'])?;
        Some(&rest[..end])
    }

    pub(super) fn parse(line: &str) -> Option<Ready> {
        if field(line, "event")? != "listening" {
            return None;
        }
        Some(Ready {
            addr: field(line, "addr")?.parse().ok()?,
            worker_pid: field(line, "worker_pid")?.parse().ok()?,
            owner: field(line, "owner")?.to_owned(),
        })
    }
}

/// What arrives on an incoming stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Data(Bytes),
    End,
    Reset(String),
}

/// One incoming connection delivered by the agent.
#[derive(Debug)]
pub struct IncomingStream {
    pub info: IncomingConnection,
    /// For a stolen HTTP request (the agent routes HTTP request by request): its head. The
    /// stream's data is then the request body, and [`answer`](Self::answer) replies.
    pub http: Option<tether_protocol::HttpRequestHead>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    out: mpsc::UnboundedSender<Body>,
    buffered: Vec<u8>,
}

impl IncomingStream {
    pub fn id(&self) -> u64 {
        self.info.stream_id
    }

    /// The original destination port.
    pub fn port(&self) -> u16 {
        let local = self
            .info
            .local
            .as_ref()
            .expect("incoming connections name their destination");
        std::net::SocketAddr::try_from(local).unwrap().port()
    }

    /// Reads until `needle` has arrived (or the stream ends); returns everything read so far.
    pub async fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        while !contains(&self.buffered, needle) {
            match self.events.recv().await {
                Some(StreamEvent::Data(data)) => self.buffered.extend_from_slice(&data),
                Some(StreamEvent::End | StreamEvent::Reset(_)) | None => break,
            }
        }
        self.buffered.clone()
    }

    /// Takes the next complete HTTP request head off the stream (everything up to and including
    /// the blank line); `None` if the stream ends first.
    pub async fn read_request(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buffered.drain(..end + 4).collect();
                return Some(String::from_utf8_lossy(&head).into_owned());
            }
            match self.events.recv().await {
                Some(StreamEvent::Data(data)) => self.buffered.extend_from_slice(&data),
                _ => return None,
            }
        }
    }

    /// Answers one request with 200 and `body`: over HTTP framing for a stolen HTTP request, as
    /// raw HTTP/1.1 bytes (closing the connection) for a stolen TCP connection.
    pub async fn answer(&mut self, body: &str) {
        match &self.http {
            Some(head) => {
                let response = tether_protocol::HttpResponseHead {
                    stream_id: head.stream_id,
                    status: 200,
                    version: head.version,
                    headers: vec![tether_protocol::Header {
                        name: "content-length".into(),
                        value: body.len().to_string().into(),
                    }],
                };
                let _ = self.out.send(Body::HttpResponseHead(response));
                self.send(body.to_owned());
                self.end();
            }
            None => {
                self.read_until(b"\r\n\r\n").await;
                self.send(format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ));
                self.end();
            }
        }
    }

    /// The request line of a stolen HTTP request (`GET /path`), `None` for a raw stream.
    pub fn request_line(&self) -> Option<String> {
        self.http
            .as_ref()
            .map(|h| format!("{} {}", h.method, h.uri))
    }

    /// Reads everything until the peer ends the stream.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while let Some(StreamEvent::Data(data)) = self.events.recv().await {
            self.buffered.extend_from_slice(&data);
        }
        self.buffered.clone()
    }

    pub fn send(&self, data: impl Into<Bytes>) {
        let body = Body::StreamData(StreamData {
            stream_id: self.id(),
            data: data.into(),
        });
        let _ = self.out.send(body);
    }

    pub fn end(&self) {
        let _ = self.out.send(Body::StreamEnd(StreamEnd {
            stream_id: self.id(),
            trailers: vec![],
        }));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// A session with the agent, as the local proxy holds one.
#[derive(Debug)]
pub struct SessionClient {
    pub session_id: String,
    out: mpsc::UnboundedSender<Body>,
    pending: Pending,
    incoming: mpsc::UnboundedReceiver<IncomingStream>,
    logs: Arc<Mutex<Vec<String>>>,
    next_id: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Dropping the client closes the link, as a local proxy that goes away would.
impl Drop for SessionClient {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl SessionClient {
    pub async fn connect(addr: SocketAddr, token: &str) -> SessionClient {
        let stream = TcpStream::connect(addr).await.unwrap();
        let hello = Hello {
            token: token.to_owned(),
            client: "testkit".into(),
            ..Default::default()
        };
        let (link, welcome) = tether_session::link::client_handshake(stream, hello)
            .await
            .unwrap();
        let (mut sink, mut frames) = link.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Body>();
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let writer = tokio::spawn(async move {
            let mut seq = 0;
            while let Some(body) = out_rx.recv().await {
                let seq = if body.is_link_local() {
                    0
                } else {
                    seq += 1;
                    seq
                };
                if sink
                    .send(Frame {
                        seq,
                        ack: 0,
                        body: Some(body),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let (pending_reader, logs_reader, out_reader) =
            (Arc::clone(&pending), Arc::clone(&logs), out_tx.clone());
        let reader = tokio::spawn(async move {
            let mut streams: HashMap<u64, mpsc::UnboundedSender<StreamEvent>> = HashMap::new();
            while let Some(Ok(frame)) = frames.next().await {
                let (id, event) = match frame.body {
                    Some(Body::Response(response)) => {
                        if let Some(waiter) = pending_reader.lock().unwrap().remove(&response.id) {
                            let _ = waiter.send(response);
                        }
                        continue;
                    }
                    Some(Body::IncomingConnection(info)) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        streams.insert(info.stream_id, tx);
                        let stream = IncomingStream {
                            info,
                            http: None,
                            events: rx,
                            out: out_reader.clone(),
                            buffered: Vec::new(),
                        };
                        let _ = incoming_tx.send(stream);
                        continue;
                    }
                    Some(Body::HttpRequestHead(head)) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        streams.insert(head.stream_id, tx);
                        let info = IncomingConnection {
                            stream_id: head.stream_id,
                            mode: SubscriptionMode::Steal as i32,
                            local: head.local.clone(),
                            remote: head.remote.clone(),
                        };
                        let stream = IncomingStream {
                            info,
                            http: Some(head),
                            events: rx,
                            out: out_reader.clone(),
                            buffered: Vec::new(),
                        };
                        let _ = incoming_tx.send(stream);
                        continue;
                    }
                    Some(Body::Ping(ping)) => {
                        let _ = out_reader.send(Body::Pong(Pong { nonce: ping.nonce }));
                        continue;
                    }
                    Some(Body::Log(log)) => {
                        logs_reader.lock().unwrap().push(log.message);
                        continue;
                    }
                    Some(Body::StreamData(d)) => {
                        // This client consumes at once: grant the bytes back right away.
                        let update = tether_protocol::WindowUpdate {
                            stream_id: d.stream_id,
                            increment: d.data.len() as u32,
                        };
                        let _ = out_reader.send(Body::WindowUpdate(update));
                        (d.stream_id, StreamEvent::Data(d.data))
                    }
                    Some(Body::StreamEnd(e)) => (e.stream_id, StreamEvent::End),
                    Some(Body::StreamReset(r)) => (r.stream_id, StreamEvent::Reset(r.reason)),
                    _ => continue,
                };
                if let Some(tx) = streams.get(&id) {
                    let _ = tx.send(event);
                }
            }
        });
        SessionClient {
            session_id: welcome.session_id,
            out: out_tx,
            pending,
            incoming: incoming_rx,
            logs,
            next_id: 1,
            tasks: vec![writer, reader],
        }
    }

    /// Sends a request and waits (at most 30 s) for its response.
    pub async fn request(&mut self, op: request::Op) -> Result<response::Result, ErrorInfo> {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Body::Request(Request { id, op: Some(op) }))
            .expect("session writer alive");
        let response = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("no response within 30 s")
            .expect("the link closed before the response");
        match response.result {
            Some(response::Result::Error(error)) => Err(error),
            Some(result) => Ok(result),
            None => panic!("empty response"),
        }
    }

    pub async fn subscribe(&mut self, port: u16, mode: SubscriptionMode) -> Result<(), ErrorInfo> {
        let op = PortSubscribe {
            port: u32::from(port),
            mode: mode as i32,
            ..Default::default()
        };
        self.subscribe_with(op).await
    }

    pub async fn subscribe_with(&mut self, subscribe: PortSubscribe) -> Result<(), ErrorInfo> {
        self.request(request::Op::PortSubscribe(subscribe))
            .await
            .map(drop)
    }

    pub async fn unsubscribe(&mut self, port: u16) -> Result<(), ErrorInfo> {
        self.request(request::Op::PortUnsubscribe(PortUnsubscribe {
            port: u32::from(port),
        }))
        .await
        .map(drop)
    }

    /// The next incoming connection (at most `timeout` away).
    pub async fn next_incoming(&mut self, timeout: Duration) -> Option<IncomingStream> {
        tokio::time::timeout(timeout, self.incoming.recv())
            .await
            .ok()
            .flatten()
    }

    /// Log lines and warnings the agent sent.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Answers every stolen HTTP request with `answer(port)` (one request per connection), in the
    /// background, until the session is dropped.
    pub fn serve_http(
        &mut self,
        answer: impl Fn(u16) -> String + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let answer = Arc::new(answer);
        let (_, closed) = mpsc::unbounded_channel();
        let mut incoming = std::mem::replace(&mut self.incoming, closed);
        tokio::spawn(async move {
            while let Some(mut stream) = incoming.recv().await {
                let answer = Arc::clone(&answer);
                tokio::spawn(async move {
                    let body = answer(stream.port());
                    stream.answer(&body).await;
                });
            }
        })
    }
}
