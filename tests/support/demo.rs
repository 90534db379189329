//! The demo server (`examples/server`) as a child process on a free port of 127.0.0.1, for the
//! tests that check what it does as shipped. Killed and reaped when dropped.
//!
//! `cargo test` builds the demo first; `cargo test --test NAME` alone does not, so run
//! `cargo build --example server` before it (with the features a test's `--store` needs).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

/// For the demo to say where it listens.
const START_WAIT: Duration = Duration::from_secs(30);

/// A running demo server.
pub(crate) struct Demo {
    child: Child,
    /// `http://127.0.0.1:PORT/fhir`.
    pub(crate) base: String,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Demo {
    /// Starts the demo on a free port with `extra` flags, and waits for it to listen.
    pub(crate) fn start(extra: &[&str]) -> Self {
        let path = binary();
        let mut child = Command::new(&path)
            .args(["--addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("FHIR_ASYNC_CALLER_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", path.display()));
        // Its log, kept for failure messages; read on a thread so that the demo never blocks.
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut lines = lines.lock().unwrap();
                if lines.len() == 500 {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        // Its first line of stdout names the address; the rest is read and dropped.
        let stdout = child.stdout.take().expect("piped stdout");
        let (first_tx, first_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = first_tx.send(line);
            }
            lines.for_each(drop);
        });
        let mut demo = Self {
            child,
            base: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let first = first_rx.recv_timeout(START_WAIT).unwrap_or_else(|err| {
            // Its stdout closed or stayed silent: say whether it exited (the log says why).
            std::thread::sleep(Duration::from_millis(200));
            let exited = demo.child.try_wait().ok().flatten();
            panic!(
                "the demo server did not say where it listens ({err}; exited: {exited:?}); was it \
                 built with the features its flags need (`--store redis://…` needs `redis`)? Its \
                 log:\n{}",
                demo.log_tail()
            )
        });
        let base = first
            .strip_prefix("listening on ")
            .filter(|base| base.starts_with("http://127.0.0.1:") && base.ends_with("/fhir"))
            .unwrap_or_else(|| panic!("the demo's first line is {first:?}"));
        demo.addr = base
            .trim_start_matches("http://")
            .trim_end_matches("/fhir")
            .parse()
            .expect("an address");
        demo.base = base.to_owned();
        demo
    }

    /// The demo's URL for `path`, which starts with `/fhir`.
    pub(crate) fn url(&self, path: &str) -> String {
        let origin = self
            .base
            .strip_suffix("/fhir")
            .expect("base ends with /fhir");
        format!("{origin}{path}")
    }

    /// SIGKILL: no shutdown, no goodbye to the store.
    pub(crate) fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the demo server");
        self.child.wait().expect("reap the demo server");
    }

    /// The last lines of its log (stderr).
    pub(crate) fn log_tail(&self) -> String {
        let lines = self.log.lock().unwrap();
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Also when a test panics: no server may outlive its test. Errors mean it is gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("the demo server's log:\n{}", self.log_tail());
        }
    }
}

/// `<target>/<profile>/examples/server`, checked to be newer than the sources it is built from:
/// a stale demo would test old code.
fn binary() -> PathBuf {
    // The test binary is `<target>/<profile>/deps/bulk_client-…`.
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| {
            profile
                .join("examples")
                .join(format!("server{}", std::env::consts::EXE_SUFFIX))
        })
        .expect("the test binary lives in <target>/<profile>/deps");
    let built = std::fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .unwrap_or_else(|err| {
            panic!(
                "the demo server is not built at {} ({err}): run `cargo build --example server` \
                 (plain `cargo test` builds it; `cargo test --test NAME` does not)",
                path.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let newest = [root.join("src"), root.join("examples")]
        .iter()
        .filter_map(|dir| newest_source(dir))
        .max_by_key(|(modified, _)| *modified);
    if let Some((modified, source)) = newest {
        assert!(
            modified <= built,
            "the demo server at {} is older than {}: run `cargo build --example server` first",
            path.display(),
            source.display()
        );
    }
    path
}

/// The most recently modified `.rs` file under `dir`.
fn newest_source(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let found = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        } else {
            None
        };
        if let Some(found) = found {
            if newest.as_ref().is_none_or(|(t, _)| found.0 > *t) {
                newest = Some(found);
            }
        }
    }
    newest
}
