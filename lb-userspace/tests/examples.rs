//! The shipped example configuration is the README's, and valid; the README and the docs name
//! one heartbeat key path, the example's.
use std::path::{Path, PathBuf};

use lb_userspace::config::Config;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The ```toml block of the README's "Configuration" section.
fn readme_config() -> String {
    let readme = read("README.md");
    let section = readme
        .find("## Configuration (`lb.toml`)")
        .expect("README has a Configuration section");
    let start = readme[section..].find("```toml\n").expect("a toml block") + section + 8;
    let len = readme[start..].find("```").expect("the block ends");
    readme[start..start + len].to_string()
}

#[test]
fn example_config_is_the_readmes_and_valid() {
    let example = read("examples/lb.toml");
    assert!(
        example == readme_config(),
        "examples/lb.toml differs from the README's Configuration block: keep them the same"
    );
    let cfg = Config::load(&repo().join("examples/lb.toml")).expect("examples/lb.toml is valid");
    assert_eq!((cfg.vips.len(), cfg.nodes.len()), (1, 1));
}

#[test]
fn readme_and_docs_name_the_examples_key_path() {
    let cfg = Config::parse(&read("examples/lb.toml"), "examples/lb.toml").unwrap();
    let key = cfg.daemon.key_file.expect("the example sets key_file");
    let key = key.to_str().unwrap();
    let mut files = vec!["README.md".to_string()];
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    let mut mentions = 0;
    for f in &files {
        let text = read(f);
        for (i, _) in text.match_indices("/etc/lb/") {
            let path: String = text[i..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !"`\"')".contains(*c))
                .collect();
            // Only key files live under /etc/lb/ in the docs (the config may too).
            if path.ends_with(".toml") {
                continue;
            }
            assert_eq!(path, key, "{f} names a key file other than the example's");
            mentions += 1;
        }
    }
    assert!(
        mentions >= 2,
        "the README and docs should show the key path"
    );
}
