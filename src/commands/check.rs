//! `clx-pool check`: validates a config (exit 2 on problems, like `start`)
//! and the environment it needs (exit 1): the database's protocol, commands
//! on PATH, Python modules that import, folders that can be created, no
//! supervisor conflict.

use std::path::{Path, PathBuf};

use crate::api;
use crate::config::{Config, WorkerConfig, WorkerProgram};
use crate::contract::exit;
use crate::db;
use crate::executor::backends::preflight_entries;
use crate::executor::plan::{self, Decision};
use crate::executor::swarm::{Checked, SwarmEngine};
use crate::executor::{docker, placement};
use crate::lock;
use crate::vocab::{ModeKind, Protocol};

pub async fn run(path: &Path) -> anyhow::Result<i32> {
    let config = Config::load(path)?;
    let protocol = check_protocol(&config)?;
    let cwd = config
        .path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let plan = plan::plan(&config).await;
    let mut problems = Vec::new();
    check_entries(&config, &plan, protocol, &cwd, &mut problems).await;
    if plan.uses_docker()
        && let Some(engine) = &plan.engine
    {
        check_network(&engine.client, &config.pool.network, &mut problems).await;
    }
    if protocol == Protocol::Clm {
        note_cache_paths(&config, &plan, &cwd);
    }
    check_folders(&config, &mut problems);
    check_certificate_names(&config, &mut problems);
    if let Some(swarm) = &plan.swarm {
        check_preflight(&config, swarm, &mut problems).await;
    }
    if lock::running_supervisor(&config.pool.db_path).is_some() {
        let pid = crate::status::supervisor_pid(&config.pool.db_path)
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into());
        super::print(&format!(
            "note: a supervisor (pid {pid}) is already running for {}",
            config.pool.db_path.display()
        ));
    }
    if problems.is_empty() {
        let plural = crate::status::plural;
        super::print(&format!(
            "{}: ok ({} in {}, protocol {protocol})",
            config.path.display(),
            plural(i64::from(config.total_workers()), "worker", "workers"),
            plural(config.workers.len() as i64, "pool", "pools")
        ));
        Ok(exit::OK)
    } else {
        for p in &problems {
            eprintln!("error: {p}");
        }
        Ok(exit::FAILURE)
    }
}

/// Each entry, as its mode needs: a swarm entry's nodes, a docker entry's
/// image and API, a direct entry's program.
async fn check_entries(config: &Config, plan: &plan::Plan, protocol: Protocol, cwd: &Path, problems: &mut Vec<String>) {
    for (w, decision) in config.workers.iter().zip(&plan.decisions) {
        let at = format!("{}:{}: workers `{}`", config.path.display(), w.line, w.worker_type);
        match decision {
            Decision::Cannot(why) => problems.push(format!("{at}: {why}")),
            Decision::Runs { mode, why } => {
                if let Some(why) = why {
                    super::print(&format!("note: workers `{}`: auto mode: {why}", w.worker_type));
                }
                if mode.kind == ModeKind::Swarm {
                    if let Some(swarm) = &plan.swarm {
                        check_swarm_entry(swarm, w, &at, problems).await;
                    }
                } else if mode.kind == ModeKind::Docker {
                    super::print(&format!(
                        "ok: workers `{}`: image {} is on this host",
                        w.worker_type,
                        w.image.as_deref().unwrap_or("")
                    ));
                    if protocol == Protocol::Clm && !matches!(w.program, WorkerProgram::JobCommand(_)) {
                        check_worker_api(config, &w.worker_type, problems);
                    }
                } else {
                    check_program(w, protocol, cwd, &at, problems).await;
                }
            }
        }
    }
}

/// A CLM worker in a container reaches the queue through the Worker API:
/// over a network, with a token.
fn check_worker_api(config: &Config, worker_type: &str, problems: &mut Vec<String>) {
    let pool = &config.pool;
    let at = format!("{}: [pool]", config.path.display());
    if pool.network == "none" {
        problems.push(format!(
            "{at} network = \"none\": CLM workers in containers (`{worker_type}`) reach the worker API over a network"
        ));
        return;
    }
    if let Err(e) = crate::api::token(pool.api_token_file.as_deref()) {
        problems.push(format!("{at} api_token_file: {e:#}"));
        return;
    }
    let listen = match pool.api_listen {
        Some(addr) => addr.to_string(),
        None => format!("127.0.0.1 and the gateway of network {}", pool.network),
    };
    super::print(&format!(
        "ok: workers `{worker_type}`: CLM workers in containers use the worker API on {listen} (bearer token)"
    ));
}

