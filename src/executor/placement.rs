//! Which nodes of a swarm can take an entry's tasks, as Swarm decides it
//! (its constraint syntax and resource reservations), so `check` can say
//! so before anything starts. Pure: the nodes are read by the caller.

use std::collections::HashMap;

use crate::config::Placement;

/// What placement looks at on one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub id: String,
    pub hostname: String,
    /// `manager` or `worker`.
    pub role: String,
    pub os: String,
    pub arch: String,
    pub labels: HashMap<String, String>,
    pub engine_labels: HashMap<String, String>,
    /// Ready and available for new tasks (not paused or drained).
    pub schedulable: bool,
    pub nano_cpus: i64,
    pub memory_bytes: i64,
}

/// Whether one constraint (`KEY == VALUE` or `KEY != VALUE`) holds on a
/// node; an error for a key Swarm does not know.
pub fn holds(constraint: &str, node: &NodeFacts) -> Result<bool, String> {
    let (key, equal, value) = match (constraint.split_once("=="), constraint.split_once("!=")) {
        (Some((k, v)), _) => (k.trim(), true, v.trim()),
        (None, Some((k, v))) => (k.trim(), false, v.trim()),
        (None, None) => return Err(format!("`{constraint}` is not KEY == VALUE or KEY != VALUE")),
    };
    let actual = match key {
        "node.id" => Some(node.id.as_str()),
        "node.hostname" => Some(node.hostname.as_str()),
        "node.role" => Some(node.role.as_str()),
        "node.platform.os" => Some(node.os.as_str()),
        "node.platform.arch" => Some(node.arch.as_str()),
        k => match (k.strip_prefix("node.labels."), k.strip_prefix("engine.labels.")) {
            (Some(label), _) => node.labels.get(label).map(String::as_str),
            (_, Some(label)) => node.engine_labels.get(label).map(String::as_str),
            _ => {
                return Err(format!(
                    "`{key}` is not a key Swarm places by (node.id, node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.*, engine.labels.*)"
                ));
            }
        },
    };
    // Swarm compares case-insensitively; a missing label never equals.
    let same = actual.is_some_and(|a| a.eq_ignore_ascii_case(value));
    Ok(if equal { same } else { !same })
}

/// Whether a node can take a task of an entry: schedulable, every
/// constraint holds, the reservations fit its resources.
pub fn fits(p: &Placement, node: &NodeFacts) -> Result<bool, String> {
    for c in &p.constraints {
        if !holds(c, node)? {
            return Ok(false);
        }
    }
    let cpus_fit = p.cpu_reservation.is_none_or(|c| (c * 1e9) as i64 <= node.nano_cpus);
    let memory_fits = p.memory_reservation.is_none_or(|m| m as i64 <= node.memory_bytes);
    Ok(node.schedulable && cpus_fit && memory_fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(role: &str, labels: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            id: "abc".into(),
            hostname: "build1".into(),
            role: role.into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            engine_labels: HashMap::new(),
            schedulable: true,
            nano_cpus: 2_000_000_000,
            memory_bytes: 4 << 30,
        }
    }

    #[test]
    fn constraints_hold_as_swarm_reads_them() {
        let n = node("worker", &[("clm", "true")]);
        let cases: &[(&str, Result<bool, ()>)] = &[
            ("node.role == worker", Ok(true)),
            ("node.role==manager", Ok(false)),
            ("node.role != manager", Ok(true)),
            ("node.labels.clm == true", Ok(true)),
            ("node.labels.clm == TRUE", Ok(true)),
            ("node.labels.rack == a", Ok(false)),
            ("node.labels.rack != a", Ok(true)),
            ("node.hostname == build1", Ok(true)),
            ("node.platform.os == linux", Ok(true)),
            ("engine.labels.gpu == yes", Ok(false)),
            ("node.colour == blue", Err(())),
            ("node.role", Err(())),
        ];
        for (c, expected) in cases {
            assert_eq!(holds(c, &n).map_err(|_| ()), *expected, "{c}");
        }
    }

    #[test]
    fn a_node_fits_when_every_constraint_holds_and_the_reservations_fit() {
        let n = node("worker", &[("clm", "true")]);
        let p = |constraints: &[&str], cpus: Option<f64>, mem: Option<u64>| Placement {
            constraints: constraints.iter().map(|c| c.to_string()).collect(),
            cpu_reservation: cpus,
            memory_reservation: mem,
            ..Placement::default()
        };
        assert_eq!(fits(&p(&[], None, None), &n), Ok(true));
        assert_eq!(
            fits(&p(&["node.labels.clm == true"], Some(2.0), Some(4 << 30)), &n),
            Ok(true)
        );
        assert_eq!(fits(&p(&["node.labels.clm == false"], None, None), &n), Ok(false));
        assert_eq!(fits(&p(&[], Some(2.5), None), &n), Ok(false), "more CPUs than it has");
        assert_eq!(
            fits(&p(&[], None, Some(8 << 30)), &n),
            Ok(false),
            "more memory than it has"
        );
        let paused = NodeFacts {
            schedulable: false,
            ..n.clone()
        };
        assert_eq!(fits(&p(&[], None, None), &paused), Ok(false));
        assert!(fits(&p(&["node.colour == blue"], None, None), &n).is_err());
    }
}
