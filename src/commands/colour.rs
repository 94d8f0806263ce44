//! Whether to colour output: `--color always|never|auto` (set once at
//! start), then NO_COLOR (any value), then whether the stream is a
//! terminal. Escapes never go into a pipe under `auto`.

use std::io::IsTerminal;
use std::sync::OnceLock;

pub use crate::cli::ColorChoice;

static CHOICE: OnceLock<ColorChoice> = OnceLock::new();

/// Records `--color` (the first call wins).
pub fn set(choice: ColorChoice) {
    if CHOICE.set(choice).is_err() {
        tracing::debug!("the colour choice was already made");
    }
}

/// The rule, without I/O.
pub fn decide(choice: ColorChoice, no_color: bool, terminal: bool) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => terminal && !no_color,
    }
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

pub fn enabled_on_stdout() -> bool {
    decide(
        *CHOICE.get().unwrap_or(&ColorChoice::Auto),
        no_color(),
        std::io::stdout().is_terminal(),
    )
}

pub fn enabled_on_stderr() -> bool {
    decide(
        *CHOICE.get().unwrap_or(&ColorChoice::Auto),
        no_color(),
        std::io::stderr().is_terminal(),
    )
}

/// Whether stdout is a terminal (for screen-clearing in `stats --watch`).
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for (choice, no_color, terminal, want) in [
            (ColorChoice::Auto, false, true, true),
            (ColorChoice::Auto, true, true, false),
            (ColorChoice::Auto, false, false, false),
            (ColorChoice::Always, true, false, true),
            (ColorChoice::Never, false, true, false),
        ] {
            assert_eq!(
                decide(choice, no_color, terminal),
                want,
                "{choice:?} {no_color} {terminal}"
            );
        }
    }
}
