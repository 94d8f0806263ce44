//! Every rendering of one pool's picture shows the same counts: `stats`
//! (text and `--json`), the Prometheus gauges, systemd's STATUS line and
//! `top`, for a pool with and without a running supervisor, under both
//! protocols.

use std::collections::BTreeMap;

use crate::db::fixture::Fixture;
use crate::status::{self, Detail, Liveness, Status};
use crate::vocab::Protocol;

/// What every rendering must agree on.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    /// Running slots per type.
    running: BTreeMap<String, i64>,
    /// Live workers (idle, busy, hung) per type.
    live: BTreeMap<String, i64>,
    /// This run's jobs: pending, processing, completed, failed.
    jobs: [i64; 4],
}

fn from_json(s: &Status) -> Counts {
    let v = serde_json::to_value(s).unwrap();
    let mut c = Counts::default();
    for (t, p) in v["pools"].as_object().unwrap() {
        c.running.insert(t.clone(), p["running"].as_i64().unwrap());
    }
    for (t, by) in v["workers"].as_object().unwrap() {
        let n = ["idle", "busy", "hung"].iter().filter_map(|k| by[*k].as_i64()).sum();
        c.live.insert(t.clone(), n);
    }
    let j = &v["jobs"];
    c.jobs = ["pending", "processing", "completed", "failed"].map(|k| j[k].as_i64().unwrap());
    c
}

/// The numbers after each word of `words` in `line` ("2 pending, 1 …").
fn numbers_before(line: &str, words: &[&str]) -> Vec<i64> {
    let tokens: Vec<&str> = line.split([' ', ',', '·']).filter(|t| !t.is_empty()).collect();
    words
        .iter()
        .map(|w| {
            let at = tokens
                .iter()
                .position(|t| t == w)
                .unwrap_or_else(|| panic!("no `{w}` in {line}"));
            tokens[at - 1].parse().unwrap()
        })
        .collect()
}

const JOB_WORDS: [&str; 4] = ["pending", "processing", "completed", "failed"];

fn from_text(s: &Status) -> Counts {
    let text = super::stats::render(s);
    let lines: Vec<&str> = text.lines().collect();
    let header_at = lines.iter().position(|l| l.trim_start().starts_with("TYPE")).unwrap();
    let header: Vec<&str> = lines[header_at].split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut c = Counts::default();
    for row in lines[header_at + 1..].iter().take_while(|l| !l.trim().is_empty()) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let n = |name: &str| cells[col(name)].parse::<i64>().unwrap_or(0);
        c.running.insert(cells[0].into(), n("RUNNING"));
        c.live.insert(cells[0].into(), n("IDLE") + n("BUSY") + n("HUNG"));
    }
    let jobs = lines.iter().find(|l| l.starts_with("jobs")).unwrap();
    c.jobs = numbers_before(jobs, &JOB_WORDS).try_into().unwrap();
    c
}

fn from_prometheus(s: &Status) -> Counts {
    let text = crate::status::prometheus::render(s, |_| ()).unwrap();
    let mut c = Counts::default();
    let mut jobs = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let label = |name: &str| {
            let at = series.find(&format!("{name}=\"")).map(|i| i + name.len() + 2);
            at.map(|i| series[i..].split('"').next().unwrap().to_string())
        };
        let (Some(t), Some(state)) = (label("worker_type"), label("state")) else {
            continue;
        };
        let n: i64 = value.parse().unwrap();
        match series.split('{').next().unwrap() {
            "clx_pool_slots" if state == "running" => *c.running.entry(t).or_default() += n,
            "clx_pool_slots" => drop(c.running.entry(t).or_default()),
            "clx_pool_workers" if ["idle", "busy", "hung"].contains(&state.as_str()) => {
                *c.live.entry(t).or_default() += n
            }
            "clx_pool_workers" => drop(c.live.entry(t).or_default()),
            "clx_pool_jobs" => *jobs.entry(state).or_insert(0) += n,
            _ => {}
        }
    }
    c.jobs = JOB_WORDS.map(|k| jobs.get(k).copied().unwrap_or(0));
    c
}

/// The STATUS line has totals only.
fn status_line_totals(s: &Status) -> (i64, [i64; 4]) {
    let line = crate::status::status_line(&s.summary());
    let running = line.split('/').next().unwrap().parse().unwrap();
    let jobs = if line.contains("queue empty") {
        let done = numbers_before(&line, &["completed", "failed"]);
        [0, 0, done[0], done[1]]
    } else {
        numbers_before(&line, &JOB_WORDS).try_into().unwrap()
    };
    (running, jobs)
}

fn from_top(s: &Status) -> Counts {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    let snap = super::top::Snapshot {
        queue: s.pending().map(|(t, n, age)| (t.to_string(), (n, age))).collect(),
        stats: s.clone(),
        rates: Vec::new(),
    };
    let mut terminal = Terminal::new(TestBackend::new(140, 40)).unwrap();
    terminal
        .draw(|f| super::top::draw(f, &snap, &mut super::top::Ui::default()))
        .unwrap();
    let screen: Vec<String> = terminal
        .backend()
        .buffer()
        .content()
        .chunks(140)
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>().replace('│', " "))
        .collect();
    let mut c = Counts::default();
    for t in s.pools.keys() {
        let row = screen
            .iter()
            .find(|l| l.split_whitespace().next() == Some(t.as_str()))
            .unwrap_or_else(|| panic!("no row for {t}:\n{}", screen.join("\n")));
        let cells: Vec<&str> = row.split_whitespace().collect();
        // TYPE MODE WANTED RUNNING …
        c.running.insert(t.clone(), cells[3].parse().unwrap());
        let live = screen
            .iter()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.starts_with(&format!("{t}-")))
            })
            .count();
        c.live.insert(t.clone(), live as i64);
    }
    let queue = screen.iter().find(|l| l.trim_start().starts_with("queue:")).unwrap();
    c.jobs = numbers_before(queue, &JOB_WORDS).try_into().unwrap();
    c
}

#[test]
fn every_rendering_of_a_pool_shows_the_same_counts() {
    for protocol in Protocol::ALL {
        let f = Fixture::new(*protocol);
        for live in [Liveness::Running(Some(f.pid as i32)), Liveness::NotRunning] {
            let all = Detail {
                workers: true,
                events: true,
            };
            let s = status::build(&f.conn, f.protocol, &f.path, live, all).unwrap();
            let json = from_json(&s);
            let at = format!("{protocol}, {live:?}");
            assert_eq!(json.running.values().sum::<i64>(), s.running_slots(), "{at}");
            assert_eq!(from_text(&s), json, "stats vs stats --json, {at}");
            assert_eq!(from_prometheus(&s), json, "--prometheus vs stats --json, {at}");
            assert_eq!(from_top(&s), json, "top vs stats --json, {at}");
            let (running, jobs) = status_line_totals(&s);
            assert_eq!((running, jobs), (s.running_slots(), json.jobs), "STATUS line, {at}");
        }
    }
}
