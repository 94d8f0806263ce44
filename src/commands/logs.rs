//! `clx-pool logs [TYPE | TYPE-N ...] [-f] [-n N] [--since AGE]`: the
//! workers' log files (`<log_dir>/<type>-<slot>.log` and their rotations,
//! both modes), interleaved by the time on each line, each prefixed with
//! its slot. `-f` follows them across rotations, restarts and new slots.
//! Works whether or not a pool runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::target;
use crate::UsageError;
use crate::cli::DbArgs;
use crate::contract::{self, SlotId, exit};

pub struct Options {
    pub targets: Vec<String>,
    pub follow: bool,
    pub lines: usize,
    pub since: Option<Duration>,
    pub log_dir: Option<PathBuf>,
}

/// How often `-f` looks for new output.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// One line of a worker's log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    at: Option<SystemTime>,
    slot: String,
    text: String,
}

pub async fn run(args: &DbArgs, o: Options) -> anyhow::Result<i32> {
    let log_dir = match &o.log_dir {
        Some(d) => d.clone(),
        None => {
            let t = target(args)?;
            match &t.config {
                Some(c) => c.pool.log_dir.clone(),
                None => t.db_path.parent().unwrap_or(Path::new(".")).join("logs"),
            }
        }
    };
    if !log_dir.is_dir() {
        return Err(UsageError(format!(
            "there are no worker logs in {} (no such folder)",
            log_dir.display()
        ))
        .into());
    }
    let since = o.since.map(|d| SystemTime::now() - d);
    let wanted = |slot: &str| o.targets.is_empty() || o.targets.iter().any(|t| matches(t, slot));
    let mut lines = Vec::new();
    for (slot, files) in slot_files(&log_dir)? {
        if !wanted(&slot) {
            continue;
        }
        for f in files {
            lines.extend(read_lines(&f, &slot)?);
        }
    }
    // Stable: lines of one file keep their order.
    lines.sort_by_key(|l| l.at);
    let lines: Vec<Line> = lines
        .into_iter()
        .filter(|l| since.is_none_or(|s| l.at.is_none_or(|at| at >= s)))
        .collect();
    for l in &lines[lines.len().saturating_sub(o.lines)..] {
        super::print(&format!("{:<14} | {}", l.slot, l.text));
    }
    if o.follow {
        follow(&log_dir, &wanted).await?;
    }
    Ok(exit::OK)
}

/// Whether a target (`TYPE` or `TYPE-N`) names a slot (`TYPE-N`).
fn matches(target: &str, slot: &str) -> bool {
    slot == target || slot.parse::<SlotId>().is_ok_and(|s| s.worker_type == target)
}

/// The log files of every slot, oldest rotation first.
fn slot_files(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut out: BTreeMap<String, Vec<(u32, PathBuf)>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((slot, rotation)) = contract::parse_log_file(name) else {
            continue;
        };
        out.entry(slot.to_string()).or_default().push((rotation, path));
    }
    Ok(out
        .into_iter()
        .map(|(slot, mut files)| {
            files.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
            (slot, files.into_iter().map(|(_, p)| p).collect())
        })
        .collect())
}

/// A line as written by `RotatingLog::write_lines`: "<RFC 3339> text".
fn parse(raw: &str, slot: &str, last: Option<SystemTime>) -> Line {
    match raw
        .split_once(' ')
        .and_then(|(t, rest)| Some((humantime::parse_rfc3339(t).ok()?, rest)))
    {
        Some((at, text)) => Line {
            at: Some(at),
            slot: slot.to_string(),
            text: text.to_string(),
        },
        None => Line {
            at: last,
            slot: slot.to_string(),
            text: raw.to_string(),
        },
    }
}

