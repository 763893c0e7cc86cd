//! The API server: routing, authentication, RBAC, list/get/watch/create/delete.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{
    State, kubelet,
    rest::{Body, Query, json_response, status},
    store::{JOBS, Key, PODS, Resource, fields_match, labels_match, parse_labels},
};

pub(crate) async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(req, state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

enum Route {
    Collection {
        resource: Resource,
        namespace: Option<String>,
    },
    Item {
        resource: Resource,
        namespace: String,
        name: String,
    },
    PortForward {
        namespace: String,
        name: String,
    },
    EphemeralContainers {
        namespace: String,
        name: String,
    },
    AccessReview,
    Version,
}

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["version"] => return Some(Route::Version),
        [
            "apis",
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
        ] => {
            return Some(Route::AccessReview);
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str| Resource::find(group, version, plural);
    Some(match rest {
        [plural] => Route::Collection {
            resource: find(plural)?,
            namespace: None,
        },
        ["namespaces", ns, plural] => Route::Collection {
            resource: find(plural)?,
            namespace: Some((*ns).to_owned()),
        },
        ["namespaces", ns, plural, name] => Route::Item {
            resource: find(plural)?,
            namespace: (*ns).to_owned(),
            name: (*name).to_owned(),
        },
        ["namespaces", ns, "pods", name, "portforward"] if group.is_empty() => Route::PortForward {
            namespace: (*ns).to_owned(),
            name: (*name).to_owned(),
        },
        ["namespaces", ns, "pods", name, "ephemeralcontainers"] if group.is_empty() => {
            Route::EphemeralContainers {
                namespace: (*ns).to_owned(),
                name: (*name).to_owned(),
            }
        }
        _ => return None,
    })
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    let authorised = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", state.token));
    if !authorised {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        );
    }
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let Some(route) = route(req.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let method = req.method().clone();
    match (route, method) {
        (Route::Version, Method::GET) => json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-sim", "platform": "linux/amd64"}),
        ),
        (Route::AccessReview, Method::POST) => {
            let body = read_json(req).await.unwrap_or(Value::Null);
            access_review(&state, body)
        }
        (Route::PortForward { namespace, name }, Method::GET | Method::POST) => {
            // Since 1.35 a WebSocket upgrade needs `create` as well as `get` (field-notes §1).
            for verb in ["get", "create"] {
                if let Some(denied) = forbidden(&state, verb, "pods/portforward", &namespace) {
                    return denied;
                }
            }
            let delay = state.faults.lock().unwrap().port_forward_delay;
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            super::portforward::handle(req, &query, &state, &namespace, &name)
        }
        (Route::EphemeralContainers { namespace, name }, Method::PATCH) => {
            if let Some(denied) = forbidden(&state, "patch", "pods/ephemeralcontainers", &namespace)
            {
                return denied;
            }
            match read_json(req).await {
                Ok(patch) => add_ephemeral(&state, &namespace, &name, &patch),
                Err(message) => status(StatusCode::BAD_REQUEST, "BadRequest", message),
            }
        }
        (
            Route::Collection {
                resource,
                namespace,
            },
            Method::GET,
        ) => {
            if let Err(message) = query
                .get("labelSelector")
                .map_or(Ok(Vec::new()), parse_labels)
            {
                return status(StatusCode::BAD_REQUEST, "BadRequest", message);
            }
            let watch = matches!(query.get("watch"), Some("true" | "1"));
            let verb = if watch { "watch" } else { "list" };
            if let Some(denied) = forbidden(
                &state,
                verb,
                resource.plural,
                namespace.as_deref().unwrap_or(""),
            ) {
                return denied;
            }
            if watch {
                watch_response(&state, resource, namespace, &query)
            } else {
                list(&state, resource, namespace.as_deref(), &query)
            }
        }
        (
            Route::Collection {
                resource,
                namespace: Some(namespace),
            },
            Method::POST,
        ) => {
            if let Some(denied) = forbidden(&state, "create", resource.plural, &namespace) {
                return denied;
            }
            if resource != JOBS {
                return status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("the simulator does not create {}", resource.plural),
                );
            }
            match read_json(req).await {
                Ok(body) => create_job(&state, &namespace, body),
                Err(message) => status(StatusCode::BAD_REQUEST, "BadRequest", message),
            }
        }
        (
            Route::Item {
                resource,
                namespace,
                name,
            },
            Method::GET,
        ) => {
            if let Some(denied) = forbidden(&state, "get", resource.plural, &namespace) {
                return denied;
            }
            let key = Key {
                resource,
                namespace,
                name,
            };
            match state.store.lock().unwrap().get(&key) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(&key),
            }
        }
        (
            Route::Item {
                resource,
                namespace,
                name,
            },
            Method::DELETE,
        ) => {
            if let Some(denied) = forbidden(&state, "delete", resource.plural, &namespace) {
                return denied;
            }
            let from_query = query.get("propagationPolicy").map(str::to_owned);
            let body = read_json(req).await.unwrap_or(Value::Null);
            let policy =
                from_query.or_else(|| body["propagationPolicy"].as_str().map(str::to_owned));
            let key = Key {
                resource,
                namespace,
                name,
            };
            delete(&state, &key, policy.as_deref())
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the simulator does not serve this method here".into(),
        ),
    }
}

