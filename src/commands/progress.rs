//! Progress for the commands that wait (`wait`, `submit --wait`, `stop`):
//! a bar with counts and an ETA on stderr when stderr is a terminal,
//! nothing at all otherwise (CI logs and pipes stay clean).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar counting `unit` (e.g. "jobs finished"), shown only on a terminal.
    pub fn new(unit: &str) -> Progress {
        if !std::io::stderr().is_terminal() || std::env::var_os(crate::contract::env::cli::NO_PROGRESS).is_some() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let colour = super::colour::enabled_on_stderr();
        let template = if colour {
            format!("{{spinner:.cyan}} [{{elapsed}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} (eta {{eta}}) {{msg}}")
        } else {
            format!("{{spinner}} [{{elapsed}}] {{bar:30}} {{pos}}/{{len}} {unit} (eta {{eta}}) {{msg}}")
        };
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar: Some(bar) }
    }

    pub fn update(&self, done: u64, total: u64, why: &str) {
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(done));
            bar.set_position(done);
            bar.set_message(why.to_string());
        }
    }

    /// Removes the bar (before the final message is printed).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
