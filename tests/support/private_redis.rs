//! A `redis-server` of a test's own, on a free 127.0.0.1 port: for tests that stop, pause or
//! restart the store, which must never touch the shared server on 6379. The binary must be on
//! PATH; without it the test fails, never skips.

#![cfg(feature = "redis")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_fhir_async::JobId;

const SECOND: Duration = Duration::from_secs(1);

/// A fresh directory under the system's temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tower-fhir-async-outage-{}", JobId::new()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` child process; dropping it kills the process, so none is left behind even
/// when the test panics.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on `port` with its data in `dir` and waits until it answers `PING`.
    pub async fn start(port: u16, dir: &Path) -> Self {
        let mut server = Self {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Starts the server (again) on the same port and directory; the append-only file is
    /// reloaded. Waits until it answers `PING`.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is running already");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server` ({e}). This test runs a Redis server of its own \
                     and needs the redis-server binary on PATH (e.g. `apt-get install redis-server`)"
                )
            });
        self.child = Some(child);
        self.wait_for_ping().await;
    }

    /// SIGSTOP: the server keeps its connections but answers nothing (a stalled store), until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause): the server reads what was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} redis-server failed");
    }

    /// Kills the server and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn wait_for_ping(&mut self) {
        let deadline = Instant::now() + 20 * SECOND;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(exit)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "redis-server on port {} exited ({exit}) before answering PING; its log:\n{}",
                        self.port,
                        self.log()
                    );
                }
            }
            if ping(self.port).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 20 s; its log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a Redis server on `port` answers `PING` with `PONG` (not `-LOADING` while it reads
/// its append-only file).
pub async fn ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 64];
        let read = stream.read(&mut reply).await?;
        Ok::<_, std::io::Error>(reply[..read].starts_with(b"+PONG"))
    };
    matches!(tokio::time::timeout(SECOND, exchange).await, Ok(Ok(true)))
}