/// The 403 answer when the user may not do `verb` on `resource`.
fn forbidden(state: &State, verb: &str, resource: &str, namespace: &str) -> Option<Response<Body>> {
    if state
        .denied
        .lock()
        .unwrap()
        .contains(&(verb.to_owned(), resource.to_owned()))
    {
        let (plural, sub) = resource.split_once('/').unwrap_or((resource, ""));
        let what = if sub.is_empty() {
            format!("resource \"{plural}\"")
        } else {
            format!("resource \"{plural}/{sub}\"")
        };
        return Some(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{plural} is forbidden: User \"dev\" cannot {verb} {what} in API group \"\" in the namespace \"{namespace}\""
            ),
        ));
    }
    None
}

fn access_review(state: &State, mut review: Value) -> Response<Body> {
    let attributes = &review["spec"]["resourceAttributes"];
    let verb = attributes["verb"].as_str().unwrap_or("");
    let resource = attributes["resource"].as_str().unwrap_or("");
    let resource = match attributes["subresource"].as_str() {
        Some(sub) if !sub.is_empty() => format!("{resource}/{sub}"),
        _ => resource.to_owned(),
    };
    let denied = state
        .denied
        .lock()
        .unwrap()
        .contains(&(verb.to_owned(), resource));
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    review["metadata"] = json!({"creationTimestamp": null});
    review["status"] = if denied {
        json!({"allowed": false, "reason": "denied by the simulator's RBAC"})
    } else {
        json!({"allowed": true, "reason": "allowed by the simulator's RBAC"})
    };
    json_response(StatusCode::CREATED, &review)
}

fn list(
    state: &State,
    resource: Resource,
    namespace: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let store = state.store.lock().unwrap();
    let items: Vec<&Value> = store
        .list(resource, namespace)
        .into_iter()
        .filter(|o| selected(o, query))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": resource.api_version(),
            "kind": format!("{}List", resource.kind),
            "metadata": {"resourceVersion": store.version().to_string()},
            "items": items,
        }),
    )
}

fn selected(object: &Value, query: &Query) -> bool {
    query
        .get("labelSelector")
        .is_none_or(|s| labels_match(s, object))
        && query
            .get("fieldSelector")
            .is_none_or(|s| fields_match(s, object))
}

