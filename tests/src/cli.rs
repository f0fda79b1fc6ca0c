//! Helpers of the CLI / observability suite (`tests/tests/cli_e2e.rs`): running `lb` with any
//! arguments (another socket, another user), HTTP GET from inside a namespace, a strict reader
//! of the Prometheus / OpenMetrics text exposition, headless Chromium, and a small reader of
//! the HTML Chromium serializes.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{daemon::lb_binary, netns::Netns};

// ---------------------------------------------------------------------------------------------
// Running `lb`
// ---------------------------------------------------------------------------------------------

/// Runs the `lb` binary with exactly `args` (no `--socket` added), whatever its exit status.
pub fn lb(args: &[&str]) -> Result<Output> {
    lb_with(Command::new(lb_binary()?), args)
}

fn lb_with(mut cmd: Command, args: &[&str]) -> Result<Output> {
    cmd.args(args)
        .env_remove("LB_SOCKET")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running lb {}", args.join(" ")))
}

/// A copy of `lb` that any user can run (the build tree may not be readable by others), in a
/// scratch directory removed on drop.
pub struct PublicLb {
    dir: crate::daemon::TempDir,
    pub path: PathBuf,
}

impl PublicLb {
    pub fn new() -> Result<Self> {
        let dir = crate::daemon::TempDir::new("publb")?;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.0.join("lb");
        std::fs::copy(lb_binary()?, &path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir, path })
    }

    /// Runs this copy as uid/gid `id` (no supplementary groups) with exactly `args`.
    pub fn run_as(&self, id: u32, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.path);
        cmd.current_dir(&self.dir.0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(id) != 0
                    || libc::setuid(id) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        lb_with(cmd, args)
    }
}

/// A failed command's stderr, checked: exit code non-zero, the first line `lb: error: ...`,
/// no other `lb: error` line. Returns the first line without its prefix.
pub fn one_error_line(what: &str, out: &Output) -> Result<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "{what}: exited 0 (stdout {:?}, stderr {stderr:?})",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut lines = stderr.lines();
    let first = lines.next().unwrap_or_default();
    let Some(msg) = first.strip_prefix("lb: error: ") else {
        bail!("{what}: first stderr line is not `lb: error: ...`: {stderr:?}");
    };
    ensure!(
        !lines.any(|l| l.contains("lb: error")),
        "{what}: more than one error line: {stderr:?}"
    );
    Ok(msg.to_string())
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// An HTTP reply.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from a thread inside `ns` (plain HTTP/1.1, `Connection: close`).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<HttpReply> {
    let path = path.to_string();
    ns.spawn(move || get(addr, &path))
        .join()
        .map_err(|_| anyhow::anyhow!("HTTP client thread panicked"))?
}