/// A direct entry's program is found, and a `python -m MODULE` imports.
async fn check_program(w: &WorkerConfig, protocol: Protocol, cwd: &Path, at: &str, problems: &mut Vec<String>) {
    let (what, argv) = match w.direct_program(protocol) {
        Some(WorkerProgram::Command(c)) if w.program == WorkerProgram::Default => ("default command", c),
        Some(WorkerProgram::Command(c)) => ("command", c),
        Some(WorkerProgram::JobCommand(c)) => ("job_command", c),
        // Refused by check_protocol.
        Some(WorkerProgram::Default) | None => return,
    };
    let program = &argv[0];
    let path_var = w
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    let Some(found) = find_program(program, cwd, &path_var) else {
        problems.push(format!(
            "{at}: {what} `{program}` was not found (not on PATH, not a file relative to {})",
            cwd.display()
        ));
        return;
    };
    super::print(&format!(
        "ok: workers `{}`: {what} `{program}` is {}",
        w.worker_type,
        found.display()
    ));
    if let Some(module) = python_module(&argv) {
        match module_imports(&found, module, w, cwd).await {
            Ok(()) => super::print(&format!(
                "ok: workers `{}`: `{program} -m {module}` imports",
                w.worker_type
            )),
            Err(e) => problems.push(format!("{at}: {what}: `{program} -m {module}` {e}")),
        }
    }
}

/// Notes where CLM would keep executed notebooks in another file than the
/// pool's `cache_db_path`, which it does without a word: a `clm build` that
/// finds `clm_jobs.db` by CLM's default (at its project root) uses
/// `clm_cache.db` beside it (clm/cli/main.py), and a direct notebook worker
/// uses `CLM_CACHE_DB_PATH`, else `clm_cache.db` in its working folder.
fn note_cache_paths(config: &Config, plan: &plan::Plan, cwd: &Path) {
    use crate::config::{normalize, real_path};
    const VAR: &str = "CLM_CACHE_DB_PATH";
    let cache = real_path(config.pool.cache_db_path.clone());
    let db = &config.pool.db_path;
    let besides = real_path(db.with_file_name("clm_cache.db"));
    if db.file_name().is_some_and(|n| n == "clm_jobs.db") && besides != cache {
        super::print(&format!(
            "note: a `clm build` that finds {} by CLM's default uses the cache {}, not cache_db_path {}: give it --cache-db-path",
            db.display(),
            besides.display(),
            cache.display()
        ));
    }
    for (w, decision) in config.workers.iter().zip(&plan.decisions) {
        let direct = matches!(decision, Decision::Runs { mode, .. } if mode.kind == ModeKind::Direct);
        if w.worker_type != "notebook" || !direct || matches!(w.program, WorkerProgram::JobCommand(_)) {
            continue;
        }
        let (value, from) = match (w.env.get(VAR), std::env::var(VAR).ok().filter(|v| !v.is_empty())) {
            (Some(v), _) => (v.clone(), "its env"),
            (None, Some(v)) => (v, "the supervisor's environment"),
            (None, None) => ("clm_cache.db".to_string(), "CLM's default, in the config's folder"),
        };
        let theirs = real_path(normalize(&std::path::absolute(cwd.join(&value)).unwrap_or_default()));
        if theirs != cache {
            super::print(&format!(
                "note: workers `notebook` keep executed notebooks in {} ({VAR} from {from}), not in cache_db_path {}: set env = {{ {VAR} = \"{}\" }}",
                theirs.display(),
                cache.display(),
                cache.display()
            ));
        }
    }
}