/// `?watch=true`: the changes after `resourceVersion` (all current objects as `ADDED` for `0`
/// or none), then each new one, until `timeoutSeconds`.
fn watch_response(
    state: &Arc<State>,
    resource: Resource,
    namespace: Option<String>,
    query: &Query,
) -> Response<Body> {
    let since: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let label = query.get("labelSelector").map(str::to_owned);
    let field = query.get("fieldSelector").map(str::to_owned);
    let matches = move |object: &Value| {
        label.as_deref().is_none_or(|s| labels_match(s, object))
            && field.as_deref().is_none_or(|s| fields_match(s, object))
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let mut changed = state.changed.subscribe();
        let in_scope = |key: &Key| {
            key.resource == resource && namespace.as_deref().is_none_or(|ns| key.namespace == ns)
        };
        let (initial, mut last) = {
            let store = state.store.lock().unwrap();
            match since {
                Some(version) => (Vec::new(), version),
                None => (
                    store
                        .list(resource, namespace.as_deref())
                        .into_iter()
                        .filter(|o| matches(o))
                        .map(|o| event_line("ADDED", o))
                        .collect::<Vec<Bytes>>(),
                    store.version(),
                ),
            }
        };
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let lines: Vec<Bytes> = {
                let store = state.store.lock().unwrap();
                let lines = store
                    .changes_after(last)
                    .filter(|c| in_scope(&c.key) && matches(&c.object))
                    .map(|c| event_line(c.kind, &c.object))
                    .collect();
                last = store.version();
                lines
            };
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                changed = changed.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn create_job(state: &Arc<State>, namespace: &str, mut job: Value) -> Response<Body> {
    if let Err(error) = serde_json::from_value::<k8s_openapi::api::batch::v1::Job>(job.clone()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("Job in version \"v1\" cannot be handled as a Job: {error}"),
        );
    }
    if job["metadata"]["name"].as_str().is_none() {
        match job["metadata"]["generateName"].as_str() {
            Some(prefix) => {
                job["metadata"]["name"] = json!(format!("{prefix}{}", kubelet::random_suffix()));
            }
            None => {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "Job.batch \"\" is invalid: metadata.name: Required value: name or generateName is required".into(),
                );
            }
        }
    }
    job["metadata"]["namespace"] = json!(namespace);
    // What the API server defaults: a uid, and a selector on it that the template's labels match.
    let uid = super::store::new_uid();
    job["metadata"]["uid"] = json!(uid);
    if job["spec"]["selector"].is_null() {
        job["spec"]["selector"] =
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    }
    let name = job["metadata"]["name"].clone();
    let template_labels = &mut job["spec"]["template"]["metadata"]["labels"];
    if !template_labels.is_object() {
        *template_labels = json!({});
    }
    template_labels["batch.kubernetes.io/controller-uid"] = json!(uid);
    template_labels["batch.kubernetes.io/job-name"] = name.clone();
    template_labels["controller-uid"] = json!(uid);
    template_labels["job-name"] = name;
    let key = Key {
        resource: JOBS,
        namespace: namespace.to_owned(),
        name: job["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    };
    let created = {
        let mut store = state.store.lock().unwrap();
        if store.get(&key).is_some() {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("jobs.batch \"{}\" already exists", key.name),
            );
        }
        job["status"] = json!({"active": 1, "startTime": super::store::now()});
        store.put(JOBS, job)
    };
    state.changed.send_modify(|v| *v += 1);
    kubelet::start_job(state, &created);
    json_response(StatusCode::CREATED, &created)
}

/// A strategic-merge (or merge) patch of `spec.ephemeralContainers`: containers are merged by
/// name; existing ones cannot change (the API server says so), new ones are started.
fn add_ephemeral(state: &Arc<State>, namespace: &str, name: &str, patch: &Value) -> Response<Body> {
    let key = Key {
        resource: PODS,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let Some(added) = patch["spec"]["ephemeralContainers"].as_array() else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "the patch has no spec.ephemeralContainers".into(),
        );
    };
    let mut new = Vec::new();
    let updated = {
        let mut store = state.store.lock().unwrap();
        let Some(mut pod) = store.get(&key).cloned() else {
            return not_found(&key);
        };
        let existing = &mut pod["spec"]["ephemeralContainers"];
        if !existing.is_array() {
            *existing = json!([]);
        }
        let list = existing.as_array_mut().expect("an array");
        for container in added {
            if let Err(error) = serde_json::from_value::<
                k8s_openapi::api::core::v1::EphemeralContainer,
            >(container.clone())
            {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    error.to_string(),
                );
            }
            match list.iter().find(|c| c["name"] == container["name"]) {
                Some(same) if same == container => {}
                Some(_) => {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        format!(
                            "Pod \"{name}\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers {} may not be changed",
                            container["name"]
                        ),
                    );
                }
                None => {
                    list.push(container.clone());
                    new.push(container.clone());
                }
            }
        }
        store.put(PODS, pod)
    };
    state.changed.send_modify(|v| *v += 1);
    for container in new {
        kubelet::start_ephemeral(state, namespace, name, container);
    }
    json_response(StatusCode::OK, &updated)
}

fn delete(state: &Arc<State>, key: &Key, policy: Option<&str>) -> Response<Body> {
    let deleted = state.store.lock().unwrap().delete(key);
    let Some(object) = deleted else {
        return not_found(key);
    };
    if key.resource == PODS {
        kubelet::stop_pod(state, &key.namespace, &key.name);
        super::workload::sync_services(state);
    }
    if key.resource == JOBS && matches!(policy, Some("Background" | "Foreground")) {
        let uid = object["metadata"]["uid"].as_str().unwrap_or("").to_owned();
        let pods: Vec<Key> = {
            let store = state.store.lock().unwrap();
            store
                .list(PODS, Some(&key.namespace))
                .into_iter()
                .filter(|p| {
                    p["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|r| r["uid"] == json!(uid)))
                })
                .map(|p| Key {
                    resource: PODS,
                    namespace: key.namespace.clone(),
                    name: p["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                })
                .collect()
        };
        for pod in pods {
            state.store.lock().unwrap().delete(&pod);
            kubelet::stop_pod(state, &pod.namespace, &pod.name);
        }
    }
    state.changed.send_modify(|v| *v += 1);
    json_response(StatusCode::OK, &object)
}

async fn read_json(req: Request<Incoming>) -> Result<Value, String> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))
}

fn not_found(key: &Key) -> Response<Body> {
    let group = if key.resource.group.is_empty() {
        String::new()
    } else {
        format!(".{}", key.resource.group)
    };
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{}{group} \"{}\" not found", key.resource.plural, key.name),
    )
}
