//! `completions`: the shell completion scripts, made by clap_complete's
//! generators from the CLI definition in `cli.rs`. This module owns the two
//! corrections those generators need for clx-pool (hidden commands and
//! options left out, bash's hyphenated name); what is offered comes from
//! `cli.rs` alone.

use clap::builder::Resettable;
use clap::{Command, CommandFactory};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::contract::exit;

/// Prints the completion script for `shell`.
pub fn run(shell: Shell) -> anyhow::Result<i32> {
    super::print(script(shell).trim_end());
    Ok(exit::OK)
}

/// The completion script for `shell`, offering every command and option the
/// user may type and none of the internal ones (`guard`, `worker
/// --no-command`).
pub fn script(shell: Shell) -> String {
    let mut cmd = shown(&Cli::command());
    let name = cmd.get_name().to_owned();
    if shell != Shell::Bash {
        return generate(shell, &mut cmd, &name);
    }
    // clap_complete's bash generator spells its internal state names two
    // ways when the bin name has a hyphen (`clx__pool__subcmd__stats` in
    // the loop that reads the words, `clx__subcmd__pool__subcmd__stats` in
    // the cases that offer them; clap-rs/clap#6421), so nothing below the top
    // level ever completed. Under a name without one both agree; only the
    // `complete` lines must then name the real command.
    let inner = name.replace('-', "_");
    let text = generate(shell, &mut cmd, &inner);
    let suffix = format!(" {inner}");
    text.lines()
        .map(|line| match line.strip_suffix(&suffix) {
            Some(head) if line.trim_start().starts_with("complete ") => format!("{head} {name}\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

fn generate(shell: Shell, cmd: &mut Command, bin_name: &str) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, cmd, bin_name, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `cmd` without its hidden subcommands and arguments, at every level.
///
/// clap_complete's generators offer hidden ones like any other, and clap
/// cannot take a subcommand or argument out of a `Command`, so this builds
/// a copy of what the generators read: names, help, version, aliases, the
/// arguments (with their values, hints and conflicts) and the groups. An
/// argument's `requires` and `required_unless_present` are dropped: they
/// may name a hidden argument (`worker`'s COMMAND names `--no-command`) and
/// no generator reads them.
fn shown(cmd: &Command) -> Command {
    let mut out = Command::new(cmd.get_name().to_owned())
        .display_order(cmd.get_display_order())
        .visible_aliases(cmd.get_visible_aliases().map(str::to_owned))
        .aliases(cmd.get_aliases().map(str::to_owned));
    // Only the settings that are on. A command without a version of its
    // own reads as one with its version flag disabled, though it gets the
    // flag with the version its parent propagates.
    let has_version = cmd.get_version().is_some() || cmd.get_long_version().is_some();
    type Setter = fn(Command, bool) -> Command;
    let settings: [(bool, Setter); 7] = [
        (cmd.is_propagate_version_set(), Command::propagate_version),
        (cmd.is_disable_help_flag_set(), Command::disable_help_flag),
        (
            has_version && cmd.is_disable_version_flag_set(),
            Command::disable_version_flag,
        ),
        (cmd.is_disable_help_subcommand_set(), Command::disable_help_subcommand),
        (cmd.is_subcommand_required_set(), Command::subcommand_required),
        (
            cmd.is_args_conflicts_with_subcommands_set(),
            Command::args_conflicts_with_subcommands,
        ),
        (
            cmd.is_allow_external_subcommands_set(),
            Command::allow_external_subcommands,
        ),
    ];
    for (set, setter) in settings {
        if set {
            out = setter(out, true);
        }
    }
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        out = out.long_about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(version.to_owned());
    }
    if let Some(version) = cmd.get_long_version() {
        out = out.long_version(version.to_owned());
    }
    let hidden: Vec<_> = cmd
        .get_arguments()
        .filter(|a| a.is_hide_set())
        .map(|a| a.get_id())
        .collect();
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        out = out.arg(
            arg.clone()
                .requires(Resettable::Reset)
                .required_unless_present(Resettable::Reset),
        );
    }
    for group in cmd.get_groups() {
        let members: Vec<_> = group.get_args().filter(|id| !hidden.contains(id)).cloned().collect();
        if group.get_args().next().is_some() && members.is_empty() {
            continue;
        }
        out = out.group(group.clone().arg(Resettable::Reset).args(members));
    }
    out.subcommands(cmd.get_subcommands().filter(|c| !c.is_hide_set()).map(shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each command's visible subcommands and arguments, by name, at every level.
    fn visible_tree(cmd: &Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            out.push(format!("{path} arg {}", arg.get_id()));
        }
        for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            out.push(format!("{path} {}", sub.get_name()));
            visible_tree(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    fn any_hidden(cmd: &Command) -> bool {
        cmd.get_arguments().any(|a| a.is_hide_set()) || cmd.get_subcommands().any(|c| c.is_hide_set() || any_hidden(c))
    }

    #[test]
    fn the_copy_keeps_every_visible_command_and_argument_and_nothing_hidden() {
        let mut full = Cli::command();
        let mut copy = shown(&full);
        copy.clone().debug_assert();
        full.build();
        copy.build();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        visible_tree(&full, "clx-pool", &mut want);
        visible_tree(&copy, "clx-pool", &mut got);
        assert_eq!(got, want);
        assert!(!any_hidden(&copy));
        assert!(
            any_hidden(&full),
            "the CLI has hidden items, or this test proves nothing"
        );
    }

    #[test]
    fn the_bash_script_registers_its_function_for_clx_pool() {
        let text = script(Shell::Bash);
        let lines: Vec<_> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("complete "))
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.iter().all(|l| l.ends_with(" clx-pool")), "{lines:?}");
    }
}