/// The Worker API's certificate names the host workers are told
/// (`api_advertise`), as their TLS client will check it.
fn check_certificate_names(config: &Config, problems: &mut Vec<String>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let (Some(tls), Some(url)) = (&config.pool.api_tls, &config.pool.api_advertise) else {
        return;
    };
    let at = format!("{}: [pool] api_tls_cert", config.path.display());
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let Ok(name) = ServerName::try_from(host) else {
        return problems.push(format!(
            "{at}: api_advertise `{url}` names no host a certificate can name"
        ));
    };
    let leaf = match CertificateDer::pem_file_iter(&tls.cert).and_then(|mut certs| certs.next().transpose()) {
        Ok(Some(cert)) => cert,
        Ok(None) => return problems.push(format!("{at}: {} holds no certificate", tls.cert.display())),
        Err(e) => return problems.push(format!("{at}: reading {}: {e}", tls.cert.display())),
    };
    let verdict = webpki::EndEntityCert::try_from(&leaf).and_then(|c| c.verify_is_valid_for_subject_name(&name));
    match verdict {
        Ok(()) => super::print(&format!(
            "ok: the worker API's certificate names {host} (api_advertise)"
        )),
        Err(e) => problems.push(format!(
            "{at}: {} does not name {host}, the host of api_advertise; the workers' TLS would refuse it ({e:?})",
            tls.cert.display()
        )),
    }
}

