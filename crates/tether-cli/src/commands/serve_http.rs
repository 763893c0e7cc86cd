//! `tether serve-http`: the tiny HTTP service `tether demo` runs in its pod and locally (and the
//! tests' tokio app). Answers every request with `NAME PORT METHOD PATH from PEER`; keeps
//! connections alive unless the client sends `Connection: close` (or speaks HTTP/1.0 without
//! `Connection: keep-alive`). Not a general HTTP server: it reads request heads only (no bodies).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

pub(crate) async fn run(
    name: String,
    bind: IpAddr,
    port: u16,
    count_file: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let listener = TcpListener::bind(SocketAddr::new(bind, port)).await?;
    eprintln!("{name}: listening on {}", listener.local_addr()?);
    let served = Arc::new(AtomicU64::new(0));
    if let Some(path) = count_file {
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tick.tick().await;
                let count = served.load(Ordering::Relaxed).to_string();
                let _ = std::fs::write(&path, count);
            }
        });
    }
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            let _ = serve(stream, peer, &name, port, &served).await;
        });
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    port: u16,
    served: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(request_line) = lines.next_line().await? {
        // Skip the headers up to the blank line, noting whether the client wants the connection
        // closed after the answer (HTTP/1.0 closes unless it asks to keep it alive).
        let http10 = request_line.trim_end().ends_with("HTTP/1.0");
        let (mut close, mut keep_alive) = (false, false);
        while let Some(header) = lines.next_line().await? {
            if header.trim().is_empty() {
                break;
            }
            let header = header.to_ascii_lowercase().replace(' ', "");
            close |= header == "connection:close";
            keep_alive |= header == "connection:keep-alive";
        }
        close |= http10 && !keep_alive;
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
        let body = format!("{name} {port} {method} {path} from {}\n", peer.ip());
        // One write per answer (and no Nagle): head and body in two writes would wait for the
        // client's delayed ACK, ~40 ms per request.
        // Said outright: an HTTP/1.0 client keeps the connection only when told it may.
        let connection = if close {
            "Connection: close\r\n"
        } else if http10 {
            "Connection: keep-alive\r\n"
        } else {
            ""
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
            body.len()
        );
        write.write_all(answer.as_bytes()).await?;
        served.fetch_add(1, Ordering::Relaxed);
        if close {
            break;
        }
    }
    write.shutdown().await
}
