//! The CLM venv (PyPI `coding-academy-lecture-manager` 1.35, made by
//! `scripts/clm-venv.sh`) for the tests that use CLM's own code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{Pool, repo_path, stderr, stdout};

/// The CLM venv and PlantUML, or None (skipped) when they are missing.
pub struct Clm {
    pub venv: PathBuf,
    pub jar: PathBuf,
}

pub fn clm() -> Option<Clm> {
    let venv = std::env::var_os("CLM_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("target/clm-venv"));
    let venv = std::path::absolute(venv).unwrap();
    let jar =
        PathBuf::from(std::env::var("PLANTUML_JAR").unwrap_or_else(|_| "/usr/share/plantuml/plantuml.jar".into()));
    let problem = if !venv.join(".clx-pool-installed").exists() {
        format!("no CLM venv at {} (run scripts/clm-venv.sh)", venv.display())
    } else if !jar.exists() {
        format!("no PlantUML jar at {} (apt-get install plantuml)", jar.display())
    } else {
        return Some(Clm { venv, jar });
    };
    super::skip(&format!("CLM tests: {problem}"));
    None
}

impl Clm {
    pub fn python(&self) -> PathBuf {
        self.venv.join("bin/python3")
    }

    /// PATH with the venv first (so `python3` is CLM's), and the jar.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = format!(
            "{}:{}",
            self.venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        vec![
            ("PATH".into(), path),
            ("PLANTUML_JAR".into(), self.jar.display().to_string()),
        ]
    }

    /// Runs Python code with CLM importable; `args` become sys.argv[1:].
    pub fn py(&self, code: &str, args: &[&str]) -> Output {
        self.py_env(code, args, &[])
    }

    /// The same, with more environment variables.
    pub fn py_env(&self, code: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = Command::new(self.python())
            .arg("-c")
            .arg(code)
            .args(args)
            .env("PLANTUML_JAR", &self.jar)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "python failed: {}\n{code}", stderr(&out));
        out
    }

    /// `clm build` of the course at `course` (its `course-specs/course.xml`)
    /// into `output`, on the pool's database, asking for `plantuml`
    /// workers in `mode` (`direct`, `docker`) and no others; CLM's log in
    /// `clm-logs` of the pool's folder.
    pub fn build(&self, pool: &Pool, course: &Path, output: &Path, mode: &str, plantuml: u32) -> Command {
        let mut cmd = Command::new(self.venv.join("bin/clm"));
        cmd.arg("--jobs-db-path")
            .arg(pool.db_path())
            .arg("--cache-db-path")
            .arg(pool.path("cache.db"))
            .arg("build")
            .arg(course.join("course-specs/course.xml"))
            .arg("--output-dir")
            .arg(output)
            .args(["--workers", mode, "--plantuml-workers", &plantuml.to_string()])
            .args(["--notebook-workers", "0", "--drawio-workers", "0"])
            .args(["--no-progress", "--no-color", "--no-env-file", "--log-level", "info"])
            .envs(self.env())
            .env("CLM_LOG_DIR", pool.path("clm-logs"))
            .env("COLUMNS", "200")
            .env_remove("CI");
        cmd
    }

    /// A pool of `protocol = "clm"` with the venv on PATH.
    pub fn pool(&self, workers: &str) -> Pool {
        self.pool_with("", workers)
    }

    /// The same, with more `[pool]` keys.
    pub fn pool_with(&self, extra: &str, workers: &str) -> Pool {
        let mut pool = Pool::new(&format!("protocol = \"clm\"\n{extra}"), workers);
        pool.env.extend(self.env());
        pool
    }

    /// Queues a job with CLM's own JobQueue.add_job; returns its id.
    pub fn add_job(&self, db: &Path, job_type: &str, input: &Path, output: &Path, payload: &str) -> i64 {
        let out = self.py(
            "import json, sys\n\
             from pathlib import Path\n\
             from clm.infrastructure.database.job_queue import JobQueue\n\
             q = JobQueue(Path(sys.argv[1]))\n\
             print(q.add_job(sys.argv[2], sys.argv[3], sys.argv[4], 'hash-' + sys.argv[3], json.loads(sys.argv[5])))\n\
             q.close()\n",
            &[
                db.to_str().unwrap(),
                job_type,
                input.to_str().unwrap(),
                output.to_str().unwrap(),
                payload,
            ],
        );
        stdout(&out).trim().parse().unwrap()
    }

    pub fn cancel_jobs_for_file(&self, db: &Path, input: &Path) {
        self.py(
            "import sys\n\
             from pathlib import Path\n\
             from clm.infrastructure.database.job_queue import JobQueue\n\
             q = JobQueue(Path(sys.argv[1]))\n\
             assert q.cancel_jobs_for_file(sys.argv[2]), 'nothing cancelled'\n\
             q.close()\n",
            &[db.to_str().unwrap(), input.to_str().unwrap()],
        );
    }
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The files under `dir` (at any depth) whose extension is `ext`.
pub fn find_files(dir: &Path, ext: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(find_files(&p, ext));
        } else if p.extension().is_some_and(|e| e == ext) {
            out.push(p.display().to_string());
        }
    }
    out
}
