//! `clx-pool completions`: the scripts as the shells run them. Bash's own
//! completion machinery is driven on the generated script (COMP_WORDS,
//! COMP_CWORD and the registered function), fish answers `complete -C`,
//! and zsh's script is checked for what it must not offer. Hidden commands
//! and options (taken from the CLI definition) are never offered.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use common::{COPY, Pool, bin, sh_workers, stderr, stdout};

/// The completion script for `shell`, written into `dir`.
fn script(shell: &str, dir: &Path) -> PathBuf {
    let out = Command::new(bin()).args(["completions", shell]).output().unwrap();
    assert!(out.status.success(), "completions {shell}: {}", stderr(&out));
    let path = dir.join(format!("clx-pool.{shell}"));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// Sources the bash script, then does what bash does on TAB at the end of
/// `line`: splits it into COMP_WORDS, sets COMP_CWORD, COMP_LINE and
/// COMP_POINT and calls the function `complete -p clx-pool` names, with
/// the command, the current word and the one before it. Prints COMPREPLY,
/// one word a line.
const BASH_DRIVER: &str = r#"
source "$1" || exit 3
spec=$(complete -p clx-pool) || { echo "nothing registered for clx-pool" >&2; exit 3; }
fn=${spec#*-F }
fn=${fn%% *}
COMP_LINE=$2
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMPREPLY=()
"$fn" clx-pool "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;

/// What bash offers on TAB at the end of `line`.
fn bash_offers(script: &Path, line: &str) -> Vec<String> {
    let out = Command::new("bash")
        .env("PATH", path_with_bin())
        .args(["--norc", "--noprofile", "-c", BASH_DRIVER, "driver"])
        .arg(script)
        .arg(line)
        .output()
        .unwrap();
    assert!(out.status.success(), "{line:?}: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// PATH with the tested binary first: the scripts ask `clx-pool
/// complete-types` for a pool's types.
fn path_with_bin() -> String {
    format!(
        "{}:{}",
        Path::new(bin()).parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// What fish offers at the end of `line` (the words, without descriptions).
fn fish_offers(script: &Path, line: &str) -> Vec<String> {
    let out = Command::new("fish")
        .env("PATH", path_with_bin())
        .arg("--no-config")
        .arg("-c")
        .arg("source $argv[1]; and complete -C $argv[2]")
        .arg(script)
        .arg(line)
        .output()
        .unwrap();
    assert!(out.status.success(), "{line:?}: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

/// The CLI's hidden subcommands and hidden options (`--long`), at every level.
fn hidden() -> (Vec<String>, Vec<String>) {
    fn walk(cmd: &clap::Command, commands: &mut Vec<String>, options: &mut Vec<String>) {
        for arg in cmd.get_arguments().filter(|a| a.is_hide_set()) {
            options.extend(arg.get_long().map(|l| format!("--{l}")));
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() {
                commands.push(sub.get_name().to_string());
            }
            walk(sub, commands, options);
        }
    }
    let (mut commands, mut options) = (Vec::new(), Vec::new());
    walk(&clx_pool::cli::Cli::command(), &mut commands, &mut options);
    assert!(
        commands.contains(&"guard".to_string()) && options.contains(&"--no-command".to_string()),
        "the hidden items this test is about: {commands:?} {options:?}"
    );
    (commands, options)
}

/// A shell that is not installed skips its test with a message on a
/// developer machine, and fails under CI=true, where .ci/run installs it.
fn have(shell: &str) -> bool {
    let found = Command::new(shell)
        .args(["-c", "exit 0"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        common::skip(&format!("{shell} is not installed (.ci/run installs it)"));
    }
    found
}

fn has_all(offers: &[String], wanted: &[&str]) -> bool {
    wanted.iter().all(|w| offers.iter().any(|o| o == w))
}

/// What a shell offers never names a hidden command, not at the top level
/// and not for its first letters, nor a hidden option among `worker`'s.
fn offers_nothing_hidden(offers: impl Fn(&str) -> Vec<String>) {
    let (hidden_commands, hidden_options) = hidden();
    let top = offers("clx-pool ");
    for name in &hidden_commands {
        assert!(!top.contains(name), "{name} offered: {top:?}");
        let typed = offers(&format!("clx-pool {}", &name[..2]));
        assert!(!typed.contains(name), "{name} offered for its prefix: {typed:?}");
    }
    let worker = offers("clx-pool worker --");
    for option in &hidden_options {
        assert!(!worker.contains(option), "{option} offered: {worker:?}");
    }
}

#[test]
fn bash_completes_commands_options_and_subcommands_at_every_depth() {
    let dir = tempfile::tempdir().unwrap();
    let script = script("bash", dir.path());
    let (hidden_commands, _) = hidden();
    offers_nothing_hidden(|line| bash_offers(&script, line));

    // Depth 1: the commands.
    let top = bash_offers(&script, "clx-pool ");
    assert!(has_all(&top, &["start", "stats", "stop", "jobs", "worker"]), "{top:?}");

    // Depth 2: a command's options, and the values of a global one.
    let stats = bash_offers(&script, "clx-pool stats --");
    assert!(
        has_all(&stats, &["--json", "--workers", "--check", "--watch", "--config"]),
        "{stats:?}"
    );
    assert!(stats.iter().all(|o| o.starts_with("--")), "{stats:?}");
    let colour = bash_offers(&script, "clx-pool stats --color ");
    assert_eq!(colour, ["auto", "always", "never"]);
    let worker = bash_offers(&script, "clx-pool worker --");
    assert!(has_all(&worker, &["--max-jobs", "--poll-interval"]), "{worker:?}");

    // Depth 3: a command's subcommands, and a subcommand's options.
    let jobs = bash_offers(&script, "clx-pool jobs ");
    assert!(
        has_all(&jobs, &["list", "show", "cancel", "retry", "prune"]),
        "{jobs:?}"
    );
    let cancel = bash_offers(&script, "clx-pool jobs cancel --");
    assert!(has_all(&cancel, &["--type", "--all", "--config", "--db"]), "{cancel:?}");
    assert!(
        !cancel.contains(&"--failed".to_string()),
        "retry's option offered to cancel: {cancel:?}"
    );
    let help = bash_offers(&script, "clx-pool help ");
    assert!(help.contains(&"stats".to_string()), "{help:?}");
    for name in &hidden_commands {
        assert!(!help.contains(name), "{name} offered after help: {help:?}");
    }
}

#[test]
fn fish_completes_at_every_depth_and_never_offers_hidden_items() {
    if !have("fish") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = script("fish", dir.path());
    offers_nothing_hidden(|line| fish_offers(&script, line));

    let top = fish_offers(&script, "clx-pool ");
    assert!(has_all(&top, &["start", "stats", "stop"]), "{top:?}");
    let stats = fish_offers(&script, "clx-pool stats --");
    assert!(has_all(&stats, &["--json", "--workers", "--check"]), "{stats:?}");
    let worker = fish_offers(&script, "clx-pool worker --");
    assert!(has_all(&worker, &["--max-jobs"]), "{worker:?}");
    let jobs = fish_offers(&script, "clx-pool jobs ");
    assert!(
        has_all(&jobs, &["list", "show", "cancel", "retry", "prune"]),
        "{jobs:?}"
    );
    let cancel = fish_offers(&script, "clx-pool jobs cancel --");
    assert!(has_all(&cancel, &["--type", "--all"]), "{cancel:?}");
}

#[test]
fn zsh_script_parses_and_names_no_hidden_item() {
    let dir = tempfile::tempdir().unwrap();
    let script = script("zsh", dir.path());
    let text = std::fs::read_to_string(&script).unwrap();
    let (hidden_commands, hidden_options) = hidden();
    for name in &hidden_commands {
        // A command appears as `'name:about'` in a list and `(name)` as a case.
        for form in [format!("'{name}:"), format!("({name})"), format!("__subcmd__{name}")] {
            assert!(!text.contains(&form), "{form} in the zsh script");
        }
    }
    for option in &hidden_options {
        for form in [format!("'{option}["), format!("'{option}=")] {
            assert!(!text.contains(&form), "{form} in the zsh script");
        }
    }
    assert!(
        text.contains("'--workers[") && text.contains("'cancel:"),
        "the forms looked for are the ones zsh uses"
    );
    if !have("zsh") {
        return;
    }
    let out = Command::new("zsh").arg("-n").arg(&script).output().unwrap();
    assert!(out.status.success(), "zsh -n: {}", stderr(&out));
}

/// TYPE values come from the pool: `scale` offers `TYPE=`, `restart` and
/// `logs` its types and slots, `submit` its types as the first word only,
/// `jobs list --type` its types; from `--config` (its entries) or `--db`
/// (the running pool), in bash and fish; zsh's helper answers the same.
#[test]
fn type_values_come_from_the_pool_named_on_the_line() {
    let workers = format!("{}\n{}", sh_workers("copy", 2, COPY), sh_workers("upper", 1, COPY));
    let mut pool = Pool::new("", &workers);
    pool.start_ready();
    let (config, db) = (pool.config(), pool.db_path());
    let (config, db) = (config.to_str().unwrap(), db.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let bash = script("bash", dir.path());
    let offers = |line: &str| bash_offers(&bash, line);
    let scale = offers(&format!("clx-pool scale --config {config} "));
    assert!(has_all(&scale, &["copy=", "upper="]), "{scale:?}");
    let restart = offers(&format!("clx-pool restart --db {db} "));
    assert!(
        has_all(&restart, &["copy", "upper", "copy-0", "copy-1", "upper-0"]),
        "{restart:?}"
    );
    let logs = offers(&format!("clx-pool logs --db {db} co"));
    assert!(
        has_all(&logs, &["copy", "copy-0", "copy-1"]) && !logs.iter().any(|w| w.starts_with("upper")),
        "{logs:?}"
    );
    let submit = offers(&format!("clx-pool submit --config {config} "));
    assert!(has_all(&submit, &["copy", "upper"]), "{submit:?}");
    let input = offers(&format!("clx-pool submit --config {config} copy "));
    assert!(
        !input.iter().any(|w| w == "upper"),
        "the input file is no type: {input:?}"
    );
    let by_type = offers(&format!("clx-pool jobs list --db {db} --type "));
    assert!(has_all(&by_type, &["copy", "upper"]), "{by_type:?}");
    let options = offers(&format!("clx-pool scale --config {config} --"));
    assert!(
        !options.iter().any(|w| w.ends_with('=')),
        "options stay options: {options:?}"
    );
    if have("fish") {
        let fish = script("fish", dir.path());
        let scale = fish_offers(&fish, &format!("clx-pool scale --config {config} "));
        assert!(has_all(&scale, &["copy=", "upper="]), "{scale:?}");
        let restart = fish_offers(&fish, &format!("clx-pool restart --db {db} "));
        assert!(has_all(&restart, &["copy", "copy-1", "upper-0"]), "{restart:?}");
    }
    if have("zsh") {
        let zsh = script("zsh", dir.path());
        let out = Command::new("zsh")
            .env("PATH", path_with_bin())
            .args([
                "-f",
                "-c",
                "source $1 2>/dev/null; typeset -A opt_args; opt_args[--db]=$2; _clx_pool_values --slots",
                "zsh",
            ])
            .arg(&zsh)
            .arg(db)
            .output()
            .unwrap();
        let words: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(
            words,
            ["copy", "copy-0", "copy-1", "upper", "upper-0"],
            "{}",
            stderr(&out)
        );
    }
}
