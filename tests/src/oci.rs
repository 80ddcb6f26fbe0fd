//! The real parts the OCI tests use: images built with `umoci` (layer by layer, each from the
//! last, as a Containerfile's steps are), copied with `skopeo`, served by Debian's
//! `docker-registry` (the reference distribution server) on 127.0.0.1, with a token server for
//! the registry that requires one and a proxy that cuts a download half-way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OCI image layout that `umoci` builds images in.
#[derive(Debug)]
pub struct Layout {
    pub dir: PathBuf,
    work: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path, work: &Path) -> Self {
        run(Command::new("umoci").args(["init", "--layout"]).arg(dir));
        std::fs::create_dir_all(work).unwrap();
        Self {
            dir: dir.to_owned(),
            work: work.to_owned(),
        }
    }

    /// A layout another tool wrote.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            work: dir.to_owned(),
        }
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.dir.display())
    }

    /// Tags `to` as `from` (an empty image when None) with one layer more: what `change`
    /// does to the unpacked root filesystem, recorded in the history as `created_by`.
    pub fn layer(
        &self,
        from: Option<&str>,
        to: &str,
        created_by: &str,
        change: impl FnOnce(&Path),
    ) {
        let from = match from {
            Some(from) => from.to_owned(),
            None => {
                let empty = format!("{to}-empty");
                run(Command::new("umoci")
                    .args(["new", "--image"])
                    .arg(self.image(&empty)));
                empty
            }
        };
        let bundle = self.work.join(format!("bundle-{to}"));
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(self.image(&from))
            .arg(&bundle));
        change(&bundle.join("rootfs"));
        run(Command::new("umoci")
            .args(["repack", "--image"])
            .arg(self.image(to))
            .args(["--history.created_by", created_by])
            .arg(&bundle));
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    /// The image `tag` unpacked by umoci: what a container runtime would run.
    pub fn unpack(&self, tag: &str, into: &Path) -> PathBuf {
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(self.image(tag))
            .arg(into));
        into.join("rootfs")
    }

    /// `skopeo copy oci:LAYOUT:TAG DEST`, with more arguments before the two.
    pub fn copy(&self, tag: &str, dest: &str, args: &[&str]) {
        run(Command::new("skopeo")
            .args(["copy", "-q"])
            .args(args)
            .arg(format!("oci:{}", self.image(tag)))
            .arg(dest));
    }
}

/// A free port on 127.0.0.1 (bound and let go: the registry takes it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `port`.
fn wait_listening(port: u16, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not start listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Debian's `docker-registry` on 127.0.0.1, storing under `dir`, killed when dropped.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    pub log: PathBuf,
}

impl Registry {
    /// Starts a registry; `auth` is the `auth:` section of its configuration, if any.
    pub fn start(dir: &Path, auth: Option<&str>) -> Self {
        let port = free_port();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{}",
                storage.display(),
                auth.unwrap_or_default()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("registry.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting docker-registry");
        wait_listening(port, "docker-registry");
        Self {
            child,
            port,
            storage,
            log,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The file a blob is kept in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token server for a registry with `auth: token:`: it gives a JWT signed with its own key
/// (RS256, by the `openssl` command, the certificate in the `x5c` header) to a client that
/// gives the right user and password, for the scope asked.
#[derive(Debug)]
pub struct TokenServer {
    pub port: u16,
    pub cert: PathBuf,
    /// Tokens given.
    pub given: Arc<AtomicU64>,
}

pub const TOKEN_SERVICE: &str = "strata-registry";
const TOKEN_ISSUER: &str = "strata-test-issuer";

impl TokenServer {
    pub fn start(dir: &Path, user: &str, password: &str) -> Self {
        let key = dir.join("token.key");
        let cert = dir.join("token.pem");
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=strata-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let given = Arc::new(AtomicU64::new(0));
        let counter = given.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some((target, headers)) = read_head(&mut stream) else {
                    continue;
                };
                let authorized = headers
                    .iter()
                    .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && *v == expected);
                if !authorized {
                    let _ = stream.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let scopes: Vec<String> = target
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or_default()
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("scope="))
                    .map(percent_decode)
                    .collect();
                let token = sign_token(&key, &x5c, &scopes);
                counter.fetch_add(1, Ordering::SeqCst);
                let body = format!("{{\"token\":\"{token}\",\"expires_in\":3600}}");
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        Self { port, cert, given }
    }

    /// The registry's `auth:` section for this server.
    pub fn registry_auth(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.port,
            self.cert.display()
        )
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JWT for `scopes` (`repository:NAME:ACTIONS`), signed RS256 by `openssl dgst`.
fn sign_token(key: &Path, x5c: &str, scopes: &[String]) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": "strata", "aud": TOKEN_SERVICE,
        "exp": now + 3600, "nbf": now - 60, "iat": now,
        "jti": format!("{now}-{}", std::process::id()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!("{signing_input}.{}", b64(&out.stdout))
}

/// Reads a request's head: its target and headers.
fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<(String, String)>)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let target = line.split_whitespace().nth(1)?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Some((target, headers))
}

/// Each request's target and `Range` header, in order.
pub type Requests = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A proxy in front of a registry that, once armed, cuts the answer to a request whose path
/// holds a given text after a number of body bytes; it records each request's target and
/// `Range` header.
#[derive(Debug)]
pub struct CuttingProxy {
    pub port: u16,
    cut: Arc<Mutex<Option<(String, u64)>>>,
    pub requests: Requests,
    pub cuts_made: Arc<AtomicBool>,
    /// Bytes of answers passed on (heads and bodies): what the client downloaded.
    pub moved: Arc<AtomicU64>,
}

impl CuttingProxy {
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut: Arc<Mutex<Option<(String, u64)>>> = Arc::new(Mutex::new(None));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let cuts_made = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(AtomicU64::new(0));
        let (c, r, m, b) = (
            cut.clone(),
            requests.clone(),
            cuts_made.clone(),
            moved.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(client) = stream else { continue };
                let (c, r, m, b) = (c.clone(), r.clone(), m.clone(), b.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(client, upstream, &c, &r, &m, &b);
                });
            }
        });
        Self {
            port,
            cut,
            requests,
            cuts_made,
            moved,
        }
    }

    /// Cuts the next answer to a request whose path holds `path_part` after `after` bytes.
    pub fn arm(&self, path_part: &str, after: u64) {
        *self.cut.lock().unwrap() = Some((path_part.to_owned(), after));
    }
}

