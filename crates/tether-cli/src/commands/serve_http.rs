//! `tether serve-http`: the tiny HTTP service `tether demo` runs in its pod and locally (and the
//! tests' tokio app). Answers every request with `NAME PORT METHOD PATH from PEER`; keeps
//! connections alive unless the client sends `Connection: close`. Not a general HTTP server: it reads request heads only (no bodies).

use std::net::{IpAddr, SocketAddr};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

pub(crate) async fn run(name: String, bind: IpAddr, port: u16) -> anyhow::Result<i32> {
    let listener = TcpListener::bind(SocketAddr::new(bind, port)).await?;
    eprintln!("{name}: listening on {}", listener.local_addr()?);
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = serve(stream, peer, &name, port).await;
        });
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, name: &str, port: u16) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(request_line) = lines.next_line().await? {
        // Skip the headers up to the blank line, noting whether the client wants the connection
        // closed after the answer.
        let mut close = false;
        while let Some(header) = lines.next_line().await? {
            if header.trim().is_empty() {
                break;
            }
            close |= header.to_ascii_lowercase().replace(' ', "") == "connection:close";
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
        let body = format!("{name} {port} {method} {path} from {}\n", peer.ip());
        // One write per answer (and no Nagle): head and body in two writes would wait for the
        // client's delayed ACK, ~40 ms per request.
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        write.write_all(answer.as_bytes()).await?;
        if close {
            break;
        }
    }
    write.shutdown().await
}
