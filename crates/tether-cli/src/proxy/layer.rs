//! The preloaded layer's side: its Unix socket, one request at a time per connection, and the
//! listeners it reports (subscribed in the target, counted per listening process).

use super::*;

impl Shared {
    pub(super) async fn serve_layer(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let (answer, payload) = match serde_json::from_str::<LayerRequest>(&line) {
                Ok(request) => {
                    // Checked before allocating: the length comes from the process's memory.
                    if request.payload_len() > tether_intercept::channel::MAX_PAYLOAD {
                        return;
                    }
                    let mut payload = vec![0; request.payload_len()];
                    if reader.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    self.on_layer(request, payload).await
                }
                Err(e) => (
                    Answer::Error {
                        message: format!("bad request from the layer: {e}"),
                    },
                    Vec::new(),
                ),
            };
            if write.write_all(&answer.encode(&payload)).await.is_err() {
                return;
            }
        }
    }

    pub(super) async fn on_layer(
        self: &Arc<Self>,
        request: LayerRequest,
        payload: Vec<u8>,
    ) -> (Answer, Vec<u8>) {
        let answer = match request {
            LayerRequest::Listen {
                pid,
                addr,
                requested_port,
            } => self.listen(pid, addr, requested_port).await,
            LayerRequest::Unlisten { pid, addr } => {
                self.unlisten(pid, addr).await;
                Answer::Done
            }
            LayerRequest::Peer { peer, local } => Answer::Peer {
                addr: self
                    .peers
                    .lock()
                    .expect("peers lock")
                    .get(&(peer, local))
                    .map(|(remote, _)| *remote),
            },
            LayerRequest::Policy => Answer::Policy(self.policy.clone()),
            LayerRequest::Connect {
                transport,
                remote,
                from,
                hostname,
            } => self.connect_out(transport, remote, from, hostname).await,
            LayerRequest::Resolve { name, family } => self.resolve(name, family).await,
            LayerRequest::ResolveAddress { address } => self.resolve_address(address).await,
            LayerRequest::Fs { .. } => return self.fs(&payload).await,
            LayerRequest::Release { streams } => self.release(&streams),
        };
        (answer, Vec::new())
    }

    pub(super) async fn listen(&self, pid: u32, local: SocketAddr, requested_port: u16) -> Answer {
        let (remote_port, steal) = match ports::decide(&self.incoming, local, requested_port) {
            Decision::Local(reason) => {
                let _ = self.events.send(Event::StaysLocal {
                    local,
                    reason: reason.clone(),
                });
                return Answer::Local { reason };
            }
            Decision::Remote { remote_port, steal } => (remote_port, steal),
        };
        let mode = if steal {
            Delivery::Steal
        } else {
            Delivery::Mirror
        };
        let _subscribing = self.subscribing.lock().await;
        {
            let mut listeners = self.listeners.lock().expect("listeners lock");
            if let Some(existing) = listeners.get_mut(&remote_port) {
                existing.owners.insert(pid);
                return Answer::Remote { remote_port, mode };
            }
        }
        let subscribe = PortSubscribe {
            port: u32::from(remote_port),
            mode: if steal {
                SubscriptionMode::Steal
            } else {
                SubscriptionMode::Mirror
            } as i32,
            http_filter: ports::wire_filter(&self.incoming.http_filter, remote_port),
            steal_probes: self.steal_probes,
            flush_connections: steal && self.flush_connections,
        };
        match self
            .primary()
            .request(request::Op::PortSubscribe(subscribe.clone()))
            .await
        {
            Ok(_) => {
                self.listeners.lock().expect("listeners lock").insert(
                    remote_port,
                    Listener {
                        local,
                        subscribe: subscribe.clone(),
                        owners: [pid].into(),
                    },
                );
                if !steal {
                    // The other replicas mirror it too.
                    let what = format!("cannot mirror target port {remote_port}");
                    self.ask_mirrors(request::Op::PortSubscribe(subscribe), &what)
                        .await;
                }
                let _ = self.events.send(Event::Subscribed {
                    local,
                    remote_port,
                    steal,
                });
                Answer::Remote { remote_port, mode }
            }
            Err(error) => {
                let _ = self.events.send(Event::Warning(format!(
                    "cannot {} target port {remote_port}: {}",
                    mode.verb(),
                    error.message
                )));
                Answer::Error {
                    message: error.message,
                }
            }
        }
    }

    pub(super) async fn unlisten(&self, pid: u32, local: SocketAddr) {
        let _subscribing = self.subscribing.lock().await;
        let port = {
            let mut listeners = self.listeners.lock().expect("listeners lock");
            let Some((&port, listener)) = listeners.iter_mut().find(|(_, l)| l.local == local)
            else {
                return;
            };
            if !listener.owners.remove(&pid) || !listener.owners.is_empty() {
                return;
            }
            listeners.remove(&port);
            port
        };
        let unsubscribe = request::Op::PortUnsubscribe(PortUnsubscribe {
            port: u32::from(port),
        });
        let _ = self.primary().request(unsubscribe.clone()).await;
        self.ask_mirrors(
            unsubscribe,
            &format!("cannot stop mirroring target port {port}"),
        )
        .await;
    }

    /// Asks every mirroring session at once, each for at most 5 s (a replica whose link is down
    /// must not hold up the process's `listen`); failures are warnings.
    pub(super) async fn ask_mirrors(&self, op: request::Op, what: &str) {
        let mirrors = self.mirrors.lock().expect("mirrors lock").clone();
        let asks = mirrors.iter().map(|up| {
            let op = op.clone();
            async move {
                let asked = tokio::time::timeout(Duration::from_secs(5), up.request(op)).await;
                (up, asked)
            }
        });
        for (up, asked) in futures_util::future::join_all(asks).await {
            let message = match asked {
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => error.message,
                Err(_) => "no answer within 5 s".to_owned(),
            };
            let _ = self.events.send(Event::Warning(format!(
                "{what} in pod {}: {message}",
                up.pod
            )));
        }
    }
}