/// Forwards one request (a GET, or a HEAD: no body) with `Connection: close`, then the answer,
/// cut when armed for it.
fn proxy_one(
    mut client: TcpStream,
    upstream: u16,
    cut: &Mutex<Option<(String, u64)>>,
    requests: &Mutex<Vec<(String, Option<String>)>>,
    cuts_made: &AtomicBool,
    moved: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let target = first
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut head = first.clone();
    let mut range = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim_end().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if lower.starts_with("range:") {
            range = Some(line.split_once(':').unwrap().1.trim().to_owned());
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    requests.lock().unwrap().push((target.clone(), range));
    let limit = {
        let mut armed = cut.lock().unwrap();
        match armed.as_ref() {
            Some((part, after)) if target.contains(part.as_str()) => {
                let after = *after;
                *armed = None;
                Some(after)
            }
            _ => None,
        }
    };
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(head.as_bytes())?;
    let mut from = BufReader::new(server);
    // The answer's head, whole; then its body, cut when armed.
    loop {
        let mut line = String::new();
        if from.read_line(&mut line)? == 0 {
            break;
        }
        client.write_all(line.as_bytes())?;
        moved.fetch_add(line.len() as u64, Ordering::SeqCst);
        if line == "\r\n" {
            break;
        }
    }
    match limit {
        Some(after) => {
            let mut body = from.take(after);
            let n = std::io::copy(&mut body, &mut client)?;
            moved.fetch_add(n, Ordering::SeqCst);
            cuts_made.store(true, Ordering::SeqCst);
            client.flush()?;
            client.shutdown(Shutdown::Both)?;
        }
        None => {
            let n = std::io::copy(&mut from, &mut client)?;
            moved.fetch_add(n, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// Bytes that do not compress: a layer that is mostly this is as large in the registry as on
/// disk.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Reads a whole file, for comparing.
pub fn read(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    bytes
}

/// A plain HTTP server for the files of a directory (GET only, one request per connection),
/// as any web server would serve a channel and its bundles; it records the paths asked for.
#[derive(Debug)]
pub struct FileServer {
    pub port: u16,
    pub asked: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    pub fn start(root: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (root, log) = (root.to_owned(), asked.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some((target, _)) = read_head(&mut stream) else {
                    continue;
                };
                log.lock().unwrap().push(target.clone());
                let rel = target.trim_start_matches('/');
                let answer = if rel.split('/').any(|c| c == ".." || c.is_empty()) {
                    None
                } else {
                    std::fs::read(root.join(rel)).ok()
                };
                let _ = match answer {
                    Some(body) => stream
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| stream.write_all(&body)),
                    None => stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            }
        });
        Self { port, asked }
    }

    pub fn url(&self, rel: &str) -> String {
        format!("http://127.0.0.1:{}/{rel}", self.port)
    }
}
