//! How each `[[workers]]` entry will run, decided once, the same way for
//! `start` (which runs the plan) and `check` (which reports it): `docker`
//! needs a reachable engine and the image on this host (clx-pool never
//! pulls), `auto` falls back to direct without them, `direct` never touches
//! Docker. Docker is asked only if some entry may use it, and only once;
//! `swarm` needs a swarm manager's engine (`[swarm] docker_host`), asked
//! once if some entry is a swarm entry. Images of swarm entries are the
//! nodes' business (each node pulls or has it), not this host's.

use std::sync::Arc;

use super::docker::{self, DockerEngine};
use super::swarm::{self, SwarmEngine};
use crate::config::{Config, ExecutionMode};
use crate::vocab::{Mode, ModeKind};

/// What is known of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    Up,
    Down(String),
}

/// What is known of an entry's image on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    Present,
    Missing,
    NotConfigured,
}

/// How one entry runs, or why it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Runs in this mode; for `auto`, why it chose it.
    Runs { mode: Mode, why: Option<String> },
    /// A `docker` entry without its engine or image.
    Cannot(String),
}

/// The rule, without I/O.
pub fn decide(wanted: ExecutionMode, engine: &Engine, image: Image, image_name: &str) -> Decision {
    let direct = |why: Option<String>| Decision::Runs {
        mode: Mode {
            kind: ModeKind::Direct,
            auto: wanted == ExecutionMode::Auto,
        },
        why,
    };
    let docker = |why: Option<String>| Decision::Runs {
        mode: Mode {
            kind: ModeKind::Docker,
            auto: wanted == ExecutionMode::Auto,
        },
        why,
    };
    match (wanted, engine, image) {
        (ExecutionMode::Direct, _, _) => direct(None),
        (ExecutionMode::Swarm, Engine::Up, _) => Decision::Runs {
            mode: Mode {
                kind: ModeKind::Swarm,
                auto: false,
            },
            why: None,
        },
        (ExecutionMode::Swarm, Engine::Down(e), _) => {
            Decision::Cannot(format!("execution_mode = \"swarm\" needs a swarm manager: {e}"))
        }
        (ExecutionMode::Docker, Engine::Down(e), _) => {
            Decision::Cannot(format!("execution_mode = \"docker\" needs a Docker engine: {e}"))
        }
        (ExecutionMode::Docker, Engine::Up, Image::Present) => docker(None),
        (ExecutionMode::Docker, Engine::Up, _) => Decision::Cannot(format!(
            "the image {image_name} is not on this host; clx-pool never pulls: get it with `docker pull {image_name}`{}",
            build_hint(image_name)
        )),
        (ExecutionMode::Auto, Engine::Down(e), _) => direct(Some(format!("running directly ({e})"))),
        (ExecutionMode::Auto, Engine::Up, Image::NotConfigured) => {
            direct(Some("running directly (no image configured)".into()))
        }
        (ExecutionMode::Auto, Engine::Up, Image::Missing) => direct(Some(format!(
            "running directly (the image {image_name} is not on this host)"
        ))),
        (ExecutionMode::Auto, Engine::Up, Image::Present) => docker(Some(format!("running in docker ({image_name})"))),
    }
}

/// For the project's own test image, where it comes from.
fn build_hint(image: &str) -> &'static str {
    if image.starts_with("clx-pool/") {
        " (or build it: `make docker-image`)"
    } else {
        ""
    }
}

/// The decisions for a whole config, and the engines reached.
pub struct Plan {
    pub engine: Option<Arc<DockerEngine>>,
    /// The swarm manager, if a swarm entry needs it.
    pub swarm: Option<Arc<SwarmEngine>>,
    /// One per `[[workers]]` entry, in order.
    pub decisions: Vec<Decision>,
}

impl Plan {
    pub fn uses_docker(&self) -> bool {
        self.decisions.iter().any(|d| {
            matches!(
                d,
                Decision::Runs {
                    mode: Mode {
                        kind: ModeKind::Docker,
                        ..
                    },
                    ..
                }
            )
        })
    }
}

