//! The placeholders of a `job_command`: `{input}`, `{output}`, `{payload}`,
//! `{payload_file}` and `{job_id}`, filled in one pass, so a value that
//! itself contains `{job_id}` (a file named `y{job_id}.txt`) stays as it is.

/// Every placeholder name.
pub const NAMES: &[&str] = &["input", "output", "payload", "payload_file", "job_id"];

/// The placeholders `arg` uses, in order of appearance.
pub fn used_in(arg: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    scan(arg, |piece| {
        if let Piece::Placeholder(name) = piece {
            out.push(name);
        }
    });
    out
}

/// `arg` with every placeholder replaced by `value(name)`; the values are
/// not scanned again.
pub fn expand(arg: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(arg.len());
    scan(arg, |piece| match piece {
        Piece::Text(t) => out.push_str(t),
        Piece::Placeholder(name) => out.push_str(&value(name)),
    });
    out
}

enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'static str),
}

fn scan<'a>(arg: &'a str, mut f: impl FnMut(Piece<'a>)) {
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let known = after
            .find('}')
            .and_then(|close| NAMES.iter().find(|n| **n == &after[..close]));
        match known {
            Some(name) => {
                f(Piece::Text(&rest[..open]));
                f(Piece::Placeholder(name));
                rest = &after[name.len() + 1..];
            }
            None => {
                f(Piece::Text(&rest[..=open]));
                rest = after;
            }
        }
    }
    f(Piece::Text(rest));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(name: &str) -> String {
        match name {
            "input" => "/w/y{job_id}.txt".into(),
            "output" => "/w/{output}".into(),
            "job_id" => "7".into(),
            other => format!("<{other}>"),
        }
    }

    #[test]
    fn one_pass_and_unknown_braces_kept() {
        let cases = [
            ("{input}", "/w/y{job_id}.txt"),
            ("--in={input},{job_id}", "--in=/w/y{job_id}.txt,7"),
            ("{output}", "/w/{output}"),
            ("awk '{print}'", "awk '{print}'"),
            ("{{job_id}}", "{7}"),
            ("{", "{"),
            ("}{", "}{"),
            ("{payload_file}{payload}", "<payload_file><payload>"),
            ("a{nope}b{job_id", "a{nope}b{job_id"),
        ];
        for (arg, want) in cases {
            assert_eq!(expand(arg, value), want, "{arg}");
        }
        assert_eq!(
            used_in("cp {input} {output}; echo {job_id}"),
            vec!["input", "output", "job_id"]
        );
        assert!(used_in("awk '{print}'").is_empty());
    }
}
