//! `clx-pool init --clm`: finds what `clm build` would use on this machine
//! and writes a pool of CLM's workers that it reuses. Mirrors CLM 1.35:
//!
//! - the databases as `clm/cli/main.py` resolves `--jobs-db-path` and
//!   `--cache-db-path`: the option, else `CLM_JOBS_DB_PATH` /
//!   `CLM_CACHE_DB_PATH`, else `clm_jobs.db` / `clm_cache.db` at the project
//!   root (`find_project_root` of `clm/infrastructure/utils/path_utils.py`:
//!   the nearest folder with `pyproject.toml`, `.clm/config.toml`,
//!   `clm.toml` or `.git`);
//! - a course's root as `clm/core/course_paths.py` (a spec file's
//!   grandparent) and its specs in `course-specs/`;
//! - the PlantUML jar and Draw.io executable by asking CLM's own locators
//!   (`clm/infrastructure/utils/diagram_tools.py`) in the Python where CLM
//!   is installed, and each worker type by importing its worker module
//!   there (`clm.workers.<type>.<type>_worker`, what `python -m
//!   clm.workers.<type>` runs).
//!
//! What it does not own: writing the file and the commands every pool
//! gets (`init`'s mod.rs).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{shell_word, toml_str};
use crate::UsageError;
use crate::commands::check::is_executable;

/// Debian's `plantuml` package puts its jar here (not among CLM's own
/// default paths).
const DEBIAN_JAR: &str = "/usr/share/plantuml/plantuml.jar";

/// The worker types `clm build` starts (`jupyterlite` is opt-in per spec).
const TYPES: [&str; 3] = ["notebook", "plantuml", "drawio"];

/// Everything the written pool and the printed `clm build` line say.
pub struct Found {
    python: PathBuf,
    /// How `python` was found.
    python_how: String,
    /// The `clm` program for the printed line.
    clm_program: String,
    version: String,
    jobs: Place,
    cache: Place,
    spec: Option<PathBuf>,
    notes: Vec<String>,
    entries: Vec<Entry>,
    /// Variables the printed line sets for `clm build` (a PlantUML jar the
    /// caller's environment does not name, so that CLM's cache key and the
    /// workers agree on it).
    build_env: Vec<(String, String)>,
}

/// A database and why it is that one.
struct Place {
    path: PathBuf,
    how: String,
}

/// One `[[workers]]` entry, or why it is left out.
struct Entry {
    worker_type: &'static str,
    count: u32,
    why_count: String,
    env: Vec<(String, String)>,
    missing: Option<String>,
}

/// What `--clm COURSE_OR_DB` names.
struct Target {
    /// Where `clm build` would look for its project root.
    start: PathBuf,
    db: Option<PathBuf>,
    spec: Option<PathBuf>,
    notes: Vec<String>,
}

/// What the probe learnt from CLM itself.
#[derive(serde::Deserialize)]
struct Probe {
    version: String,
    /// Each type: None when its worker imports, else the error.
    types: BTreeMap<String, Option<String>>,
    plantuml_jar: Option<String>,
    drawio: Option<String>,
    java: Option<String>,
}

pub async fn find(target: &Path, python: Option<&Path>) -> anyhow::Result<Found> {
    let cwd = std::env::current_dir()?;
    let target = target_of(target, &cwd)?;
    let (jobs, cache) = databases(&target, &cwd);
    let (python, python_how, clm_script, probe) = find_clm(python).await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let caller_jar = std::env::var("PLANTUML_JAR").ok().filter(|v| !v.is_empty());
    let entries = entries(&probe, cores, &cache.path);
    let mut build_env = Vec::new();
    if let Some(jar) = &probe.plantuml_jar
        && caller_jar.as_ref() != Some(jar)
        && entries
            .iter()
            .any(|e| e.worker_type == "plantuml" && e.missing.is_none())
    {
        build_env.push(("PLANTUML_JAR".to_string(), jar.clone()));
    }
    let clm_program = clm_script
        .or_else(|| Some(python.parent()?.join("clm")).filter(|p| is_executable(p)))
        .map_or_else(|| "clm".to_string(), |p| p.display().to_string());
    Ok(Found {
        python,
        python_how,
        clm_program,
        version: probe.version,
        jobs,
        cache,
        spec: target.spec,
        notes: target.notes,
        entries,
        build_env,
    })
}