/// [`http_get`] retried until it answers 200 or `timeout` passes.
pub fn http_get_ok(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    let start = Instant::now();
    loop {
        let r = http_get(ns, addr, path);
        match r {
            Ok(r) if r.status == 200 => return Ok(r),
            Ok(r) if start.elapsed() > timeout => {
                bail!("GET {path} answered {}: {}", r.status, r.body)
            }
            Err(e) if start.elapsed() > timeout => return Err(e),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> Result<HttpReply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the reply")?;
    parse_reply(&raw)
}

/// One request on the daemon's Unix API socket (`body`, if any, as JSON).
pub fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpReply> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the reply")?;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Result<HttpReply> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the reply's headers")?;
    let head = String::from_utf8(raw[..split].to_vec()).context("headers are not UTF-8")?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    ensure!(
        parts.next().is_some_and(|v| v.starts_with("HTTP/1.")),
        "bad status line {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .with_context(|| format!("bad header line {l:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let reply = HttpReply {
        status,
        headers,
        body: String::new(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body)?;
    } else if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().context("content-length")?;
        ensure!(
            body.len() == len,
            "body of {} bytes, content-length {len}",
            body.len()
        );
    }
    Ok(HttpReply {
        body: String::from_utf8(body).context("body is not UTF-8")?,
        ..reply
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size = std::str::from_utf8(&b[..eol])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(b.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// OpenMetrics text
// ---------------------------------------------------------------------------------------------

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its `# TYPE`, `# HELP` and `# UNIT`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub unit: Option<String>,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample named `name` with (at least) `labels`; an error when there is none or
    /// more than one.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        match found.as_slice() {
            [s] => Ok(s.value),
            [] => bail!("no sample {name}{labels:?}"),
            _ => bail!("{} samples {name}{labels:?}: {found:?}", found.len()),
        }
    }

    /// The sum of the samples named `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn split_name(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// `{k="v",...}` at the start of `s`, and what follows.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut s = s.strip_prefix('{').context("expected {")?;
    if let Some(rest) = s.strip_prefix('}') {
        return Ok((labels, rest));
    }
    loop {
        let (key, rest) = split_name(s);
        ensure!(is_label_name(key), "bad label name {key:?}");
        let mut chars = rest.strip_prefix("=\"").context("expected =\"")?.chars();
        let mut value = String::new();
        loop {
            match chars.next().context("unterminated label value")? {
                '"' => break,
                '\\' => value.push(match chars.next().context("dangling escape")? {
                    '\\' => '\\',
                    '"' => '"',
                    'n' => '\n',
                    c => bail!("bad escape \\{c}"),
                }),
                c => value.push(c),
            }
        }
        ensure!(
            labels.insert(key.to_string(), value).is_none(),
            "label {key} repeated"
        );
        let rest = chars.as_str();
        if let Some(r) = rest.strip_prefix(',') {
            s = r;
        } else {
            return Ok((labels, rest.strip_prefix('}').context("expected , or }")?));
        }
    }
}

fn parse_value(v: &str) -> Result<f64> {
    Ok(match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    })
}

/// Reads `text` strictly as OpenMetrics text: every line is `# HELP`, `# TYPE`, `# UNIT`,
/// the closing `# EOF` (last, once) or a sample `name{labels} value` of the family whose
/// `# TYPE` came last; counter samples are named `<family>_total`, gauge samples `<family>`;
/// a family is described once and its metadata comes before its samples; a `# UNIT` is the
/// family name's suffix; no sample (name and labels) twice.
pub fn parse_openmetrics(text: &str) -> Result<Exposition> {
    let mut out = Exposition::default();
    ensure!(
        text.ends_with("# EOF\n"),
        "the text does not end with `# EOF`"
    );
    let mut current: Option<String> = None;
    let mut seen_samples = BTreeSet::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let at = || format!("line {n}: {line:?}");
        ensure!(!eof, "{}: after # EOF", at());
        ensure!(!line.is_empty(), "{}: empty line", at());
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (Some(kind), Some(name)) = (parts.next(), parts.next()) else {
                bail!("{}: bad metadata", at());
            };
            let arg = parts.next().unwrap_or("");
            ensure!(is_metric_name(name), "{}: bad family name", at());
            let started = current.as_deref() == Some(name);
            let fam = out.families.entry(name.to_string()).or_default();
            match kind {
                "TYPE" => {
                    ensure!(fam.kind.is_empty(), "{}: family described twice", at());
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "stateset",
                            "info",
                            "summary",
                            "unknown"
                        ]
                        .contains(&arg),
                        "{}: unknown type",
                        at()
                    );
                    ensure!(
                        arg != "counter" || !name.ends_with("_total"),
                        "{}: a counter family is named without _total",
                        at()
                    );
                    fam.kind = arg.to_string();
                    current = Some(name.to_string());
                }
                "HELP" => {
                    ensure!(fam.help.is_none(), "{}: HELP twice", at());
                    ensure!(
                        current.is_none() || started || fam.kind.is_empty(),
                        "{}: HELP away from its family",
                        at()
                    );
                    fam.help = Some(arg.to_string());
                }
                "UNIT" => {
                    ensure!(fam.unit.is_none(), "{}: UNIT twice", at());
                    ensure!(
                        !arg.is_empty() && name.ends_with(&format!("_{arg}")),
                        "{}: the unit is not the name's suffix",
                        at()
                    );
                    fam.unit = Some(arg.to_string());
                }
                _ => bail!("{}: unknown metadata", at()),
            }
            continue;
        }
        ensure!(!line.starts_with('#'), "{}: bad comment", at());
        let (name, rest) = split_name(line);
        ensure!(is_metric_name(name), "{}: bad sample name", at());
        let (labels, rest) = if rest.starts_with('{') {
            parse_labels(rest).with_context(at)?
        } else {
            (BTreeMap::new(), rest)
        };
        let value = rest
            .strip_prefix(' ')
            .with_context(|| format!("{}: no value", at()))?;
        // OpenMetrics allows a timestamp after the value; this exporter writes none.
        ensure!(!value.contains(' '), "{}: fields after the value", at());
        let value = parse_value(value).with_context(at)?;
        let family = current
            .as_deref()
            .with_context(|| format!("{}: sample before any TYPE", at()))?;
        let kind = out.families[family].kind.as_str();
        match kind {
            "counter" => {
                ensure!(
                    name == format!("{family}_total") || name == format!("{family}_created"),
                    "{}: a sample of counter {family} must be named {family}_total",
                    at()
                );
                ensure!(
                    name.ends_with("_created") || value >= 0.0,
                    "{}: negative counter",
                    at()
                );
            }
            "gauge" => ensure!(
                name == family && !name.ends_with("_total"),
                "{}: a sample of gauge {family} must be named {family}",
                at()
            ),
            _ => ensure!(name.starts_with(family), "{}: not of family {family}", at()),
        }
        let key = format!("{name}{labels:?}");
        ensure!(seen_samples.insert(key), "{}: sample repeated", at());
        out.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    ensure!(eof, "no # EOF");
    for (name, f) in &out.families {
        ensure!(!f.kind.is_empty(), "family {name} has no TYPE");
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Chromium
// ---------------------------------------------------------------------------------------------

/// Debian's `chromium`, which `cargo xtask setup` installs. Missing is an error, never a skip.
pub fn chromium_binary() -> Result<PathBuf> {
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
    {
        let p = dir.join("chromium");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "chromium is not installed: the status page test needs Debian's headless chromium \
         (`cargo xtask setup` installs it: apt-get install --no-install-recommends chromium)"
    )
}

/// Loads `url` in headless Chromium inside namespace `ns` (`ip netns exec`) and returns the
/// DOM it serializes (`--dump-dom`). Chromium runs in its own process group, killed whole on
/// timeout.
pub fn chromium_dump_dom(ns: &str, url: &str, timeout: Duration) -> Result<String> {
    let chromium = chromium_binary()?;
    let profile = crate::daemon::TempDir::new("chromium")?;
    let out_file = profile.0.join("dom.html");
    let err_file = profile.0.join("stderr.txt");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--mute-audio",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.0.join("profile").display()
        ))
        .args(["--dump-dom", url])
        .env("HOME", &profile.0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file)?)
        .stderr(std::fs::File::create(&err_file)?)
        .process_group(0)
        .spawn()
        .context("starting chromium")?;
    let pgid = child.id() as i32;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > timeout {
            // SAFETY: kill(2) on the process group of the child started above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "chromium did not finish loading {url} within {timeout:?}; its stderr: {}",
                tail(&err_file)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Helpers it forked (zygote, renderer) go with it.
    // SAFETY: kill(2) on the process group of the child started above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let dom = std::fs::read_to_string(&out_file)?;
    ensure!(
        status.success() && !dom.trim().is_empty(),
        "chromium --dump-dom {url}: {status}, {} bytes of DOM; its stderr: {}",
        dom.len(),
        tail(&err_file)
    );
    Ok(dom)
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.contains("dbus")).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// HTML as Chromium serializes it
// ---------------------------------------------------------------------------------------------

