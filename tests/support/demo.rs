//! The demo server (`examples/server`) as a child process on a free port of 127.0.0.1, for the
//! tests that check what it does as shipped: `support/example_process.rs` with the demo's
//! settings. Killed and reaped when dropped.
//!
//! `cargo test` builds the demo first; `cargo test --test NAME` alone does not, so run
//! `cargo build --example server` before it (with the features a test's `--store` needs).

#![allow(dead_code)]

use std::net::SocketAddr;

#[path = "example_process.rs"]
pub(crate) mod example_process;

use example_process::Example;

/// A running demo server.
pub(crate) struct Demo {
    process: Example,
    /// `http://127.0.0.1:PORT/fhir`.
    pub(crate) base: String,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
}

impl Demo {
    /// Starts the demo on a free port with `extra` flags, and waits for it to listen.
    pub(crate) fn start(extra: &[&str]) -> Self {
        let process = Example::start_with("server", extra, 1, |command| {
            command
                .env("RUST_LOG", "info")
                .env_remove("FHIR_ASYNC_CALLER_KEY");
        });
        let base = process.base().to_owned();
        let addr = base
            .trim_start_matches("http://")
            .trim_end_matches("/fhir")
            .parse()
            .expect("an address");
        Self {
            process,
            base,
            addr,
        }
    }

    /// The demo's URL for `path`, which starts with `/fhir`.
    pub(crate) fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// SIGKILL: no shutdown, no goodbye to the store.
    pub(crate) fn kill(&mut self) {
        self.process.kill();
    }

    /// The last lines of its log (stderr).
    pub(crate) fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}