fn read_lines(path: &Path, slot: &str) -> anyhow::Result<Vec<Line>> {
    let file = match File::open(path) {
        Ok(f) => f,
        // Rotated away meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out: Vec<Line> = Vec::new();
    for raw in BufReader::new(file).split(b'\n') {
        let raw = String::from_utf8_lossy(&raw?).into_owned();
        let last = out.last().and_then(|l| l.at);
        out.push(parse(&raw, slot, last));
    }
    Ok(out)
}

/// A followed file: read up to `offset`; `partial` holds a line not yet
/// ended.
struct Followed {
    file: File,
    inode: u64,
    offset: u64,
    partial: String,
}

impl Followed {
    fn open(path: &Path, at_end: bool) -> Option<Followed> {
        let mut file = File::open(path).ok()?;
        let meta = file.metadata().ok()?;
        let offset = if at_end { meta.len() } else { 0 };
        file.seek(SeekFrom::Start(offset)).ok()?;
        Some(Followed {
            file,
            inode: meta.ino(),
            offset,
            partial: String::new(),
        })
    }

    /// Whole lines added since the last read.
    fn read_new(&mut self) -> Vec<String> {
        let mut buf = Vec::new();
        if self.file.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = lines.pop().unwrap_or_default();
        lines
    }
}

/// The whole lines of the rotated files of `slot` newer than the one with
/// `inode` (all of them if it is gone), oldest first.
fn rotated_since(dir: &Path, slot: &str, inode: u64) -> Vec<String> {
    let files = slot_files(dir)
        .ok()
        .and_then(|mut m| m.remove(slot))
        .unwrap_or_default();
    let rotated: Vec<&PathBuf> = files
        .iter()
        .filter(|p| !p.ends_with(contract::log_file(slot)))
        .collect();
    let start = rotated
        .iter()
        .position(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == inode))
        .map(|i| i + 1)
        .unwrap_or(0);
    rotated[start..]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .flat_map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn follow(dir: &Path, wanted: &dyn Fn(&str) -> bool) -> anyhow::Result<()> {
    let mut followed: BTreeMap<String, Followed> = BTreeMap::new();
    // What exists now was printed above; follow from its end.
    for slot in slot_files(dir)?.into_keys().filter(|s| wanted(s)) {
        if let Some(f) = Followed::open(&dir.join(contract::log_file(&slot)), true) {
            followed.insert(slot, f);
        }
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let mut batch: Vec<Line> = Vec::new();
        for slot in slot_files(dir)?.into_keys().filter(|s| wanted(s)) {
            let path = dir.join(contract::log_file(&slot));
            let inode = std::fs::metadata(&path).map(|m| m.ino()).ok();
            let f = match followed.get_mut(&slot) {
                Some(f) => f,
                None => match Followed::open(&path, false) {
                    // A new slot (scaled up) or a first log.
                    Some(f) => followed.entry(slot.clone()).or_insert(f),
                    None => continue,
                },
            };
            let mut raw = f.read_new();
            // Rotated (a new file at the path) or truncated: the rest of the
            // old file was read above; then the rotations made since, and
            // the new file from its start.
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if (inode.is_some_and(|i| i != f.inode) || size < f.offset)
                && let Some(mut new) = Followed::open(&path, false)
            {
                raw.extend(rotated_since(dir, &slot, f.inode));
                raw.extend(new.read_new());
                *f = new;
            }
            let mut last = None;
            for r in raw {
                let line = parse(&r, &slot, last);
                last = line.at;
                batch.push(line);
            }
        }
        batch.sort_by_key(|l| l.at);
        for l in batch {
            super::print(&format!("{:<14} | {}", l.slot, l.text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_types_or_slots() {
        assert!(matches("upper", "upper-0"));
        assert!(matches("upper-1", "upper-1"));
        assert!(!matches("upper-1", "upper-10"));
        assert!(!matches("up", "upper-0"));
        assert!(matches("pdf-convert", "pdf-convert-3"));
    }

    #[test]
    fn lines_without_a_time_keep_the_one_before() {
        let a = parse("2026-11-26T17:00:00.123Z hello", "w-0", None);
        assert_eq!(a.text, "hello");
        let b = parse("  continued", "w-0", a.at);
        assert_eq!((b.at, b.text.as_str()), (a.at, "  continued"));
    }
}
