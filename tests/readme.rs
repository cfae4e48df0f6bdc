//! The README's list of bad input names, for each entry, the test that covers it: every name
//! must be a test of the crate, so that the list and the tests cannot drift apart.

use std::path::Path;

/// The Rust sources under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(&p).unwrap());
        }
    }
}

#[test]
fn every_test_the_bad_input_list_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("## Bad input").expect("the Bad input section");
    let end = start + readme[start..].find("**Fuzzing.**").expect("its end");
    let mut code = Vec::new();
    sources(&root.join("src"), &mut code);
    sources(&root.join("tests"), &mut code);
    let names: Vec<&str> = readme[start..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.matches('_').count() >= 3 && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .collect();
    assert!(names.len() >= 15, "the list names its tests: {names:?}");
    for name in names {
        let defined = code.iter().any(|src| {
            src.match_indices(&format!("fn {name}()"))
                .any(|(at, _)| src[..at].trim_end().ends_with("#[test]"))
        });
        assert!(defined, "README names `{name}`, which is no test");
    }
}