/// Asks the engine (once, if any entry may use it) and the images, and
/// decides every entry.
pub async fn plan(config: &Config) -> Plan {
    let needs_engine = config
        .workers
        .iter()
        .any(|w| matches!(w.execution_mode, ExecutionMode::Docker | ExecutionMode::Auto));
    let (engine, state) = if needs_engine {
        match docker::connect().await {
            Ok(client) => (Some(DockerEngine::new(client, &config.pool.db_path)), Engine::Up),
            Err(e) => (None, Engine::Down(format!("{e:#}"))),
        }
    } else {
        (None, Engine::Down("not needed".into()))
    };
    let (swarm, swarm_state) = reach_swarm(config).await;
    let mut decisions = Vec::new();
    for w in &config.workers {
        decisions.push(match w.execution_mode {
            ExecutionMode::Swarm => decide(w.execution_mode, &swarm_state, Image::NotConfigured, ""),
            _ => decide_with(w, &state, engine.as_ref().map(|e| &e.client)).await,
        });
    }
    Plan {
        engine,
        swarm,
        decisions,
    }
}

/// The swarm manager, if a swarm entry needs it.
async fn reach_swarm(config: &Config) -> (Option<Arc<SwarmEngine>>, Engine) {
    if !config.workers.iter().any(|w| w.execution_mode == ExecutionMode::Swarm) {
        return (None, Engine::Down("not needed".into()));
    }
    match swarm::connect(config.pool.swarm.docker_host.as_deref()).await {
        Ok((client, address)) => (
            Some(SwarmEngine::new(client, address, &config.pool.db_path)),
            Engine::Up,
        ),
        Err(e) => (None, Engine::Down(format!("{e:#}"))),
    }
}

/// One entry, with the engine as it is known (a reload uses the running
/// pool's engine, or none if it started without Docker).
pub async fn decide_one(
    w: &crate::config::WorkerConfig,
    client: Option<&bollard::Docker>,
    swarm: Option<&SwarmEngine>,
) -> Decision {
    if w.execution_mode == ExecutionMode::Swarm {
        let state = match swarm {
            Some(_) => Engine::Up,
            None => Engine::Down("the pool started without a swarm manager; restart it to add swarm entries".into()),
        };
        return decide(w.execution_mode, &state, Image::NotConfigured, "");
    }
    let state = match client {
        Some(_) => Engine::Up,
        None => Engine::Down("the pool runs without a Docker engine".into()),
    };
    decide_with(w, &state, client).await
}

async fn decide_with(w: &crate::config::WorkerConfig, state: &Engine, client: Option<&bollard::Docker>) -> Decision {
    let name = w.image.clone().unwrap_or_default();
    let image = match (client, w.image.as_deref()) {
        (_, None) => Image::NotConfigured,
        (Some(c), Some(i)) if w.execution_mode != ExecutionMode::Direct => {
            if docker::image_exists(c, i).await {
                Image::Present
            } else {
                Image::Missing
            }
        }
        _ => Image::Missing,
    };
    decide(w.execution_mode, state, image, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(kind: ModeKind, auto: bool) -> Mode {
        Mode { kind, auto }
    }

    #[test]
    fn the_decision_table() {
        use ExecutionMode::*;
        use Image::*;
        let up = Engine::Up;
        let down = Engine::Down("no engine".into());
        let cases: &[(ExecutionMode, &Engine, Image, Result<Mode, &str>)] = &[
            (Direct, &up, Present, Ok(runs(ModeKind::Direct, false))),
            (Direct, &down, Missing, Ok(runs(ModeKind::Direct, false))),
            (Docker, &up, Present, Ok(runs(ModeKind::Docker, false))),
            (Docker, &up, Missing, Err("is not on this host")),
            (Docker, &down, Present, Err("needs a Docker engine: no engine")),
            (Auto, &up, Present, Ok(runs(ModeKind::Docker, true))),
            (Auto, &up, Missing, Ok(runs(ModeKind::Direct, true))),
            (Auto, &up, NotConfigured, Ok(runs(ModeKind::Direct, true))),
            (Auto, &down, Present, Ok(runs(ModeKind::Direct, true))),
            (Swarm, &up, NotConfigured, Ok(runs(ModeKind::Swarm, false))),
            (Swarm, &down, NotConfigured, Err("needs a swarm manager: no engine")),
        ];
        for (wanted, engine, image, expected) in cases {
            let got = decide(*wanted, engine, *image, "img:1");
            match (expected, &got) {
                (Ok(m), Decision::Runs { mode, .. }) => assert_eq!(mode, m, "{wanted:?} {engine:?} {image:?}"),
                (Err(text), Decision::Cannot(why)) => assert!(why.contains(text), "{why}"),
                _ => panic!("{wanted:?} {engine:?} {image:?}: {got:?}"),
            }
        }
        let Decision::Cannot(why) = decide(Docker, &up, Missing, "clx-pool/test:0.1.0") else {
            panic!()
        };
        assert!(why.ends_with("(or build it: `make docker-image`)"), "{why}");
    }
}
