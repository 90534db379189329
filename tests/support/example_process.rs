//! An example (`examples/NAME.rs`, or the demo server `examples/server/`) as a child process on
//! a free port of 127.0.0.1, for the tests that drive the shipped examples as a client would.
//! Killed and reaped when dropped. `support/demo.rs` builds the demo's harness on it.
//!
//! `cargo test` builds the examples first; `cargo test --test examples` alone does not, so run
//! `cargo build --examples --all-features` before it (or `--example NAME` with the features the
//! example needs).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

/// For an example to say where it listens.
const START_WAIT: Duration = Duration::from_secs(30);

/// A running example.
pub(crate) struct Example {
    child: Child,
    /// The public base of each instance it announced, in order: `http://127.0.0.1:PORT/fhir`.
    pub(crate) bases: Vec<String>,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Example {
    /// Starts `examples/{name}` with `--addr 127.0.0.1:0` and `args`, and waits until it has
    /// printed `listening on <base>` for `instances` instances.
    pub(crate) fn start(name: &str, args: &[&str], instances: usize) -> Self {
        Self::start_with(name, args, instances, |_| {})
    }

    /// [`start`](Self::start), with `setup` adjusting the command first (its environment).
    pub(crate) fn start_with(
        name: &str,
        args: &[&str],
        instances: usize,
        setup: impl FnOnce(&mut Command),
    ) -> Self {
        let path = binary(name);
        let mut command = Command::new(&path);
        command.args(["--addr", "127.0.0.1:0"]).args(args);
        setup(&mut command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", path.display()));
        // Its stderr, kept for failure messages; read on a thread so the example never blocks.
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
        // Every `listening on` line of stdout is passed on; the rest is read and dropped.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(base) = line.strip_prefix("listening on ") {
                    let _ = tx.send(base.to_owned());
                }
            }
        });
        let mut example = Self {
            child,
            bases: Vec::new(),
            log,
        };
        let deadline = Instant::now() + START_WAIT;
        while example.bases.len() < instances {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(base) => example.bases.push(base),
                Err(err) => {
                    // Its stdout closed or stayed silent: say whether it exited (the log says why).
                    std::thread::sleep(Duration::from_millis(200));
                    let exited = example.child.try_wait().ok().flatten();
                    panic!(
                        "examples/{name} announced {} of {instances} bases ({err}; exited: \
                         {exited:?}); was it built with the features its flags need (`--store \
                         redis://…` needs `redis`)? Its log:\n{}",
                        example.bases.len(),
                        example.log_tail()
                    );
                }
            }
        }
        for base in &example.bases {
            assert!(
                base.starts_with("http://127.0.0.1:") && base.ends_with("/fhir"),
                "examples/{name} announced {base:?}, not http://127.0.0.1:PORT/fhir"
            );
        }
        example
    }

    /// The first instance's public base.
    pub(crate) fn base(&self) -> &str {
        &self.bases[0]
    }

    /// The first instance's URL for `path` (which starts with `/`), outside the FHIR base.
    pub(crate) fn url(&self, path: &str) -> String {
        let origin = self
            .base()
            .strip_suffix("/fhir")
            .expect("base ends with /fhir");
        format!("{origin}{path}")
    }

    /// SIGKILL: no shutdown, no goodbye to the store.
    pub(crate) fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the example");
        self.child.wait().expect("reap the example");
    }

    /// The last lines of its log (stderr).
    pub(crate) fn log_tail(&self) -> String {
        let lines = self.log.lock().unwrap();
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        // Also when a test panics: no example may outlive its test. Errors mean it is gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("the example's log:\n{}", self.log_tail());
        }
    }
}

/// `<target>/<profile>/examples/{name}`, checked to be newer than the sources it is built from:
/// a stale example would test old code.
pub(crate) fn binary(name: &str) -> PathBuf {
    // The test binary is `<target>/<profile>/deps/examples-…`.
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| {
            profile
                .join("examples")
                .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
        })
        .expect("the test binary lives in <target>/<profile>/deps");
    let built = std::fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .unwrap_or_else(|err| {
            panic!(
                "examples/{name} is not built at {} ({err}): run `cargo build --examples \
                 --all-features` (plain `cargo test` builds it; `cargo test --test NAME` does not)",
                path.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // A one-file example, or one in a folder of its own (the demo server).
    let examples = root.join("examples");
    let file = examples.join(format!("{name}.rs"));
    let folder = examples.join(name);
    let newest = [
        newest_source(&root.join("src")),
        modified(&file),
        newest_source(&folder),
    ]
    .into_iter()
    .flatten()
    .max_by_key(|(modified, _)| *modified);
    if let Some((modified, source)) = newest {
        assert!(
            modified <= built,
            "examples/{name} at {} is older than {}: run `cargo build --examples --all-features` \
             first",
            path.display(),
            source.display()
        );
    }
    path
}

fn modified(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let time = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some((time, path.to_owned()))
}

/// The most recently modified `.rs` file under `dir`.
fn newest_source(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let found = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            modified(&path)
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
