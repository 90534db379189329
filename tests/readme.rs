//! The README's Rust snippets (issue #14 item 1): they compile as doctests (`src/lib.rs`
//! includes the README under `cfg(doctest)`); here, every handler in them answers FHIR JSON, and
//! the runnable versions they point to exist. `tests/examples.rs` runs those end to end.

use std::path::Path;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md")
}

/// The Rust code blocks of the README.
fn rust_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.starts_with("```rust") => current = Some(String::new()),
            Some(block) if fence.starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

// KICK-2, BUNDLE-10: a handler answering `text/plain` (axum's `&str` or `String`) makes the
// asynchronous result a base64 `Binary` and a bulk export of it fail; no README snippet may
// show one, and every snippet that answers a body labels it `application/fhir+json`.
#[test]
fn bundle_10_readme_handlers_answer_fhir_json() {
    let text = readme();
    let blocks = rust_blocks(&text);
    assert!(blocks.len() >= 5, "found {} Rust blocks", blocks.len());
    for block in &blocks {
        for line in block.lines().filter(|l| l.contains("async fn ")) {
            assert!(
                !line.contains("-> &'static str") && !line.contains("-> String"),
                "a handler answering text/plain: {line}\n{block}"
            );
        }
        if block.contains(r#"{"resourceType""#) && block.contains("async fn ") {
            assert!(
                block.contains("application/fhir+json"),
                "a handler answering FHIR JSON without saying so:\n{block}"
            );
        }
    }
}

// Every example the README links to exists, and every small example is linked.
#[test]
fn readme_links_every_example() {
    let text = readme();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let name = entry.expect("an entry").file_name();
        let name = name.to_string_lossy();
        let link = if let Some(stem) = name.strip_suffix(".rs") {
            format!("(examples/{stem}.rs)")
        } else {
            format!("(examples/{name}/)")
        };
        assert!(text.contains(&link), "README does not link {link}");
    }
    for link in text.match_indices("(examples/") {
        let rest = &text[link.0 + 1..];
        let path = &rest[..rest.find(')').expect("a closing parenthesis")];
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
            "README links {path}, which does not exist"
        );
    }
}
