//! The daemon's HTTP side: the control API on a Unix socket (root only) and the metrics /
//! status page on a TCP address. Handlers only translate HTTP to a [`Request`] and back; each
//! request is answered by the daemon's loop (one at a time, between membership batches), so an
//! operator's change is serialized with heartbeats on the controller's one path.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    api::{ApiError, ApplyQuery, ForceQuery, NodeAdd, TraceQuery, VipAdd, WeightBody},
    livelog, observe,
};

/// One API request, as the daemon's loop sees it.
#[derive(Debug)]
pub enum Request {
    Status,
    Nodes,
    Node(u32),
    Vips,
    Routes(String),
    Stats,
    Trace(TraceQuery),
    Config,
    Observe,
    AddNode(Box<NodeAdd>),
    RemoveNode { id: u32, force: bool },
    Drain(u32),
    Undrain(u32),
    Weight { id: u32, weight: Option<u32> },
    AddVip(Box<VipAdd>),
    RemoveVip(String),
    Apply { text: String, dry_run: bool },
}

/// A successful answer.
#[derive(Debug)]
pub enum Reply {
    Json(serde_json::Value),
    Text(String),
}

/// A refused or failed request: the HTTP status and the body the CLI prints.
#[derive(Debug)]
pub struct Fail {
    pub status: StatusCode,
    pub body: ApiError,
}

impl Fail {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError {
                error: error.into(),
                hint: None,
            },
        }
    }
    pub fn bad(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }
    pub fn conflict(error: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, error)
    }
    pub fn internal(error: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, error)
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.body.hint = Some(hint.into());
        self
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A request on its way to the loop, with where the answer goes.
pub struct Call {
    pub req: Request,
    pub reply: oneshot::Sender<Result<Reply, Fail>>,
}

type Calls = mpsc::Sender<Call>;

/// Sends a request to the loop and waits for its answer.
async fn ask(tx: &Calls, req: Request) -> Result<Reply, Fail> {
    let (reply, rx) = oneshot::channel();
    let gone = || {
        Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )
    };
    tx.send(Call { req, reply }).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

async fn answer(tx: &Calls, req: Request) -> Response {
    match ask(tx, req).await {
        Ok(Reply::Json(v)) => Json(v).into_response(),
        Ok(Reply::Text(t)) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], t).into_response()
        }
        Err(f) => f.into_response(),
    }
}