/// Reads `--clm COURSE_OR_DB`: a course folder, a spec file or a jobs
/// database, which must exist.
fn target_of(arg: &Path, cwd: &Path) -> Result<Target, UsageError> {
    let path = crate::config::normalize(&cwd.join(arg));
    let meta = std::fs::metadata(&path).map_err(|e| {
        UsageError(format!(
            "--clm {}: no course folder, course spec or jobs database at {} ({e})",
            arg.display(),
            path.display()
        ))
    })?;
    let ext = path.extension().and_then(OsStr::to_str).unwrap_or("");
    if meta.is_dir() {
        let (spec, notes) = course_spec(&path);
        return Ok(Target {
            start: path,
            db: None,
            spec,
            notes,
        });
    }
    if is_sqlite(&path) || ["db", "sqlite", "sqlite3"].contains(&ext) {
        let start = path.parent().unwrap_or(cwd).to_path_buf();
        return Ok(Target {
            start,
            db: Some(path),
            spec: None,
            notes: Vec::new(),
        });
    }
    if ext == "xml" {
        // clm/core/course_paths.py: the course root is the spec's grandparent.
        let root = path.ancestors().nth(2).unwrap_or(cwd).to_path_buf();
        return Ok(Target {
            start: root,
            db: None,
            spec: Some(path),
            notes: Vec::new(),
        });
    }
    Err(UsageError(format!(
        "--clm {}: {} is neither a course folder, a course spec (.xml) nor a SQLite jobs database",
        arg.display(),
        path.display()
    )))
}

fn is_sqlite(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head == b"SQLite format 3\0")
}

/// The course's spec in `course-specs/` (the first by name when there are
/// several, with a note).
fn course_spec(course: &Path) -> (Option<PathBuf>, Vec<String>) {
    let dir = course.join("course-specs");
    let mut specs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml") && p.is_file())
        .collect();
    specs.sort();
    let mut notes = Vec::new();
    match specs.len() {
        0 => notes.push(format!(
            "no course spec in {} (COURSE/course-specs/COURSE.xml in the line below stands for yours)",
            dir.display()
        )),
        1 => {}
        n => notes.push(format!(
            "{} holds {n} specs; the line below builds {} (any other builds the same way)",
            dir.display(),
            specs[0].file_name().unwrap_or_default().to_string_lossy()
        )),
    }
    (specs.into_iter().next(), notes)
}

/// The jobs and cache databases `clm build` would use (clm/cli/main.py):
/// the given database, else CLM's variable, else its name at the project
/// root. The cache of a given database is beside it (clx-pool's default;
/// the printed line passes it on, so `clm build` agrees wherever it runs).
fn databases(target: &Target, cwd: &Path) -> (Place, Place) {
    let (root, marker) = find_project_root(&target.start);
    let at_root = |name: &str| Place {
        path: root.join(name),
        how: match &marker {
            Some(m) => format!("CLM's default: {name} at the project root, the folder with {m}"),
            None => format!(
                "CLM's default: {name} at the project root (no pyproject.toml, clm.toml or .git above, so the course folder itself)"
            ),
        },
    };
    let from_env = |var: &str| {
        let v = std::env::var(var).ok().filter(|v| !v.is_empty())?;
        Some(Place {
            path: crate::config::normalize(&cwd.join(v)),
            how: format!("from {var}, as `clm` reads it"),
        })
    };
    let jobs = match &target.db {
        Some(db) => Place {
            path: db.clone(),
            how: "named on the command line".into(),
        },
        None => from_env("CLM_JOBS_DB_PATH").unwrap_or_else(|| at_root("clm_jobs.db")),
    };
    let cache = from_env("CLM_CACHE_DB_PATH").unwrap_or_else(|| match &target.db {
        Some(db) => Place {
            path: db.with_file_name("clm_cache.db"),
            how: "beside the jobs database".into(),
        },
        None => at_root("clm_cache.db"),
    });
    (jobs, cache)
}

/// CLM's `find_project_root`: the nearest folder (symlinks resolved) with
/// one of its markers, else the start itself; and the marker.
fn find_project_root(start: &Path) -> (PathBuf, Option<&'static str>) {
    let base = std::fs::canonicalize(start).unwrap_or_else(|_| start.to_path_buf());
    for dir in base.ancestors() {
        for marker in ["pyproject.toml", ".clm/config.toml", "clm.toml"] {
            if dir.join(marker).is_file() {
                return (dir.to_path_buf(), Some(marker));
            }
        }
        // A linked worktree's .git is a file.
        if dir.join(".git").exists() {
            return (dir.to_path_buf(), Some(".git"));
        }
    }
    (base, None)
}

