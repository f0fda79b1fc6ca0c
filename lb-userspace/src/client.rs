//! A small client of the daemon's local API (`api.rs`): one HTTP/1.1 request per connection
//! over the Unix socket, whole replies for ordinary calls and a line stream for
//! `/v1/trace/live`. Every failure becomes a [`ClientError`]: what went wrong in the
//! operator's terms (not running, not root, the daemon said no) and what to do about it.
use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http1::{self, SendRequest},
    header::{CONTENT_TYPE, HOST},
};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api::ApiError;

/// How long an ordinary call may take: changes are validated, written and persisted before
/// the reply, which takes well under a second even for whole tables; a daemon silent this long
/// is stuck, and the operator is better served by an error than by a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed call, as the operator reads it: `lb: error: <error>`, then `hint: <hint>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ClientError {
    pub error: String,
    pub hint: Option<String>,
}

impl ClientError {
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> Self {
        Self {
            error: e.error,
            hint: e.hint,
        }
    }
}

/// The hint of an error, if it carries one (a [`ClientError`] anywhere in its chain).
pub fn hint_of(e: &anyhow::Error) -> Option<&str> {
    e.downcast_ref::<ClientError>()?.hint.as_deref()
}

/// A request body.
pub enum Body {
    Empty,
    Json(serde_json::Value),
    Text(String),
}

/// A JSON reply: the typed value for rendering and the document as sent, for `--json`
/// (which then shows everything the daemon said, fields this client does not know included).
#[derive(Clone, Debug)]
pub struct Json<T> {
    pub value: T,
    pub raw: serde_json::Value,
}

/// The API at one socket path.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One call, whole reply body (2xx only).
    pub async fn call(&self, method: Method, path: &str, body: Body) -> Result<Bytes, ClientError> {
        let what = format!("{method} {path}");
        let read = async {
            let (resp, _sender) = self.send(method, path, body).await?;
            resp.into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| self.broken(&e))
        };
        tokio::time::timeout(CALL_TIMEOUT, read)
            .await
            .map_err(|_| {
                ClientError::new(format!(
                    "no reply from the balancer on {} to {what} within {}s",
                    self.socket.display(),
                    CALL_TIMEOUT.as_secs()
                ))
                .with_hint("it may be stuck: look at its log")
            })?
    }

    /// One call whose reply is JSON.
    pub async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<Json<T>, ClientError> {
        let what = format!("{method} {path}");
        let bytes = self.call(method, path, body).await?;
        let unexpected = |e: serde_json::Error| {
            ClientError::new(format!(
                "unexpected reply from the balancer on {} to {what}: {e}",
                self.socket.display()
            ))
            .with_hint(
                "is this `lb` the same version as the daemon? (`lb status` shows its version)",
            )
        };
        let raw: serde_json::Value = serde_json::from_slice(&bytes).map_err(unexpected)?;
        let value = T::deserialize(&raw).map_err(unexpected)?;
        Ok(Json { value, raw })
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<Json<T>, ClientError> {
        self.call_json(Method::GET, path, Body::Empty).await
    }

    /// A GET whose reply body is read line by line as the daemon writes it (no timeout:
    /// the stream is open for as long as the operator watches).
    pub async fn stream_lines(&self, path: &str) -> Result<LineStream, ClientError> {
        let (resp, sender) = self.send(Method::GET, path, Body::Empty).await?;
        Ok(LineStream {
            socket: self.socket.clone(),
            body: resp.into_body(),
            buf: Vec::new(),
            done: false,
            _sender: sender,
        })
    }

    /// Connects, sends one request and returns a 2xx response (its body unread) with the
    /// connection's sender, which the caller keeps while it reads the body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
    ) -> Result<(Response<Incoming>, SendRequest<Full<Bytes>>), ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(&e))?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.broken(&e))?;
        // The connection is driven on its own task; its errors surface through the
        // response or the body, so the task's own result says nothing new.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let builder = Request::builder()
            .method(method)
            .uri(path)
            // HTTP/1.1 requires a Host; there is none on a Unix socket.
            .header(HOST, "localhost");
        let req = match body {
            Body::Empty => builder.body(Full::new(Bytes::new())),
            Body::Json(v) => builder
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(v.to_string()))),
            Body::Text(t) => builder
                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Full::new(Bytes::from(t))),
        }
        .map_err(|e| ClientError::new(format!("bad request {path:?}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.broken(&e))?;
        if resp.status().is_success() {
            return Ok((resp, sender));
        }
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(status_error(status, &body))
    }

    fn connect_error(&self, e: &io::Error) -> ClientError {
        let socket = self.socket.display();
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::new(format!("no balancer is running on {socket}"))
                    .with_hint("start one with `lb run` (or `cargo xtask run`), or pass --socket")
            }
            io::ErrorKind::PermissionDenied => {
                ClientError::new(format!("permission denied on {socket}"))
                    .with_hint("the API is root-only: use sudo")
            }
            _ => ClientError::new(format!("connecting to {socket}: {e}")),
        }
    }

    /// The connection failed after it was made: the daemon closed it or died mid-call.
    fn broken(&self, e: &hyper::Error) -> ClientError {
        ClientError::new(format!(
            "the balancer on {} broke off the call: {e}",
            self.socket.display()
        ))
        .with_hint("look at its log; a change that was cut off may or may not have been applied: check with `lb status`")
    }
}