/// The workspace, log and database folders can be created and written.
fn check_folders(config: &Config, problems: &mut Vec<String>) {
    let db_dir = config.pool.db_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    for (name, dir) in [
        ("workspace_path", &config.pool.workspace_path),
        ("log_dir", &config.pool.log_dir),
        ("db_path folder", &db_dir),
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
}

/// The protocol the pool will speak: the database's if it exists (which
/// must agree with a configured one), else the configured one, else CLX.
/// Prints it, and checks the entries against it (exit 2 as in `start`).
fn check_protocol(config: &Config) -> anyhow::Result<Protocol> {
    let db = &config.pool.db_path;
    let wanted = config.pool.protocol;
    let protocol = match db::peek(db)? {
        Some(found) => {
            let p = db::decide(db, &found, wanted)?;
            super::print(&format!("ok: protocol {p} (the database {} serves it)", db.display()));
            p
        }
        None => {
            let p = wanted.unwrap_or(Protocol::Clx);
            let why = if wanted.is_some() { "configured" } else { "the default" };
            super::print(&format!("ok: protocol {p} ({why}; {} will be created)", db.display()));
            p
        }
    };
    config.check_protocol(protocol)?;
    Ok(protocol)
}

/// `X` of an argv `[python…, -m, X, …]`.
fn python_module(argv: &[String]) -> Option<&str> {
    let name = Path::new(&argv[0]).file_name()?.to_str()?;
    if !name.starts_with("python") {
        return None;
    }
    let i = argv.iter().position(|a| a == "-m")?;
    argv.get(i + 1).map(String::as_str)
}

/// Imports `module` (and, for a package, finds its `__main__`) with the
/// entry's interpreter and environment, as `python -m` would.
async fn module_imports(python: &Path, module: &str, w: &WorkerConfig, cwd: &Path) -> Result<(), String> {
    let probe = "import importlib, importlib.util, sys\n\
                 m = sys.argv[1]\n\
                 mod = importlib.import_module(m)\n\
                 if hasattr(mod, '__path__') and importlib.util.find_spec(m + '.__main__') is None:\n\
                 \x20   sys.exit(m + ' is a package without __main__')\n";
    let run = tokio::process::Command::new(python)
        .args(["-c", probe, module])
        .envs(&w.env)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(std::time::Duration::from_secs(60), run).await {
        Err(_) => return Err("did not finish importing within 60s".into()),
        Ok(Err(e)) => return Err(format!("could not be run: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or("").trim().to_string();
    Err(format!("fails to import: {last}"))
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

/// Whether `p` is a file someone may execute.
pub(super) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn nearest_existing(p: &Path) -> Option<PathBuf> {
    p.ancestors().find(|a| a.exists()).map(Path::to_path_buf)
}

fn is_writable(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Reports whether the pool's docker network exists, is ambiguous, or will
/// be created by `start`.
/// A swarm entry: the nodes that can take its tasks (ready, active, its
/// constraints and reservations), and whether its image is pinned.
async fn check_swarm_entry(swarm: &SwarmEngine, w: &WorkerConfig, at: &str, problems: &mut Vec<String>) {
    let nodes = match swarm.nodes().await {
        Ok(n) => n,
        Err(e) => return problems.push(format!("{at}: {e:#}")),
    };
    let mut fitting = Vec::new();
    for n in &nodes {
        match placement::fits(&w.placement, n) {
            Ok(true) => fitting.push(format!("{} ({}, {})", n.hostname, n.role, &n.id[..n.id.len().min(12)])),
            Ok(false) => {}
            Err(e) => return problems.push(format!("{at}: constraints: {e}")),
        }
    }
    if fitting.is_empty() {
        let mut wants = vec!["ready and active".to_string()];
        wants.extend(w.placement.constraints.iter().map(|c| format!("`{c}`")));
        wants.extend(w.placement.cpu_reservation.map(|c| format!("{c} free CPUs")));
        wants.extend(
            w.placement
                .memory_reservation
                .map(|m| format!("{} free memory", crate::config::format_size(m))),
        );
        problems.push(format!(
            "{at}: none of the swarm's {} node(s) can take its tasks ({})",
            nodes.len(),
            wants.join(", ")
        ));
    } else {
        super::print(&format!(
            "ok: workers `{}`: {} of {} node(s) can take its tasks: {}",
            w.worker_type,
            fitting.len(),
            nodes.len(),
            fitting.join(", ")
        ));
    }
    let image = w.image.as_deref().unwrap_or("");
    if !image.contains("@sha256:") {
        super::print(&format!(
            "note: workers `{}`: image {image} is not pinned by digest (name@sha256:…): nodes may run different builds of it",
            w.worker_type
        ));
    }
}

async fn check_network(client: &bollard::Docker, network: &str, problems: &mut Vec<String>) {
    if docker::is_predefined_network(network) {
        return;
    }
    match docker::networks_named(client, network).await {
        Ok(0) => super::print(&format!("note: docker network {network} does not exist yet; start will create it")),
        Ok(1) => super::print(&format!("ok: docker network {network} exists")),
        Ok(n) => problems.push(format!(
            "pool.network: {n} docker networks are named {network}, so the name is ambiguous; remove all but one (`docker network ls`)"
        )),
        Err(e) => problems.push(format!("pool.network: {e:#}")),
    }
}

/// `start`'s preflight, before anything starts: one task per placement of
/// the swarm entries must reach the Worker API at `api_advertise` and read
/// and write the shared workspace. With no supervisor serving the API,
/// `check` serves its `/health` at `api_listen` while the tasks run; a CA
/// secret it made is removed afterwards.
async fn check_preflight(config: &Config, swarm: &SwarmEngine, problems: &mut Vec<String>) {
    let (Some(url), Some(listen)) = (&config.pool.api_advertise, config.pool.api_listen) else {
        return;
    };
    if !problems.is_empty() {
        return super::print("note: swarm preflight not run: the problems below come first");
    }
    if !config.pool.workspace_path.is_dir() {
        return super::print(&format!(
            "note: swarm preflight not run: workspace_path {} does not exist yet (`start` makes it, then runs the preflight)",
            config.pool.workspace_path.display()
        ));
    }
    let file = config.path.display();
    let serving = if lock::running_supervisor(&config.pool.db_path).is_some() {
        None
    } else {
        let tls = match config.pool.api_tls.as_ref().map(api::Tls::load).transpose() {
            Ok(tls) => tls,
            Err(e) => return problems.push(format!("{file}: {e:#}")),
        };
        match api::serve_health(listen, tls).await {
            Ok(serving) => Some(serving),
            Err(e) => return problems.push(format!("{file}: swarm preflight: {e:#}")),
        }
    };
    for (w, outcome) in preflight_entries(swarm, url, config).await {
        let at = format!("{file}:{}: workers `{}`", w.line, w.worker_type);
        match outcome {
            Ok(Checked::Passed(node)) => super::print(&format!(
                "ok: workers `{}`: preflight on {node}: the worker API answers at {url} and the shared workspace is read and written there",
                w.worker_type
            )),
            Ok(Checked::NotPlaced(why)) => problems.push(format!("{at}: preflight: no node took its task ({why})")),
            Err(why) => problems.push(format!("{at}: preflight: {why}")),
        }
    }
    swarm.remove_made_ca().await;
    if let Some(serving) = serving {
        serving.stop().await;
    }
}