/// A JSON body that failed to parse is answered in the API's error shape, not axum's text.
fn json_body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, Fail> {
    b.map(|Json(v)| v)
        .map_err(|e| Fail::bad(format!("request body: {}", e.body_text())))
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, Fail> {
    q.map(|Query(v)| v)
        .map_err(|e| Fail::bad(format!("query: {}", e.body_text())))
}

fn node_id(s: &str) -> Result<u32, Fail> {
    s.parse()
        .map_err(|_| Fail::bad(format!("node id {s:?} is not a number")))
}

/// The control API's routes (`api.rs` lists them).
pub fn api_router(tx: Calls) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(tx): State<Calls>| async move { answer(&tx, Request::Status).await }),
        )
        .route(
            "/v1/config",
            get(|State(tx): State<Calls>| async move { answer(&tx, Request::Config).await }),
        )
        .route(
            "/v1/stats",
            get(|State(tx): State<Calls>| async move { answer(&tx, Request::Stats).await }),
        )
        .route(
            "/v1/observe",
            get(|State(tx): State<Calls>| async move { answer(&tx, Request::Observe).await }),
        )
        .route(
            "/v1/trace",
            get(|State(tx): State<Calls>, q| async move {
                match query::<TraceQuery>(q) {
                    Ok(q) => answer(&tx, Request::Trace(q)).await,
                    Err(f) => f.into_response(),
                }
            }),
        )
        .route(
            "/v1/vips",
            get(|State(tx): State<Calls>| async move { answer(&tx, Request::Vips).await }).post(
                |State(tx): State<Calls>, b| async move {
                    match json_body::<VipAdd>(b) {
                        Ok(v) => answer(&tx, Request::AddVip(Box::new(v))).await,
                        Err(f) => f.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/vips/{vip}",
            axum::routing::delete(
                |State(tx): State<Calls>, UrlPath(vip): UrlPath<String>| async move {
                    answer(&tx, Request::RemoveVip(vip)).await
                },
            ),
        )
        .route(
            "/v1/vips/{vip}/routes",
            get(
                |State(tx): State<Calls>, UrlPath(vip): UrlPath<String>| async move {
                    answer(&tx, Request::Routes(vip)).await
                },
            ),
        )
        .route(
            "/v1/nodes",
            get(|State(tx): State<Calls>| async move { answer(&tx, Request::Nodes).await }).post(
                |State(tx): State<Calls>, b| async move {
                    match json_body::<NodeAdd>(b) {
                        Ok(n) => answer(&tx, Request::AddNode(Box::new(n))).await,
                        Err(f) => f.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/nodes/{id}",
            get(
                |State(tx): State<Calls>, UrlPath(id): UrlPath<String>| async move {
                    match node_id(&id) {
                        Ok(id) => answer(&tx, Request::Node(id)).await,
                        Err(f) => f.into_response(),
                    }
                },
            )
            .delete(
                |State(tx): State<Calls>, UrlPath(id): UrlPath<String>, q| async move {
                    match node_id(&id).and_then(|id| Ok((id, query::<ForceQuery>(q)?))) {
                        Ok((id, q)) => {
                            answer(&tx, Request::RemoveNode { id, force: q.force }).await
                        }
                        Err(f) => f.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/nodes/{id}/drain",
            post(
                |State(tx): State<Calls>, UrlPath(id): UrlPath<String>| async move {
                    match node_id(&id) {
                        Ok(id) => answer(&tx, Request::Drain(id)).await,
                        Err(f) => f.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/nodes/{id}/undrain",
            post(
                |State(tx): State<Calls>, UrlPath(id): UrlPath<String>| async move {
                    match node_id(&id) {
                        Ok(id) => answer(&tx, Request::Undrain(id)).await,
                        Err(f) => f.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/nodes/{id}/weight",
            put(
                |State(tx): State<Calls>, UrlPath(id): UrlPath<String>, b| async move {
                    match node_id(&id).and_then(|id| Ok((id, json_body::<WeightBody>(b)?))) {
                        Ok((id, w)) => {
                            answer(
                                &tx,
                                Request::Weight {
                                    id,
                                    weight: w.weight,
                                },
                            )
                            .await
                        }
                        Err(f) => f.into_response(),
                    }
                },
            ),
        )
        .route(
            "/v1/apply",
            post(|State(tx): State<Calls>, q, text: String| async move {
                match query::<ApplyQuery>(q) {
                    Ok(q) => {
                        answer(
                            &tx,
                            Request::Apply {
                                text,
                                dry_run: q.dry_run,
                            },
                        )
                        .await
                    }
                    Err(f) => f.into_response(),
                }
            }),
        )
        .route("/v1/trace/live", get(live_events))
        .fallback(|| async {
            Fail::not_found("no such endpoint (docs/api.md lists them)").into_response()
        })
        .with_state(tx)
}

/// `GET /v1/trace/live`: the data plane's rare events, one line each, while the client stays.
/// Holding a subscription switches the program's event log on (the loop watches the count);
/// the stream ends when the client goes (hyper drops the body at its next write).
async fn live_events() -> Response {
    use tokio::sync::broadcast::error::RecvError;
    let sub = livelog::subscribe();
    let lines = futures_util::stream::unfold(sub, |mut sub| async move {
        let line = match sub.recv().await {
            Ok(line) => format!("{line}\n"),
            Err(RecvError::Lagged(n)) => format!("({n} events lost: the reader fell behind)\n"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(line), sub))
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// `/metrics` (Prometheus text) and `/` (the status page), both from one observation.
pub fn metrics_router(tx: Calls) -> Router {
    async fn observation(tx: &Calls) -> Result<crate::api::Observation, Fail> {
        match ask(tx, Request::Observe).await? {
            Reply::Json(v) => serde_json::from_value(v).map_err(|e| Fail::internal(e.to_string())),
            Reply::Text(_) => Err(Fail::internal("unexpected reply")),
        }
    }
    Router::new()
        .route(
            "/metrics",
            get(|State(tx): State<Calls>| async move {
                match observation(&tx).await.and_then(|o| {
                    observe::metrics_text(&o).map_err(|e| Fail::internal(e.to_string()))
                }) {
                    Ok(text) => (
                        [(header::CONTENT_TYPE, observe::METRICS_CONTENT_TYPE)],
                        text,
                    )
                        .into_response(),
                    Err(f) => f.into_response(),
                }
            }),
        )
        .route(
            "/",
            get(|State(tx): State<Calls>| async move {
                match observation(&tx).await {
                    Ok(o) => axum::response::Html(observe::status_page(&o)).into_response(),
                    Err(f) => f.into_response(),
                }
            }),
        )
        .with_state(tx)
}

/// Binds the API socket, root-only (mode 0600). A socket file left by a dead daemon is
/// replaced: the caller holds the instance lock, so no live daemon owns it.
pub fn bind_api(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    // The socket is created with mode 0600 (umask), so it is never reachable by others, not
    // even between bind and chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Serves the API on `listener` until the task is aborted.
pub fn spawn_api(listener: tokio::net::UnixListener, tx: Calls, path: PathBuf) -> Server {
    let shown = path.clone();
    let mut s = Server::spawn(async move {
        if let Err(e) = axum::serve(listener, api_router(tx)).await {
            tracing::error!("API socket {}: {e}", shown.display());
        }
    });
    s.socket = Some(path);
    s
}

/// Binds the metrics address.
pub fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    };
    bind().with_context(|| format!("binding the metrics address {addr}"))
}

/// Serves `/metrics` and `/` on `listener` until the task is aborted.
pub fn spawn_metrics(listener: tokio::net::TcpListener, tx: Calls) -> Server {
    Server::spawn(async move {
        if let Err(e) = axum::serve(listener, metrics_router(tx)).await {
            tracing::error!("metrics server: {e}");
        }
    })
}

/// A running server task, stopped when dropped (its Unix socket file removed then, so a
/// stopped daemon leaves no socket for `lb` to find and be refused by).
pub struct Server {
    task: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
}

impl Server {
    /// Runs `f` as a task owned by the returned value.
    pub fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self {
            task: tokio::spawn(f),
            socket: None,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}
