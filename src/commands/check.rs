//! `clx-pool check`: validates a config (exit 2 on problems, like `start`)
//! and the environment it needs (exit 1): commands on PATH, folders that
//! can be created, no supervisor conflict.

use std::path::{Path, PathBuf};

use crate::config::{Config, ExecutionMode, WorkerProgram};
use crate::executor::docker;
use crate::lock;

pub async fn run(path: &Path) -> anyhow::Result<i32> {
    let config = Config::load(path)?;
    let mut problems = Vec::new();
    let mut docker: Option<Result<bollard::Docker, String>> = None;
    let mut network_checked = false;
    let cwd = config
        .path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    for w in &config.workers {
        let at = format!("{}:{}: workers `{}`", config.path.display(), w.line, w.worker_type);
        if w.execution_mode != ExecutionMode::Direct {
            let image = w.image.clone().unwrap_or_default();
            let client = match docker.get_or_insert(docker::connect().await.map_err(|e| format!("{e:#}"))) {
                Ok(client) => Some(client.clone()),
                Err(e) if w.execution_mode == ExecutionMode::Docker => {
                    problems.push(format!("{at}: execution_mode = \"docker\" needs a Docker engine: {e}"));
                    continue;
                }
                Err(e) => {
                    println!("note: workers `{}`: auto mode will run directly ({e})", w.worker_type);
                    None
                }
            };
            if let Some(client) = client {
                if !image.is_empty() && docker::image_exists(&client, &image).await {
                    println!("ok: workers `{}`: image {image} is on this host", w.worker_type);
                    check_network(&client, &config.pool.network, &mut network_checked, &mut problems).await;
                    continue;
                }
                if w.execution_mode == ExecutionMode::Docker {
                    problems.push(format!(
                        "{at}: the image {image} is not on this host; get it with `docker pull {image}`"
                    ));
                    continue;
                }
                println!(
                    "note: workers `{}`: auto mode will run directly (image `{image}` is not on this host)",
                    w.worker_type
                );
            }
        }
        let (what, program) = match &w.program {
            WorkerProgram::Command(c) => ("command", &c[0]),
            WorkerProgram::JobCommand(c) => ("job_command", &c[0]),
        };
        let path_var = w
            .env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        match find_program(program, &cwd, &path_var) {
            Some(found) => println!(
                "ok: workers `{}`: {what} `{program}` is {}",
                w.worker_type,
                found.display()
            ),
            None => problems.push(format!(
                "{at}: {what} `{program}` was not found (not on PATH, not a file relative to {})",
                cwd.display()
            )),
        }
    }
    for (name, dir) in [
        ("workspace_path", &config.pool.workspace_path),
        ("log_dir", &config.pool.log_dir),
        (
            "db_path folder",
            &config.pool.db_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ),
    ] {
        match nearest_existing(dir) {
            Some(existing) if is_writable(&existing) => {}
            Some(existing) => problems.push(format!(
                "{}: pool.{name}: {} cannot be created or written ({} is not writable)",
                config.path.display(),
                dir.display(),
                existing.display()
            )),
            None => problems.push(format!(
                "{}: pool.{name}: {} cannot be created",
                config.path.display(),
                dir.display()
            )),
        }
    }
    if let Some(pid) = lock::running_supervisor(&config.pool.db_path) {
        println!(
            "note: a supervisor (pid {pid}) is already running for {}",
            config.pool.db_path.display()
        );
    }
    if problems.is_empty() {
        println!(
            "{}: ok ({} workers in {} pools)",
            config.path.display(),
            config.total_workers(),
            config.workers.len()
        );
        Ok(0)
    } else {
        for p in &problems {
            eprintln!("error: {p}");
        }
        Ok(1)
    }
}

fn find_program(program: &str, cwd: &Path, path_var: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = cwd.join(program);
        return is_executable(&p).then_some(p);
    }
    std::env::split_paths(path_var)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn nearest_existing(p: &Path) -> Option<PathBuf> {
    p.ancestors().find(|a| a.exists()).map(Path::to_path_buf)
}

fn is_writable(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Reports whether the pool's docker network exists, is ambiguous, or will
/// be created by `start`.
async fn check_network(client: &bollard::Docker, network: &str, checked: &mut bool, problems: &mut Vec<String>) {
    if std::mem::replace(checked, true) || docker::is_predefined_network(network) {
        return;
    }
    match docker::networks_named(client, network).await {
        Ok(0) => println!("note: docker network {network} does not exist yet; start will create it"),
        Ok(1) => println!("ok: docker network {network} exists"),
        Ok(n) => problems.push(format!(
            "pool.network: {n} docker networks are named {network}, so the name is ambiguous; remove all but one (`docker network ls`)"
        )),
        Err(e) => problems.push(format!("pool.network: {e:#}")),
    }
}