/// A start tag: its name, attributes, and where it starts and ends in the document.
#[derive(Clone, Debug)]
pub struct Element {
    pub tag: String,
    pub attrs: BTreeMap<String, String>,
    pub start: usize,
    /// Just past the start tag's `>`.
    pub inner: usize,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    pub fn has_class(&self, class: &str) -> bool {
        self.attr("class")
            .is_some_and(|c| c.split_whitespace().any(|x| x == class))
    }
}

/// Every start tag of `html`, in document order (a serialized DOM: attributes quoted with
/// `"`, no `>` inside attribute values).
pub fn elements(html: &str) -> Vec<Element> {
    let mut out = Vec::new();
    let b = html.as_bytes();
    let mut i = 0;
    while let Some(off) = html[i..].find('<') {
        let start = i + off;
        i = start + 1;
        if !b.get(i).is_some_and(u8::is_ascii_alphabetic) {
            continue;
        }
        let name_end = html[i..]
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .map_or(html.len(), |e| i + e);
        let tag = html[i..name_end].to_ascii_lowercase();
        let mut attrs = BTreeMap::new();
        let mut j = name_end;
        loop {
            while b
                .get(j)
                .is_some_and(|c| c.is_ascii_whitespace() || *c == b'/')
            {
                j += 1;
            }
            match b.get(j) {
                None => break,
                Some(b'>') => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            let an_end = html[j..]
                .find(|c: char| c.is_whitespace() || c == '=' || c == '>')
                .map_or(html.len(), |e| j + e);
            let name = html[j..an_end].to_ascii_lowercase();
            j = an_end;
            let mut value = String::new();
            if b.get(j) == Some(&b'=') {
                j += 1;
                if b.get(j) == Some(&b'"') {
                    let end = html[j + 1..].find('"').map_or(html.len(), |e| j + 1 + e);
                    value = unescape(&html[j + 1..end]);
                    j = end + 1;
                } else {
                    let end = html[j..]
                        .find(|c: char| c.is_whitespace() || c == '>')
                        .map_or(html.len(), |e| j + e);
                    value = unescape(&html[j..end]);
                    j = end;
                }
            }
            attrs.insert(name, value);
        }
        out.push(Element {
            tag,
            attrs,
            start,
            inner: j.min(html.len()),
        });
        i = j.max(i);
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The text of `html[from..to]` with tags removed and entities decoded.
pub fn text_of(html: &str, from: usize, to: usize) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html[from..to].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    unescape(out.trim())
}

/// The cells' texts of the table row starting at `row` (up to its `</tr>`).
pub fn row_cells(html: &str, row: &Element) -> Vec<String> {
    let end = html[row.inner..]
        .find("</tr>")
        .map_or(html.len(), |e| row.inner + e);
    let mut cells = Vec::new();
    let mut i = row.inner;
    while let Some(off) = html[i..end].find("<t") {
        let s = i + off;
        let Some(gt) = html[s..end].find('>') else {
            break;
        };
        let is_cell = matches!(&html[s + 2..s + 3], "d" | "h")
            && matches!(html.as_bytes()[s + 3], b'>' | b' ');
        if !is_cell {
            i = s + 2;
            continue;
        }
        let body = s + gt + 1;
        let close = html[body..end].find("</t").map_or(end, |e| body + e);
        cells.push(text_of(html, body, close));
        i = close + 1;
    }
    cells
}
