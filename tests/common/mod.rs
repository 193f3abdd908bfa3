//! Shared helpers for tests that run a real nats-server and the real `fraudgate` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fraudgate::demo::NatsServer;
use tokio::process::{Child, Command};

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "fraudgate-test-{name}-{}-{}-{}",
            std::process::id(),
            fraudgate::service::now_ms(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn nats() -> NatsServer {
    NatsServer::start(false)
        .await
        .expect("nats-server must be installed (scripts/test installs it)")
}

/// A running `fraudgate run` child with a private copy of the shipped rules.
pub struct Engine {
    pub child: Child,
    pub dir: Scratch,
    pub rules: PathBuf,
    pub log: PathBuf,
}

pub const CONFIG: &str = r#"
[log]
format = "json"
level = "info"
[limits]
max_payload = 2048
[service]
reload_debounce = "100ms"
workers = 4
"#;

/// The entity hash key of every test engine (see [`daytime_engine_table`]).
pub const TEST_HASH_KEY: &str = "test-only-secret";

/// An `[engine]` table whose time zone puts the local time at about noon now. The shipped
/// rules hold large amounts at night (local_hour < 6); transactions without `ts` use the
/// receive time, so without this the tests' decisions would depend on when they run.
pub fn daytime_engine_table() -> String {
    let utc_hour = (fraudgate::service::now_ms() / 3_600_000).rem_euclid(24);
    let offset = 12 - utc_hour; // -11 ..= 12
                                // Etc/GMT zones have the POSIX sign: Etc/GMT-5 is UTC+5.
    let zone = match offset {
        0 => "Etc/GMT".to_string(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    // A key of its own, as production must have one (an engine with snapshots refuses to
    // start under the built-in key).
    format!("\n[engine]\ntimezone = \"{zone}\"\nhash_key = \"{TEST_HASH_KEY}\"\n")
}

/// Spawns `cmd`, killed when the test ends: dropped (`kill_on_drop`), or, should the test
/// process be killed (a timeout, ctrl-C), by the kernel (`die_with_parent`), so no engine,
/// nats-server or Prometheus outlives the run.
pub fn spawned(cmd: &mut Command) -> Child {
    fraudgate::demo::die_with_parent(cmd);
    cmd.kill_on_drop(true).spawn().unwrap()
}

impl Engine {
    pub async fn start(url: &str) -> Engine {
        Self::start_with(url, CONFIG).await
    }

    pub async fn start_with(url: &str, config: &str) -> Engine {
        Self::start_env(url, config, &[]).await
    }

    pub async fn start_env(url: &str, config: &str, env: &[(&str, &str)]) -> Engine {
        let e = Self::spawn_env(url, config, env);
        e.wait_log("taking transactions", Duration::from_secs(20))
            .await;
        e
    }

    /// Starts the engine without waiting for it to take transactions.
    pub fn spawn_env(url: &str, config: &str, env: &[(&str, &str)]) -> Engine {
        let dir = Scratch::new("engine");
        let rules = dir.0.join("rules");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"), &rules);
        let cfg = dir.0.join("fraudgate.toml");
        let mut config = config.to_string();
        if !config.contains("[engine]") {
            config.push_str(&daytime_engine_table());
        }
        std::fs::write(&cfg, config).unwrap();
        let log = dir.0.join("engine.log");
        let child = spawned(
            Command::new(env!("CARGO_BIN_EXE_fraudgate"))
                .args(["run", "--nats-url", url, "--rules"])
                .arg(&rules)
                .arg("--config")
                .arg(&cfg)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        Engine {
            child,
            dir,
            rules,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the engine's log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("engine log never showed {needle:?}:\n{}", self.log_text());
    }

    /// The engine's final JSON log line (`"stopped"`, with its counts).
    pub fn stopped_line(&self) -> serde_json::Value {
        let log = self.log_text();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == "stopped")
            .unwrap_or_else(|| panic!("no final line:\n{log}"))
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Log lines that hold every one of `needles`.
    pub fn count_log_lines(&self, needles: &[&str]) -> usize {
        let text = self.log_text();
        text.lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Writes a rule file the way editors do: a temp file renamed over the target.
    pub fn write_rule_file(&self, name: &str, text: &str) {
        let tmp = self.rules.join(format!(".{name}.swp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.rules.join(name)).unwrap();
    }
}

/// Waits (up to 5 s) until something listens on the local `port`: a server this test
/// started itself.
pub async fn wait_listening(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn client(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.unwrap()
}

/// Sends a request to fraud.check and parses the JSON reply.
pub async fn check(client: &async_nats::Client, body: &str) -> serde_json::Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("fraud.check", Bytes::from(body.to_string())),
    )
    .await
    .expect("reply within 5 s")
    .expect("request");
    serde_json::from_slice(&msg.payload).expect("JSON reply")
}

/// A transaction JSON with clean attributes (no rule fires unless the fields say so).
pub fn txn(id: &str, card: &str, amount: &str) -> String {
    serde_json::json!({
        "id": id, "card": card, "amount": amount, "currency": "EUR",
        "merchant": "m-test", "region": "DE", "mcc": 5411,
        "attrs": {"phone_match": true, "address_match": true, "ip_country": "DE",
                  "merchant_age_days": 900, "device_age_days": 300},
    })
    .to_string()
}

/// Sends SIGTERM and waits for a clean exit.
pub async fn stop(engine: Engine) -> Engine {
    stop_timed(engine).await.0
}

/// Sends SIGTERM, waits (at most 60 s) for a clean exit (0), and says how long it took.
pub async fn stop_timed(engine: Engine) -> (Engine, Duration) {
    let (engine, took, status) = stop_status(engine).await;
    assert!(status.success(), "{status}:\n{}", engine.log_text());
    (engine, took)
}

/// Sends SIGTERM and waits (at most 60 s) for the exit: how long it took, and its status.
pub async fn stop_status(mut engine: Engine) -> (Engine, Duration, std::process::ExitStatus) {
    let started = Instant::now();
    engine.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), engine.child.wait())
        .await
        .expect("exits")
        .unwrap();
    (engine, started.elapsed(), status)
}

/// Every window value of every key in a snapshot file, read at `at_ms` (with the shipped
/// rules and the default engine settings, under the tests' hash key).
pub fn windows_in(path: &Path, at_ms: i64) -> Vec<(String, fraudgate::keyhash::StateKey, String)> {
    let cfg = fraudgate::EngineConfig {
        hash_key: fraudgate::keyhash::HashKey::from_secret(TEST_HASH_KEY),
        ..Default::default()
    };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let engine = fraudgate::Engine::new(fraudgate::load_dir(&rules, &cfg).unwrap(), cfg);
    engine
        .restore(fraudgate::snapshot::read(path).unwrap())
        .unwrap();
    engine.window_values(at_ms)
}

/// The engine's `/metrics` text on `port`, or `None` when it does not answer within 1 s.
pub async fn metrics_text(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(1), get)
        .await
        .ok()
        .flatten()
}

/// The value of one series (`name{labels}` exactly as the exporter writes it) in a
/// `/metrics` text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A TCP proxy in front of a nats-server that can stop reading what one named client
/// sends (`CONNECT` with `"name":"<name>"`), as a server node that hangs would, while the
/// server's messages to that client still go through and every other connection is
/// untouched. A connection of that name made while it is frozen is frozen too.
pub struct Proxy {
    pub port: u16,
    frozen: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(upstream_port: u16) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (names, spawned) = (frozen.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let names = names.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    // What the client sent until its name was read (CONNECT may come in parts).
                    let mut head = Vec::new();
                    let mut name: Option<String> = None;
                    loop {
                        let is_frozen = name
                            .as_ref()
                            .is_some_and(|n| names.lock().unwrap().contains(n));
                        if is_frozen {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if name.is_none() && head.len() < 64 * 1024 {
                            head.extend_from_slice(&buf[..n]);
                            let text = String::from_utf8_lossy(&head);
                            if let Some(rest) = text.split("\"name\":\"").nth(1) {
                                if let Some((found, _)) = rest.split_once('"') {
                                    name = Some(found.to_string());
                                }
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                spawned.lock().unwrap().extend([down, up]);
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy {
            port,
            frozen,
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops (or resumes) reading from the connections of client `name`.
    pub fn freeze(&self, name: &str, frozen: bool) {
        let mut names = self.frozen.lock().unwrap();
        if frozen {
            names.insert(name.to_string());
        } else {
            names.remove(name);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}