/// The Python where CLM is installed: `--python`, else the one of `clm` on
/// PATH (its shebang), else `$VIRTUAL_ENV/bin/python`, else `python3` on
/// PATH; the first in which CLM imports. Returns it, how it was found, the
/// `clm` script seen, and what CLM said about itself.
async fn find_clm(explicit: Option<&Path>) -> anyhow::Result<(PathBuf, String, Option<PathBuf>, Probe)> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut looked = Vec::new();
    let mut candidates: Vec<(PathBuf, String)> = Vec::new();
    let mut script = None;
    if let Some(p) = explicit {
        candidates.push((std::path::absolute(p)?, "--python".into()));
    } else {
        match find_on_path("clm", &path_var) {
            Some(clm) => match shebang_python(&clm, &path_var) {
                Some(py) => {
                    candidates.push((py, format!("the shebang of {}", clm.display())));
                    script = Some(clm);
                }
                None => looked.push(format!("{}: no Python in its first line", clm.display())),
            },
            None => looked.push("`clm` on PATH: not there".into()),
        }
        match std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
            Some(venv) => candidates.push((PathBuf::from(venv).join("bin/python"), "$VIRTUAL_ENV".into())),
            None => looked.push("$VIRTUAL_ENV: not set".into()),
        }
        match find_on_path("python3", &path_var) {
            Some(py) => candidates.push((py, "`python3` on PATH".into())),
            None => looked.push("`python3` on PATH: not there".into()),
        }
    }
    let mut seen = Vec::new();
    for (python, how) in candidates {
        if seen.contains(&python) {
            continue;
        }
        seen.push(python.clone());
        match probe(&python).await {
            Ok(found) => {
                let script = script.filter(|_| how.starts_with("the shebang"));
                return Ok((python, how, script, found));
            }
            Err(e) => looked.push(format!("{} ({how}): {e}", python.display())),
        }
    }
    Err(UsageError(format!(
        "no CLM (PyPI coding-academy-lecture-manager) found; looked at:\n  {}\n\
         install it (pip install 'coding-academy-lecture-manager[plantuml]') and activate its venv, or name its Python with --python",
        looked.join("\n  ")
    ))
    .into())
}

fn find_on_path(name: &str, path_var: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The interpreter a pip-installed script names: `#!/venv/bin/python`,
/// `#!/usr/bin/env python3`, or pip's trampoline for long paths
/// (`#!/bin/sh` then `'''exec' "/long/venv/bin/python" "$0" "$@"`).
fn shebang_python(script: &Path, path_var: &OsStr) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(script)
        .ok()?
        .take(4096)
        .read_to_end(&mut head)
        .ok()?;
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.lines();
    let mut words = lines.next()?.strip_prefix("#!")?.split_whitespace();
    let program = words.next()?;
    match Path::new(program).file_name().and_then(OsStr::to_str)? {
        "env" => find_on_path(words.find(|w| !w.starts_with('-'))?, path_var),
        "sh" => {
            let quoted = lines.next()?.strip_prefix("'''exec' \"")?;
            Some(PathBuf::from(&quoted[..quoted.find('"')?]))
        }
        _ => Some(PathBuf::from(program)),
    }
}

/// Asks CLM, in `python`, for its version, which worker modules import,
/// and where its locators find PlantUML's jar, Draw.io and Java.
const PROBE: &str = r#"
import importlib, json, shutil, sys
from clm.__version__ import __version__
from clm.infrastructure.utils.diagram_tools import locate_drawio_executable, locate_plantuml_jar
types = {}
for t in sys.argv[1:]:
    try:
        importlib.import_module(f"clm.workers.{t}.{t}_worker")
        types[t] = None
    except BaseException as e:
        types[t] = (f"{type(e).__name__}: {e}".strip().splitlines() or ["?"])[0]
print(json.dumps({"version": __version__, "types": types, "plantuml_jar": locate_plantuml_jar(),
                  "drawio": locate_drawio_executable(), "java": shutil.which("java")}))
"#;

