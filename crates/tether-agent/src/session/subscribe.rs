//! A session's subscriptions: stealing (the redirect rules, refreshed while they live) and
//! mirroring a port, and giving them up.

use super::*;

pub(super) struct ActiveRules {
    pub(super) rules: SessionRules,
    pub(super) ports: Arc<Mutex<BTreeSet<u16>>>,
    pub(super) refresher: Option<tokio::task::JoinHandle<()>>,
}

/// nft: restarts the ports' timeouts every second; if the agent dies, they expire.
pub(super) async fn refresh_loop(
    netns: Netns,
    rules: SessionRules,
    ports: Arc<Mutex<BTreeSet<u16>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let current = ports.lock().expect("ports lock").clone();
        if let Some(plan) = rules.refresh(&current)
            && let Err(e) = rules::apply(&netns, &plan).await
        {
            tracing::warn!(error = %e, "cannot refresh the redirect; it expires in {}s", rules::plan::PORT_TIMEOUT_SECS);
        }
    }
}

impl Session {
    pub(super) async fn subscribe(
        &mut self,
        subscribe: PortSubscribe,
    ) -> Result<response::Result, ErrorInfo> {
        let port = u16::try_from(subscribe.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                error(
                    ErrorCode::BadRequest,
                    format!("{} is not a port", subscribe.port),
                )
            })?;
        if !self.agent.netns.exists() {
            return Err(error(
                ErrorCode::TargetGone,
                format!("the target {} is gone", self.agent.netns.label),
            ));
        }
        match subscribe.mode() {
            SubscriptionMode::Steal => {
                let route = Route::new(subscribe.http_filter.as_ref(), subscribe.steal_probes)
                    .map_err(|e| error(ErrorCode::BadRequest, e))?;
                self.steal(port, subscribe.flush_connections).await?;
                self.routes.insert(port, Arc::new(route));
            }
            SubscriptionMode::Mirror => {
                let route = subscribe
                    .http_filter
                    .as_ref()
                    .map(|filter| Route::new(Some(filter), subscribe.steal_probes).map(Arc::new))
                    .transpose()
                    .map_err(|e| error(ErrorCode::BadRequest, e))?;
                self.mirror(port, route).await?
            }
            SubscriptionMode::Unspecified => {
                return Err(error(
                    ErrorCode::BadRequest,
                    "a subscription needs a mode: mirror or steal",
                ));
            }
        }
        Ok(response::Result::Subscribed(Subscribed {
            port: u32::from(port),
        }))
    }

    pub(super) async fn steal(&mut self, port: u16, flush: bool) -> Result<(), ErrorInfo> {
        {
            let mut ports = self.agent.ports.lock().expect("port table lock");
            if let Some(claim) = ports.get(&port) {
                let whose = if claim.session == self.id {
                    "this session".to_owned()
                } else {
                    let waiting = self
                        .agent
                        .sessions
                        .lock()
                        .expect("sessions lock")
                        .get(&claim.session)
                        .and_then(|(_, status)| match status.borrow().state {
                            LinkState::Down { since, .. } => Some(since.elapsed()),
                            _ => None,
                        });
                    match waiting {
                        Some(down) => format!(
                            "session {}, whose client has been gone for {} s; the agent keeps it for its reconnect grace, then releases the port",
                            claim.session,
                            down.as_secs()
                        ),
                        None => format!("session {}", claim.session),
                    }
                };
                return Err(error(
                    ErrorCode::PortInUse,
                    format!("port {port} is already stolen by {whose}"),
                ));
            }
            ports.insert(
                port,
                PortClaim {
                    session: self.id.clone(),
                    tx: self.stolen_tx.clone(),
                },
            );
        }
        let added = self.add_rule(port).await;
        if let Err(e) = added {
            self.agent
                .ports
                .lock()
                .expect("port table lock")
                .remove(&port);
            return Err(e);
        }
        tracing::info!(session = %self.id, port, "stealing");
        if flush {
            let closed = crate::flush::flush_port(&self.agent.netns, port).await;
            self.send(Body::Log(tether_protocol::Log {
                level: tether_protocol::LogLevel::Info as i32,
                message: format!("flush_connections: closed {closed} existing connection(s) to port {port}; their clients reconnect into the steal"),
                target: "steal".into(),
            }))
            .await;
        }
        Ok(())
    }

    pub(super) async fn add_rule(&mut self, port: u16) -> Result<(), ErrorInfo> {
        let rules_error = |e: rules::RulesError| {
            error(
                ErrorCode::Internal,
                format!("cannot set up the redirect: {e}"),
            )
        };
        if self.rules.is_none() {
            let rules = SessionRules {
                backend: self.agent.backend,
                owner: self.agent.owner.clone(),
                session: self.id.clone(),
                listen_port: self.agent.steal_port,
                mesh: self.agent.mesh,
            };
            rules::apply(&self.agent.netns, &rules.setup())
                .await
                .map_err(rules_error)?;
            if let Some(note) = self.agent.backend_note {
                self.send(Body::Log(tether_protocol::Log {
                    level: tether_protocol::LogLevel::Warn as i32,
                    message: note.into(),
                    target: "steal".into(),
                }))
                .await;
            }
            let ports = Arc::new(Mutex::new(BTreeSet::new()));
            let refresher = (rules.backend == Backend::Nft).then(|| {
                tokio::spawn(refresh_loop(
                    self.agent.netns.clone(),
                    rules.clone(),
                    Arc::clone(&ports),
                ))
            });
            self.rules = Some(ActiveRules {
                rules,
                ports,
                refresher,
            });
        }
        let active = self.rules.as_ref().expect("set up above");
        rules::apply(&self.agent.netns, &active.rules.add_port(port))
            .await
            .map_err(rules_error)?;
        active.ports.lock().expect("ports lock").insert(port);
        Ok(())
    }

    pub(super) async fn mirror(
        &mut self,
        port: u16,
        route: Option<Arc<Route>>,
    ) -> Result<(), ErrorInfo> {
        if self.mirrors.contains_key(&port) {
            return Err(error(
                ErrorCode::PortInUse,
                format!("port {port} is already mirrored by this session"),
            ));
        }
        let capture = mirror::start(
            &self.agent.netns,
            port,
            self.out.clone(),
            Arc::clone(&self.next_stream),
            route,
            self.agent.mesh.is_some(),
            self.pressure.clone(),
        )
        .await
        .map_err(|e| {
            error(
                ErrorCode::PermissionDenied,
                format!("cannot capture port {port}: {e} (the agent needs CAP_NET_RAW)"),
            )
        })?;
        self.mirrors.insert(port, capture);
        tracing::info!(session = %self.id, port, "mirroring");
        Ok(())
    }

    pub(super) async fn unsubscribe(&mut self, port: u32) -> Result<response::Result, ErrorInfo> {
        let port = u16::try_from(port)
            .map_err(|_| error(ErrorCode::BadRequest, format!("{port} is not a port")))?;
        if self.mirrors.remove(&port).is_some() {
            return Ok(response::Result::Done(Default::default()));
        }
        let owned = self
            .agent
            .ports
            .lock()
            .expect("port table lock")
            .get(&port)
            .is_some_and(|c| c.session == self.id);
        if !owned {
            return Err(error(
                ErrorCode::NotFound,
                format!("port {port} is not subscribed in this session"),
            ));
        }
        if let Some(active) = &self.rules {
            active.ports.lock().expect("ports lock").remove(&port);
            if let Err(e) = rules::apply(&self.agent.netns, &active.rules.remove_port(port)).await {
                tracing::warn!(port, error = %e, "cannot remove the redirect");
            }
        }
        self.routes.remove(&port);
        // Connections already stolen keep going; only new ones reach the original app again.
        self.agent
            .ports
            .lock()
            .expect("port table lock")
            .remove(&port);
        Ok(response::Result::Done(Default::default()))
    }
}
