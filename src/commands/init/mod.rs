//! `clx-pool init`: writes a commented, valid pool.toml for the case at
//! hand and prints the commands to run next. The built-in case is here; what
//! `--clm` finds on the machine, and the pool it writes for `clm build`, is
//! in [`clm`]. Never overwrites a file unless told to (`--force`).

mod clm;

use std::io::Write;
use std::path::Path;

use crate::UsageError;
use crate::contract::exit;

/// `init`'s command line.
pub struct Options<'a> {
    /// Where to write the config.
    pub config: &'a Path,
    /// Overwrite an existing file.
    pub force: bool,
    /// `--clm [COURSE_OR_DB]` (`.` when given without a value).
    pub clm: Option<&'a Path>,
    /// `--python PATH`.
    pub python: Option<&'a Path>,
}

pub async fn run(opts: Options<'_>) -> anyhow::Result<i32> {
    if opts.clm.is_some() && is_clm_settings(opts.config) {
        return Err(UsageError(format!(
            "{} is where CLM reads its own settings (it would take this pool for them and fail); name the pool another way, e.g. --config clm-pool.toml",
            opts.config.display()
        ))
        .into());
    }
    if !opts.force && opts.config.exists() {
        return Err(exists(opts.config).into());
    }
    let shown = shell_word(&opts.config.display().to_string());
    let (text, summary, then) = match opts.clm {
        None => (BUILTIN.to_string(), builtin_summary(), builtin_then(&shown)),
        Some(target) => {
            let found = clm::find(target, opts.python).await?;
            (clm::render(&found), clm::summary(&found), clm::then(&found, &shown))
        }
    };
    write_config(opts.config, &text, opts.force)?;
    let mut out = vec![format!("wrote {}: {summary}", opts.config.display())];
    out.push("next:".into());
    out.push(format!("  clx-pool check --config {shown}"));
    out.push(format!("  clx-pool start --config {shown}"));
    out.extend(then);
    super::print(&out.join("\n"));
    Ok(exit::OK)
}

/// CLM's project config (`clm.toml`, `.clm/config.toml`), which `clm`
/// reads from its project root.
fn is_clm_settings(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "clm.toml") || path.ends_with(".clm/config.toml")
}

fn exists(path: &Path) -> UsageError {
    UsageError(format!(
        "{} exists; pass --force to overwrite it, or --config to write another file",
        path.display()
    ))
}

/// Writes `text` to `path`: a new file only (so a file made meanwhile is not
/// lost either), unless `force`.
fn write_config(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let mut file = match open.open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists(path).into()),
        other => other.with_context(|| format!("writing {}", path.display()))?,
    };
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The built-in worker's example: two job types any machine can run.
const BUILTIN: &str = r#"# A clx-pool pool, written by `clx-pool init`. Every key and its default:
# docs/config.md. Relative paths are relative to this file's folder.

[pool]
# The SQLite job queue that the supervisor, the workers and the CLI share.
db_path = "jobs.db"
# Jobs read and write here: a job's relative paths are relative to it.
workspace_path = "workspace"
# Each worker's output goes to <log_dir>/<type>-<slot>.log.
log_dir = "logs"
# Grace between SIGTERM and SIGKILL when a worker is stopped.
stop_timeout = "10s"
# An idle worker whose heartbeat stood still this long is hung, and replaced.
heartbeat_timeout = "30s"

# One [[workers]] table per job type.
[[workers]]
# The job type these workers take: `clx-pool submit --config FILE copy IN OUT`.
worker_type = "copy"
# How many run at once (`clx-pool scale copy=4` changes it while running).
count = 2
# The built-in worker runs this once per job; {input} and {output} are the
# job's files ({payload}, {payload_file} and {job_id} exist too).
job_command = ["cp", "{input}", "{output}"]

[[workers]]
worker_type = "upper"
count = 1
# Inside a shell's -c script placeholders are refused (they would be pasted
# unquoted): the script reads "$CLX_INPUT_FILE" and "$CLX_OUTPUT_FILE".
job_command = ["sh", "-c", "tr '[:lower:]' '[:upper:]' < \"$CLX_INPUT_FILE\" > \"$CLX_OUTPUT_FILE\""]
# A job running longer than this is hung: its worker is replaced, the job retried.
max_job_time = "60s"
"#;

fn builtin_summary() -> String {
    "built-in workers `copy` (cp) and `upper` (tr); every key: docs/config.md".into()
}

fn builtin_then(config: &str) -> Vec<String> {
    vec![
        "then, from another shell (paths relative to the workspace):".into(),
        format!("  clx-pool wait --ready --config {config}"),
        format!("  clx-pool submit --config {config} --wait upper in.txt out.txt"),
        format!("  clx-pool stop --config {config}"),
    ]
}

/// `s` as one word for a POSIX shell: as it is when that is safe, else in
/// single quotes.
pub(crate) fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `s` as a TOML string.
pub(crate) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_example_is_a_valid_config_with_both_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.toml");
        std::fs::write(&path, BUILTIN).unwrap();
        let config = crate::config::Config::load(&path).unwrap();
        let types: Vec<_> = config.workers.iter().map(|w| w.worker_type.as_str()).collect();
        assert_eq!(types, ["copy", "upper"]);
        assert_eq!(config.pool.db_path, dir.path().join("jobs.db"));
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("/a/b-c_d.toml"), "/a/b-c_d.toml");
        assert_eq!(shell_word("my pool.toml"), "'my pool.toml'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn an_existing_file_is_kept_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.toml");
        std::fs::write(&path, "mine").unwrap();
        let err = write_config(&path, "new", false).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
        write_config(&path, "new", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }
}
