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

/// `complete-types`: the pool's job types (and with `slots` its slots,
/// `TYPE-N`), each followed by `suffix`, one per line, for the scripts'
/// TYPE values. The types of `--config`'s entries, else those the
/// database serves; a slot list needs the database. Silent on any error: a
/// completion never prints one.
pub fn values(db: &crate::cli::DbArgs, slots: bool, suffix: &str) -> i32 {
    let Ok(t) = super::target(db) else { return exit::OK };
    let conn = crate::db::open_read_only(&t.db_path).ok().flatten().map(|(c, _)| c);
    let mut words = t.served_types(conn.as_ref()).unwrap_or_default();
    if slots && let Some(conn) = &conn {
        let of_pool = crate::db::slots::slots(conn).unwrap_or_default();
        words.extend(of_pool.iter().map(|s| format!("{}-{}", s.worker_type, s.slot)));
    }
    words.sort();
    words.dedup();
    for w in words {
        super::print(&format!("{w}{suffix}"));
    }
    exit::OK
}

/// What each shell's script does beyond clap's: the TYPE values of
/// `scale` (`TYPE=`), `restart` and `logs` (TYPE or TYPE-N), `submit` (its
/// first word) and `jobs … --type`, asked of `clx-pool complete-types`
/// with the line's `--config`/`--db`.
const BASH_VALUES: &str = r#"
_clx_pool_values() {
    local i args=()
    for ((i = 1; i < ${#COMP_WORDS[@]}; i++)); do
        case "${COMP_WORDS[i]}" in
            --config|-c|--db) args+=("${COMP_WORDS[i]}" "${COMP_WORDS[i+1]}") ;;
            --config=*|--db=*) args+=("${COMP_WORDS[i]}") ;;
        esac
    done
    clx-pool complete-types "${args[@]}" "$@" 2>/dev/null
}

# How many words the command has taken so far that are not options or
# their values.
_clx_pool_positionals() {
    local i n=0 w
    for ((i = 2; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        case "$w" in
            --config|-c|--db|--timeout|--payload|--priority|--max-attempts|--content-hash|--workspace|--lines|-n|--since|--log-dir|--color|--log-level|--type) ((i++)) ;;
            -*) ;;
            *) ((n++)) ;;
        esac
    done
    echo "$n"
}

_clx_pool_with_values() {
    _clx_pool "$@"
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    [[ "$cur" == -* ]] && return 0
    if [[ "$prev" == --type ]]; then
        COMPREPLY=( $(compgen -W "$(_clx_pool_values)" -- "$cur") )
        return 0
    fi
    case "$prev" in
        --config|-c|--db|--timeout|--payload|--priority|--max-attempts|--content-hash|--workspace|--lines|-n|--since|--log-dir|--color|--log-level) return 0 ;;
    esac
    case "${COMP_WORDS[1]}" in
        scale)
            COMPREPLY=( $(compgen -W "$(_clx_pool_values --suffix =)" -- "$cur") )
            compopt -o nospace ;;
        restart|logs)
            COMPREPLY=( $(compgen -W "$(_clx_pool_values --slots)" -- "$cur") ) ;;
        submit)
            [[ "$(_clx_pool_positionals)" == 0 ]] && COMPREPLY=( $(compgen -W "$(_clx_pool_values)" -- "$cur") ) ;;
    esac
    return 0
}
"#;

const ZSH_VALUES: &str = r#"
_clx_pool_values() {
    local -a args
    [[ -n ${opt_args[--config]} ]] && args+=(--config ${opt_args[--config]})
    [[ -n ${opt_args[-c]} ]] && args+=(--config ${opt_args[-c]})
    [[ -n ${opt_args[--db]} ]] && args+=(--db ${opt_args[--db]})
    clx-pool complete-types $args "$@" 2>/dev/null
}
_clx_pool_types() { local -a v; v=(${(f)"$(_clx_pool_values)"}); compadd -a v }
_clx_pool_targets() { local -a v; v=(${(f)"$(_clx_pool_values --slots)"}); compadd -a v }
_clx_pool_counts() { local -a v; v=(${(f)"$(_clx_pool_values)"}); compadd -S '=' -a v }
"#;

const FISH_VALUES: &str = r#"
function __clx_pool_values
    set -l args
    set -l words (commandline -opc)
    for i in (seq (count $words))
        switch $words[$i]
            case --config -c --db
                set -a args $words[$i] $words[(math $i + 1)]
            case '--config=*' '--db=*'
                set -a args $words[$i]
        end
    end
    clx-pool complete-types $args $argv 2>/dev/null
end
complete -c clx-pool -n "__fish_clx_pool_using_subcommand scale" -f -a "(__clx_pool_values --suffix =)"
complete -c clx-pool -n "__fish_clx_pool_using_subcommand restart" -f -a "(__clx_pool_values --slots)"
complete -c clx-pool -n "__fish_clx_pool_using_subcommand logs" -f -a "(__clx_pool_values --slots)"
complete -c clx-pool -n "__fish_clx_pool_using_subcommand submit; and test (count (commandline -opc | string match -v -- '-*')) -eq 2" -f -a "(__clx_pool_values)"
complete -c clx-pool -n "__fish_seen_subcommand_from jobs" -l type -f -r -a "(__clx_pool_values)"
"#;

/// The completion script for `shell`, offering every command and option the
/// user may type and none of the internal ones (`guard`, `worker
/// --no-command`).
pub fn script(shell: Shell) -> String {
    let mut cmd = shown(&Cli::command());
    let name = cmd.get_name().to_owned();
    match shell {
        Shell::Bash => bash(&mut cmd, &name),
        Shell::Zsh => zsh_with_values(&generate(shell, &mut cmd, &name)),
        Shell::Fish => generate(shell, &mut cmd, &name) + FISH_VALUES,
        _ => generate(shell, &mut cmd, &name),
    }
}

/// zsh: the TYPE arguments complete with the pool's types instead of files.
fn zsh_with_values(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = if line.starts_with("'*::counts -- ") {
            line.replace(":_default'", ":_clx_pool_counts'")
        } else if line.starts_with("'*::targets -- ") {
            line.replace(":_default'", ":_clx_pool_targets'")
        } else if line.starts_with("':job_type -- ") || line.contains("]:TYPE:_default'") {
            line.replace(":_default'", ":_clx_pool_types'")
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    // The helpers go first: `compdef` at the end runs the script's main
    // function, which needs them.
    match out.find("\n_clx-pool() {") {
        Some(at) => format!("{}{ZSH_VALUES}{}", &out[..at + 1], &out[at + 1..]),
        None => out + ZSH_VALUES,
    }
}

fn bash(cmd: &mut Command, name: &str) -> String {
    // clap_complete's bash generator spells its internal state names two
    // ways when the bin name has a hyphen (`clx__pool__subcmd__stats` in
    // the loop that reads the words, `clx__subcmd__pool__subcmd__stats` in
    // the cases that offer them; clap-rs/clap#6421), so nothing below the top
    // level ever completed. Under a name without one both agree; only the
    // `complete` lines must then name the real command.
    let inner = name.replace('-', "_");
    let text = generate(Shell::Bash, cmd, &inner);
    let suffix = format!(" {inner}");
    let mut out = String::from(BASH_VALUES);
    for line in text.lines() {
        // `complete -F _clx_pool … clx_pool`: for clx-pool, through the
        // function that adds the TYPE values.
        let line = match line.strip_suffix(&suffix) {
            Some(head) if line.trim_start().starts_with("complete ") => {
                format!("{} {name}", head.replace("-F _clx_pool ", "-F _clx_pool_with_values "))
            }
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
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
