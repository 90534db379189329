//! A PostgreSQL cluster of a test's own (`initdb` in a temporary directory, one `postgres` on a
//! free 127.0.0.1 port, trust authentication): for tests that pause the store, which must never
//! touch the shared server on 5432. Needs the server binaries of Debian's `postgresql` package
//! (`/usr/lib/postgresql/*/bin`) and, when run as root, the `postgres` system user; without them
//! the test fails, never skips.

#![cfg(feature = "postgres")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_fhir_async::JobId;

/// A running cluster; dropping it kills every process of it and removes its directory.
pub struct PostgresServer {
    postmaster: Option<Child>,
    dir: PathBuf,
    port: u16,
}

/// The directory of the newest installed PostgreSQL server binaries.
fn bin_dir() -> PathBuf {
    let root = std::path::Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(root)
        .unwrap_or_else(|e| {
            panic!(
                "no PostgreSQL server binaries under {} ({e}); this test runs a cluster of its own \
                 and needs them (`apt-get install postgresql`)",
                root.display()
            )
        })
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("no initdb under {}", root.display()))
}

/// `program args…`, as the `postgres` user when this process is root (PostgreSQL refuses to run
/// as root).
fn as_postgres(program: &std::path::Path) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"));
    if is_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// `initdb` and start a cluster on a free port; waits until it accepts connections.
    pub async fn start() -> Self {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!("tower-fhir-async-pg-{}", JobId::new()));
        std::fs::create_dir(&dir).expect("create the cluster directory");
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let data = dir.join("data");
        let status = as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb in {} failed", data.display());
        let port = super::free_port();
        let postmaster = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=50"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let server = Self {
            postmaster: Some(postmaster),
            dir,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the private PostgreSQL on port {port} did not accept connections within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// A URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's process id, from its pid file.
    fn postmaster_pid(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .expect("the postmaster.pid file");
        text.lines().next().unwrap_or_default().trim().to_owned()
    }

    /// SIGSTOP to the postmaster and every backend: connections stay open, nothing is answered
    /// (a stalled store), until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.postmaster_pid();
        // Children first on STOP (the postmaster cannot fork new ones once it is stopped), the
        // postmaster first on CONT.
        let children = || {
            let _ = Command::new("pkill")
                .args([&format!("-{signal}"), "-P", &pid])
                .status();
        };
        let postmaster = || {
            let status = Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{signal} {pid} failed");
        };
        if signal == "STOP" {
            children();
            postmaster();
        } else {
            postmaster();
            children();
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let pid = self.postmaster_pid();
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = Command::new("pkill").args(["-CONT", "-P", &pid]).status();
        // SIGQUIT: immediate shutdown, the postmaster takes its backends down with it.
        let _ = Command::new("kill").args(["-QUIT", &pid]).status();
        if let Some(mut child) = self.postmaster.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