/// A non-2xx reply: the daemon's [`ApiError`] when it sent one, else status and body text.
fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        return e.into();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        ClientError::new(format!("the balancer answered {status}"))
    } else {
        ClientError::new(format!("the balancer answered {status}: {text}"))
    }
}

/// The body of a streaming reply, line by line.
pub struct LineStream {
    socket: PathBuf,
    body: Incoming,
    buf: Vec<u8>,
    done: bool,
    /// Kept so the connection lives as long as the stream is read.
    _sender: SendRequest<Full<Bytes>>,
}

impl LineStream {
    /// The next line (without its end), or `None` once the daemon closed the stream.
    pub async fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(text_line(&line)));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(text_line(&rest)));
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => {
                    return Err(ClientError::new(format!(
                        "the balancer on {} broke off the stream: {e}",
                        self.socket.display()
                    )));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn text_line(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    s.trim_end_matches(['\n', '\r']).to_string()
}

/// Percent-encodes a path segment or query value: everything but RFC 3986's unreserved
/// characters, so a VIP name (`[2001:db8::1]:443/tcp`) stays one segment.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?k=v&...` with encoded values.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    format!("?{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_body_becomes_error_and_hint() {
        let body = br#"{"error":"unknown node 9","hint":"see lb node list"}"#;
        let e = status_error(StatusCode::NOT_FOUND, body);
        assert_eq!(e.error, "unknown node 9");
        assert_eq!(e.hint.as_deref(), Some("see lb node list"));
    }

    #[test]
    fn other_error_body_keeps_status_and_text() {
        let e = status_error(StatusCode::BAD_GATEWAY, b"upstream gone\n");
        assert_eq!(
            e.error,
            "the balancer answered 502 Bad Gateway: upstream gone"
        );
        assert_eq!(e.hint, None);
        let e = status_error(StatusCode::INTERNAL_SERVER_ERROR, b"");
        assert_eq!(e.error, "the balancer answered 500 Internal Server Error");
    }

    /// A one-shot server on a fresh socket: reads one request head and answers with each
    /// of `parts` in turn (a pause between them, so a streaming reader sees them arrive
    /// apart), then closes. Yields the request head.
    fn serve_once(name: &str, parts: Vec<Vec<u8>>) -> (PathBuf, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let path =
            std::env::temp_dir().join(format!("lb-client-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed before its request head ended");
                head.extend_from_slice(&buf[..n]);
            }
            for p in parts {
                conn.write_all(&p).await.unwrap();
                conn.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        (path, task)
    }

    #[tokio::test]
    async fn refused_call_carries_the_daemons_error_and_hint() {
        let body = br#"{"error":"node 3 is the last live node of 198.51.100.1:80/tcp","hint":"pass --force"}"#;
        let head = format!(
            "HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let (path, server) = serve_once("refused", vec![head.into_bytes(), body.to_vec()]);
        let c = Client::new(&path);
        let e = c
            .call_json::<serde_json::Value>(Method::DELETE, "/v1/nodes/3?force=false", Body::Empty)
            .await
            .unwrap_err();
        assert_eq!(
            e.error,
            "node 3 is the last live node of 198.51.100.1:80/tcp"
        );
        assert_eq!(e.hint.as_deref(), Some("pass --force"));
        let req = server.await.unwrap();
        assert!(
            req.starts_with("DELETE /v1/nodes/3?force=false HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase().contains("host: localhost"),
            "{req}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn json_reply_keeps_the_raw_document() {
        let (path, server) = serve_once(
            "json",
            vec![b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 33\r\n\r\n{\"weight\":3,\"unknown_field\":true}".to_vec()],
        );
        let c = Client::new(&path);
        let body = serde_json::json!({ "weight": 3 });
        let r = c
            .call_json::<crate::api::WeightBody>(
                Method::PUT,
                "/v1/nodes/1/weight",
                Body::Json(body),
            )
            .await
            .unwrap();
        assert_eq!(r.value.weight, Some(3));
        assert_eq!(r.raw["unknown_field"], true);
        let req = server.await.unwrap();
        assert!(
            req.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{req}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn stream_yields_lines_as_they_arrive() {
        let (path, server) = serve_once(
            "stream",
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
                    .to_vec(),
                b"drop no_backend 198.51.100.1:80/tcp\nevict ".to_vec(),
                b"node 2\r\n".to_vec(),
                b"last without newline".to_vec(),
            ],
        );
        let mut s = Client::new(&path)
            .stream_lines("/v1/trace/live")
            .await
            .unwrap();
        assert_eq!(
            s.next_line().await.unwrap().as_deref(),
            Some("drop no_backend 198.51.100.1:80/tcp")
        );
        assert_eq!(
            s.next_line().await.unwrap().as_deref(),
            Some("evict node 2")
        );
        assert_eq!(
            s.next_line().await.unwrap().as_deref(),
            Some("last without newline")
        );
        assert_eq!(s.next_line().await.unwrap(), None);
        server.await.unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn missing_socket_says_not_running() {
        let c = Client::new("/nonexistent/lb-test.sock");
        let e = c
            .get_json::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err();
        assert_eq!(
            e.error,
            "no balancer is running on /nonexistent/lb-test.sock"
        );
        assert!(e.hint.unwrap_or_default().contains("lb run"));
    }
}
