//! A TCP relay that breaks links on purpose, for fault-injection tests of the session between
//! the local proxy and the agent. It sits on loopback in front of the agent and can
//!
//! - [`cut`](LinkCutter::cut) every open connection with a reset, whatever is in flight (so cuts
//!   land mid-frame while traffic flows);
//! - [`silence`](LinkCutter::silence) them: keep both sockets open but forward nothing more,
//!   like a dead NAT mapping or a sleeping laptop (a half-dead link);
//! - [`refuse`](LinkCutter::refuse) new connections (each is reset at once), for an outage;
//! - close connections idle for a given time in both directions, like a load balancer's idle
//!   timeout ([`LinkCutter::with_idle_timeout`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// One relayed connection.
struct Relay {
    /// Duplicates of both sockets: they keep the sockets open when the pumps stop (silence) and
    /// let [`LinkCutter::cut`] reset them.
    sockets: [std::net::TcpStream; 2],
    pumps: [JoinHandle<()>; 2],
    last_activity: Arc<AtomicU64>,
    /// Set: the pumps stop forwarding but keep their sockets (a dropped write half would send a
    /// FIN, which a silent link never does).
    silent: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    fn reset(self) {
        for pump in &self.pumps {
            pump.abort();
        }
        for socket in &self.sockets {
            let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
        }
        // The pumps' halves close when their tasks are dropped; the last of these duplicates to
        // close sends the reset.
    }

    fn close(self) {
        for pump in &self.pumps {
            pump.abort();
        }
        for socket in &self.sockets {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[derive(Default)]
struct Shared {
    relays: Mutex<Vec<Relay>>,
    refusing: AtomicBool,
    accepted: AtomicU64,
    idle_closes: AtomicU64,
    forwarded: AtomicU64,
}

/// See the module documentation. Dropping it stops the relay and closes every connection.
pub struct LinkCutter {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    epoch: Instant,
}

impl std::fmt::Debug for LinkCutter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCutter")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for LinkCutter {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for relay in self.shared.relays.lock().unwrap().drain(..) {
            relay.close();
        }
    }
}

impl LinkCutter {
    /// Relays `127.0.0.1:<port>` → `upstream`.
    pub async fn start(upstream: SocketAddr) -> LinkCutter {
        LinkCutter::start_with(upstream, None).await
    }

    /// Also closes (cleanly, like a load balancer) every connection that carried no byte in
    /// either direction for `idle`.
    pub async fn with_idle_timeout(upstream: SocketAddr, idle: Duration) -> LinkCutter {
        LinkCutter::start_with(upstream, Some(idle)).await
    }

    async fn start_with(upstream: SocketAddr, idle: Option<Duration>) -> LinkCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let epoch = Instant::now();
        let mut tasks = vec![tokio::spawn(accept_loop(
            listener,
            upstream,
            Arc::clone(&shared),
            epoch,
        ))];
        if let Some(idle) = idle {
            tasks.push(tokio::spawn(idle_closer(Arc::clone(&shared), idle, epoch)));
        }
        LinkCutter {
            addr,
            shared,
            tasks,
            epoch,
        }
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every open connection now, both sides. Returns how many there were.
    pub fn cut(&self) -> usize {
        let relays: Vec<Relay> = self.shared.relays.lock().unwrap().drain(..).collect();
        // Connections that already ended on their own are not cut.
        let n = relays
            .iter()
            .filter(|r| r.pumps.iter().any(|p| !p.is_finished()))
            .count();
        for relay in relays {
            relay.reset();
        }
        n
    }

    /// Stops forwarding on every open connection, keeping it open (a half-dead link).
    /// New connections are relayed normally.
    pub fn silence(&self) {
        for relay in self.shared.relays.lock().unwrap().iter() {
            let _ = relay.silent.send(true);
        }
    }

    /// While on, every new connection is reset as soon as it is accepted.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed for being idle.
    pub fn idle_closes(&self) -> u64 {
        self.shared.idle_closes.load(Ordering::SeqCst)
    }

    /// Bytes relayed so far, both directions.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Time since the relay started (the clock of its idle tracking).
    pub fn uptime(&self) -> Duration {
        self.epoch.elapsed()
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    epoch: Instant,
) {
    while let Ok((client, _)) = listener.accept().await {
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refusing.load(Ordering::SeqCst) {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect(upstream).await else {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(client), Ok(server)) = (client.into_std(), server.into_std()) else {
            continue;
        };
        let (Ok(client_dup), Ok(server_dup)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let (Ok(client), Ok(server)) = (TcpStream::from_std(client), TcpStream::from_std(server))
        else {
            continue;
        };
        let now = epoch.elapsed().as_millis() as u64;
        let last_activity = Arc::new(AtomicU64::new(now));
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let (silent, _) = tokio::sync::watch::channel(false);
        let pumps = [
            tokio::spawn(pump(
                client_read,
                server_write,
                Arc::clone(&last_activity),
                Arc::clone(&shared),
                epoch,
                silent.subscribe(),
            )),
            tokio::spawn(pump(
                server_read,
                client_write,
                Arc::clone(&last_activity),
                Arc::clone(&shared),
                epoch,
                silent.subscribe(),
            )),
        ];
        shared.relays.lock().unwrap().push(Relay {
            sockets: [client_dup, server_dup],
            pumps,
            last_activity,
            silent,
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    last_activity: Arc<AtomicU64>,
    shared: Arc<Shared>,
    epoch: Instant,
    mut silent: tokio::sync::watch::Receiver<bool>,
) {
    let forward = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            };
            last_activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            shared.forwarded.fetch_add(n as u64, Ordering::Relaxed);
            last_activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    };
    let silenced = async move {
        let _ = silent.wait_for(|s| *s).await;
    };
    tokio::select! {
        () = forward => return,
        () = silenced => {}
    }
    // Hold both halves (no FIN) and forward nothing until cut or dropped.
    std::future::pending::<()>().await;
}

/// Closes relays idle longer than `idle` (checked every 100 ms).
async fn idle_closer(shared: Arc<Shared>, idle: Duration, epoch: Instant) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = epoch.elapsed().as_millis() as u64;
        let idle_ms = idle.as_millis() as u64;
        let expired: Vec<Relay> = {
            let mut relays = shared.relays.lock().unwrap();
            let (expired, kept) = relays.drain(..).partition(|r| {
                now.saturating_sub(r.last_activity.load(Ordering::Relaxed)) > idle_ms
            });
            *relays = kept;
            expired
        };
        for relay in expired {
            shared.idle_closes.fetch_add(1, Ordering::SeqCst);
            relay.close();
        }
    }
}