async fn probe(python: &Path) -> Result<Probe, String> {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg("-c").arg(PROBE).args(TYPES);
    // CLM's own jar paths do not include Debian's: offer it, as the README's
    // setup does, unless the caller names one.
    if std::env::var_os("PLANTUML_JAR").is_none_or(|v| v.is_empty()) && Path::new(DEBIAN_JAR).is_file() {
        cmd.env("PLANTUML_JAR", DEBIAN_JAR);
    }
    let run = cmd.stdin(std::process::Stdio::null()).kill_on_drop(true).output();
    let out = match tokio::time::timeout(std::time::Duration::from_secs(120), run).await {
        Err(_) => return Err("did not answer within 120s".into()),
        Ok(Err(e)) => return Err(format!("cannot be run: {e}")),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.trim().lines().last().unwrap_or("failed").trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.trim().lines().last().unwrap_or("");
    serde_json::from_str(last).map_err(|e| format!("answered what is not CLM's probe output ({e}): {last}"))
}

/// The entries: each type CLM offers, sized to the cores, or why it is
/// left out. Every entry gets the cache database as `CLM_CACHE_DB_PATH`
/// (the notebook worker's default is `clm_cache.db` in its working folder).
fn entries(probe: &Probe, cores: u32, cache: &Path) -> Vec<Entry> {
    TYPES
        .iter()
        .map(|&worker_type| {
            let mut env = vec![("CLM_CACHE_DB_PATH".to_string(), cache.display().to_string())];
            let imports = match probe.types.get(worker_type) {
                Some(None) => None,
                Some(Some(err)) => Some(format!("`clm.workers.{worker_type}` does not import: {err}")),
                None => Some(format!("CLM did not say whether `clm.workers.{worker_type}` imports")),
            };
            let tools = tools(worker_type, probe, &mut env);
            let (count, why_count) = size(worker_type, cores);
            Entry {
                worker_type,
                count,
                why_count,
                env,
                missing: imports.or(tools),
            }
        })
        .collect()
}

/// What a type needs beyond its module, as CLM's locators found it: set in
/// the entry's `env`, or why the type cannot run.
fn tools(worker_type: &str, probe: &Probe, env: &mut Vec<(String, String)>) -> Option<String> {
    match worker_type {
        "plantuml" => match (&probe.plantuml_jar, &probe.java) {
            (None, _) => Some(format!(
                "no PlantUML jar (PLANTUML_JAR unset, none at CLM's default paths or {DEBIAN_JAR})"
            )),
            (_, None) => Some("no `java` on PATH (PlantUML runs on Java)".into()),
            (Some(jar), Some(_)) => {
                env.push(("PLANTUML_JAR".into(), jar.clone()));
                None
            }
        },
        "drawio" => match &probe.drawio {
            None => Some("no Draw.io executable (DRAWIO_EXECUTABLE unset, no `drawio` on PATH)".into()),
            Some(exe) => {
                env.push(("DRAWIO_EXECUTABLE".into(), exe.clone()));
                None
            }
        },
        _ => None,
    }
}

/// How many workers of a type, and why.
fn size(worker_type: &str, cores: u32) -> (u32, String) {
    match worker_type {
        "notebook" => (
            cores,
            format!("One per core ({cores} here): each runs one notebook's code at a time."),
        ),
        "plantuml" => (
            cores.min(2),
            "1 to 2: each is a Java program rendering one diagram at a time, and diagrams are quick.".into(),
        ),
        _ => (1, "1: each runs Draw.io, an Electron app heavy on memory.".into()),
    }
}

/// The pool's text.
pub fn render(f: &Found) -> String {
    let mut s = format!(
        "# A clx-pool pool of CLM's workers that `clm build` reuses, written by\n\
         # `clx-pool init --clm` for CLM {} in {}.\n\
         # Every key and its default: docs/config.md; how clx-pool serves CLM:\n\
         # docs/protocol.md. Relative paths are relative to this file's folder.\n\
         #\n\
         # Build with the pool's workers (clm build starts none of its own when it\n\
         # asks for at most the counts below, in direct mode):\n\
         #   {}\n\n\
         [pool]\n\
         # CLM's workers and database schema, not CLX's.\n\
         protocol = \"clm\"\n\
         # CLM's jobs database ({}).\n\
         db_path = {}\n\
         # CLM's cache database ({}); the workers get it\n\
         # as CLM_CACHE_DB_PATH below, `clm build` as --cache-db-path.\n\
         cache_db_path = {}\n\
         # CLM's jobs name their files by absolute paths; relative ones would be\n\
         # relative to this folder.\n\
         workspace_path = \"workspace\"\n\
         # Each worker's output goes to <log_dir>/<type>-<slot>.log.\n\
         log_dir = \"logs\"\n",
        f.version,
        f.python.display(),
        build_line(f),
        f.jobs.how,
        toml_str(&f.jobs.path.display().to_string()),
        f.cache.how,
        toml_str(&f.cache.path.display().to_string()),
    );
    for e in &f.entries {
        s.push('\n');
        s.push_str(&entry_text(e, &f.python));
    }
    s
}

/// One `[[workers]]` table, commented out with the reason when the type
/// cannot run here.
fn entry_text(e: &Entry, python: &Path) -> String {
    let command = [
        python.display().to_string(),
        "-m".into(),
        format!("clm.workers.{}", e.worker_type),
    ]
    .iter()
    .map(|w| toml_str(w))
    .collect::<Vec<_>>()
    .join(", ");
    let env = e
        .env
        .iter()
        .map(|(k, v)| format!("{k} = {}", toml_str(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let table = format!(
        "[[workers]]\n\
         worker_type = \"{}\"\n\
         # {}\n\
         count = {}\n\
         # The Python where CLM is installed (its venv's bin need not be on PATH).\n\
         command = [{command}]\n\
         env = {{ {env} }}\n",
        e.worker_type, e.why_count, e.count
    );
    match &e.missing {
        None => table,
        Some(why) => {
            let mut s = format!("# `{}` is left out: {why}\n", e.worker_type);
            for line in table.lines() {
                s.push_str(&format!("# {line}\n"));
            }
            s
        }
    }
}

/// The pool's count of a type (0 when left out).
fn count_of(f: &Found, worker_type: &str) -> u32 {
    f.entries
        .iter()
        .find(|e| e.worker_type == worker_type && e.missing.is_none())
        .map_or(0, |e| e.count)
}

/// The `clm build` command line that reuses the pool: its databases, direct
/// mode, the pool's counts (so CLM finds enough healthy workers and starts
/// none), and `--fail-on-error` (without it CLM exits 0 with outputs
/// missing).
pub fn build_line(f: &Found) -> String {
    let mut words: Vec<String> = f
        .build_env
        .iter()
        .map(|(k, v)| format!("{k}={}", shell_word(v)))
        .collect();
    let spec = f.spec.as_ref().map_or_else(
        || "COURSE/course-specs/COURSE.xml".to_string(),
        |s| s.display().to_string(),
    );
    for w in [
        f.clm_program.as_str(),
        "--jobs-db-path",
        &f.jobs.path.display().to_string(),
        "--cache-db-path",
        &f.cache.path.display().to_string(),
        "build",
        &spec,
        "--workers",
        "direct",
    ] {
        words.push(shell_word(w));
    }
    for t in TYPES {
        words.push(format!("--{t}-workers"));
        words.push(count_of(f, t).to_string());
    }
    words.push("--fail-on-error".into());
    words.join(" ")
}

/// What `init` says it wrote.
pub fn summary(f: &Found) -> String {
    let running: Vec<String> = f
        .entries
        .iter()
        .filter(|e| e.missing.is_none())
        .map(|e| format!("{} ×{}", e.worker_type, e.count))
        .collect();
    let mut lines = vec![format!(
        "CLM {} of {} ({}): {}",
        f.version,
        f.python.display(),
        f.python_how,
        if running.is_empty() {
            "no worker type can run here".into()
        } else {
            running.join(", ")
        }
    )];
    for e in &f.entries {
        if let Some(why) = &e.missing {
            lines.push(format!("  left out: {}: {why}", e.worker_type));
        }
    }
    lines.push(format!("jobs database:  {} ({})", f.jobs.path.display(), f.jobs.how));
    lines.push(format!("cache database: {} ({})", f.cache.path.display(), f.cache.how));
    lines.extend(f.notes.iter().map(|n| format!("note: {n}")));
    lines.join("\n")
}

/// The commands after `check` and `start`.
pub fn then(f: &Found, config: &str) -> Vec<String> {
    vec![
        format!("  clx-pool wait --ready --config {config}"),
        "then build with the pool's workers (it starts none of its own):".into(),
        format!("  {}", build_line(f)),
        format!("and when done: clx-pool stop --config {config}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(dir: &Path, drawio: Option<&str>) -> Found {
        let probe = Probe {
            version: "1.35.0".into(),
            types: TYPES
                .iter()
                .map(|t| {
                    (
                        t.to_string(),
                        (*t == "notebook").then(|| "ModuleNotFoundError: jupytext".into()),
                    )
                })
                .collect(),
            plantuml_jar: Some("/jar/plant uml.jar".into()),
            drawio: drawio.map(String::from),
            java: Some("/usr/bin/java".into()),
        };
        let cache = dir.join("clm_cache.db");
        Found {
            python: "/venv/bin/python".into(),
            python_how: "--python".into(),
            clm_program: "/venv/bin/clm".into(),
            version: probe.version.clone(),
            jobs: Place {
                path: dir.join("clm_jobs.db"),
                how: "test".into(),
            },
            cache: Place {
                path: cache.clone(),
                how: "test".into(),
            },
            spec: Some(dir.join("course-specs/course.xml")),
            notes: Vec::new(),
            entries: entries(&probe, 4, &cache),
            build_env: vec![("PLANTUML_JAR".into(), "/jar/plant uml.jar".into())],
        }
    }

    #[test]
    fn the_written_pool_is_valid_and_runs_what_can_run() {
        let dir = tempfile::tempdir().unwrap();
        let f = found(dir.path(), Some("/opt/drawio"));
        let path = dir.path().join("pool.toml");
        std::fs::write(&path, render(&f)).unwrap();
        let config = crate::config::Config::load(&path).unwrap();
        assert_eq!(config.pool.protocol, Some(crate::vocab::Protocol::Clm));
        assert_eq!(config.pool.cache_db_path, dir.path().join("clm_cache.db"));
        let types: Vec<_> = config
            .workers
            .iter()
            .map(|w| (w.worker_type.as_str(), w.count))
            .collect();
        assert_eq!(types, [("plantuml", 2), ("drawio", 1)], "notebook does not import");
        let plantuml = &config.workers[0];
        assert_eq!(plantuml.env["PLANTUML_JAR"], "/jar/plant uml.jar");
        assert_eq!(
            plantuml.env["CLM_CACHE_DB_PATH"],
            dir.path().join("clm_cache.db").display().to_string()
        );
        assert!(render(&f).contains("# `notebook` is left out: `clm.workers.notebook` does not import"));
    }

    #[test]
    fn the_build_line_asks_for_the_pools_counts_on_its_databases() {
        let dir = Path::new("/course");
        let line = build_line(&found(dir, None));
        assert_eq!(
            line,
            "PLANTUML_JAR='/jar/plant uml.jar' /venv/bin/clm --jobs-db-path /course/clm_jobs.db \
             --cache-db-path /course/clm_cache.db build /course/course-specs/course.xml --workers direct \
             --notebook-workers 0 --plantuml-workers 2 --drawio-workers 0 --fail-on-error"
        );
    }

    #[test]
    fn the_project_root_is_the_nearest_folder_with_a_marker_as_clm_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let course = root.join("repo/courses/python");
        std::fs::create_dir_all(&course).unwrap();
        assert_eq!(find_project_root(&course), (course.clone(), None));
        std::fs::write(root.join("repo/.git"), "gitdir: elsewhere").unwrap();
        assert_eq!(find_project_root(&course), (root.join("repo"), Some(".git")));
        std::fs::create_dir_all(root.join("repo/courses/.clm")).unwrap();
        std::fs::write(root.join("repo/courses/.clm/config.toml"), "").unwrap();
        assert_eq!(
            find_project_root(&course),
            (root.join("repo/courses"), Some(".clm/config.toml"))
        );
    }

    #[test]
    fn shebangs_name_the_interpreter_directly_through_env_or_through_pips_trampoline() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("clm");
        let path_var = std::ffi::OsString::new();
        std::fs::write(&script, "#!/venv/bin/python\nimport sys\n").unwrap();
        assert_eq!(shebang_python(&script, &path_var), Some("/venv/bin/python".into()));
        std::fs::write(
            &script,
            "#!/bin/sh\n'''exec' \"/a/very long/venv/bin/python\" \"$0\" \"$@\"\n' '''\n",
        )
        .unwrap();
        assert_eq!(
            shebang_python(&script, &path_var),
            Some("/a/very long/venv/bin/python".into())
        );
        std::fs::write(&script, "import sys\n").unwrap();
        assert_eq!(shebang_python(&script, &path_var), None);
    }
}
