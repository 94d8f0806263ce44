//! docs/ci.md's recipes, run as written: its `ci/pool.toml`, the GitHub
//! Actions step "Convert with a pool" and the GitLab `script` (then its
//! `after_script`), in a scratch checkout with the real binary on PATH.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, repo_path};

/// The fenced blocks of a markdown text with this language tag, in order.
fn blocks(md: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        match &mut current {
            None if line.trim() == format!("```{lang}") => current = Some(String::new()),
            Some(block) if line.trim() == "```" => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `run: |` script of the step named `step`.
fn github_step(yaml: &str, step: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {step}"))
        .unwrap_or_else(|| panic!("no step {step}"));
    let run = (at..lines.len())
        .find(|&i| lines[i].trim() == "run: |")
        .expect("a run: | block");
    let depth = indent(lines[run]);
    let body: Vec<&str> = lines[run + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > depth)
        .copied()
        .collect();
    let strip = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(strip..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The items of a GitLab job's list `key` (`script`, `after_script`).
fn gitlab_list(yaml: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("{key}:"))
        .unwrap_or_else(|| panic!("no {key}"));
    let depth = indent(lines[at]);
    lines[at + 1..]
        .iter()
        .take_while(|l| indent(l) > depth)
        .filter_map(|l| l.trim().strip_prefix("- ").map(str::to_string))
        .collect()
}

/// A checkout with the recipe's config and some inputs.
fn checkout(config: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("clx-pool-ci-").tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ci")).unwrap();
    std::fs::create_dir_all(dir.path().join("inputs")).unwrap();
    std::fs::write(dir.path().join("ci/pool.toml"), config).unwrap();
    for (name, text) in [("a.txt", "alpha\n"), ("b.txt", "beta\n")] {
        std::fs::write(dir.path().join("inputs").join(name), text).unwrap();
    }
    dir
}

fn bash(dir: &Path, script: &str, flags: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        Path::new(bin()).parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(flags)
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("CLX_DB_PATH")
        .output()
        .unwrap()
}

/// No supervisor is left on the checkout's database.
fn stopped(dir: &Path) {
    let out = Command::new(bin())
        .args(["stats", "--check", "--config"])
        .arg(dir.join("ci/pool.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the pool is still up: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn recipes() -> (String, String, String) {
    let md = std::fs::read_to_string(repo_path("docs/ci.md")).unwrap();
    let config = blocks(&md, "toml").remove(0);
    // The config the page shows is the repository's own ci/pool.toml.
    assert_eq!(
        std::fs::read_to_string(repo_path("ci/pool.toml")).unwrap(),
        config,
        "docs/ci.md shows ci/pool.toml as it is"
    );
    let yaml = blocks(&md, "yaml");
    assert_eq!(yaml.len(), 2, "a GitHub and a GitLab example");
    (config, yaml[0].clone(), yaml[1].clone())
}

#[test]
fn the_github_actions_step_converts_and_stops_the_pool() {
    let (config, github, _) = recipes();
    let script = github_step(&github, "Convert with a pool");
    let dir = checkout(&config);
    let out = bash(dir.path(), &script, &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/a.txt")).unwrap(),
        "ALPHA\n"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("out/b.txt")).unwrap(), "BETA\n");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains('\x1b'),
        "escapes in a CI log"
    );
    stopped(dir.path());

    // A job that fails fails the step, and the pool is stopped all the same.
    let dir = checkout(&config);
    // Its output cannot be written: a folder stands where it goes.
    std::fs::create_dir_all(dir.path().join("out/a.txt")).unwrap();
    let out = bash(dir.path(), &script, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not complete"));
    stopped(dir.path());
}

#[test]
fn the_gitlab_script_converts_and_after_script_stops_the_pool() {
    let (config, _, gitlab) = recipes();
    let script = gitlab_list(&gitlab, "script").join("\n");
    let after = gitlab_list(&gitlab, "after_script").join("\n");
    let dir = checkout(&config);
    let out = bash(dir.path(), &script, &["-e"]);
    let after_out = bash(dir.path(), &after, &["-e"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(after_out.status.success());
    assert_eq!(std::fs::read_to_string(dir.path().join("out/b.txt")).unwrap(), "BETA\n");
    stopped(dir.path());

    let dir = checkout(&config);
    std::fs::create_dir_all(dir.path().join("out/a.txt")).unwrap();
    let out = bash(dir.path(), &script, &["-e"]);
    assert!(!out.status.success(), "a failed job must fail the script");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not complete"));
    let after_out = bash(dir.path(), &after, &["-e"]);
    assert!(after_out.status.success());
    stopped(dir.path());
}
