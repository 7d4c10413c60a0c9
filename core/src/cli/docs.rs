//! Man pages (`clap_mangen`) and shell completions (`clap_complete`: bash,
//! zsh, fish) generated from a binary's own clap definition, so they never
//! drift from `--help`. `scripts/package` runs each binary as
//! `BINARY --write-docs DIR` while building the .debs; the switch is looked
//! for before the binary's own parsing (a daemon's required settings do not
//! get in the way) and is not part of its interface: it appears in no
//! `--help`, completion or man page.
//!
//! `DIR` receives `man/NAME.SECTION` plus `man/NAME-SUB[-SUB...].SECTION`
//! for every subcommand, and `completions/bash/NAME`,
//! `completions/zsh/_NAME`, `completions/fish/NAME.fish`: the names Debian's
//! bash-completion, zsh vendor-completions and fish vendor_completions.d
//! directories expect.

use std::ffi::OsStr;
use std::path::Path;

use clap::Command;
use clap_complete::Shell;

/// The build-time switch.
pub const WRITE_DOCS: &str = "--write-docs";

/// When the arguments are exactly `--write-docs DIR`, writes the docs of
/// `command()` (man pages in `section`: 1 for commands, 8 for daemons) and
/// exits; otherwise returns at once.
pub fn write_if_asked(section: &str, command: impl FnOnce() -> Command) {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().map(|a| a.as_os_str()) != Some(OsStr::new(WRITE_DOCS)) {
        return;
    }
    let code = match args.as_slice() {
        [_, dir] => match write(command(), section, Path::new(dir)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{WRITE_DOCS} {}: {e}", Path::new(dir).display());
                1
            }
        },
        _ => {
            eprintln!("usage: {WRITE_DOCS} DIR");
            2
        }
    };
    std::process::exit(code);
}

/// Writes the man pages and completions of `cmd` beneath `dir`.
pub fn write(cmd: Command, section: &str, dir: &Path) -> std::io::Result<()> {
    // build() propagates global arguments into the subcommands and names
    // each `BINARY-SUB-...` (its display name, the page's name).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_owned();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    write_man(cmd.clone(), section, &man)?;
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = dir.join("completions").join(sub);
        std::fs::create_dir_all(&d)?;
        let mut out = std::fs::File::create(d.join(file))?;
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut out);
    }
    Ok(())
}

/// The page of `cmd` and of each visible subcommand, recursively.
fn write_man(cmd: Command, section: &str, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(sub.clone(), section, dir)?;
    }
    clap_mangen::Man::new(cmd)
        .section(section)
        .generate_to(dir)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool() -> Command {
        Command::new("tool")
            .version("1.0")
            .about("Does things")
            .arg(clap::arg!(--json "JSON out").global(true))
            .subcommand(
                Command::new("volume").about("Volumes").subcommand(
                    Command::new("create")
                        .about("Makes one")
                        .arg(clap::arg!(<NAME>)),
                ),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn every_visible_subcommand_gets_a_page_and_every_shell_a_completion() {
        let dir = tempfile::tempdir().unwrap();
        write(tool(), "1", dir.path()).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(dir.path().join("man"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(pages, ["tool-volume-create.1", "tool-volume.1", "tool.1"]);
        let create = std::fs::read_to_string(dir.path().join("man/tool-volume-create.1")).unwrap();
        assert!(create.contains(".TH tool-volume-create 1"), "{create}");
        assert!(create.contains("Makes one"), "{create}");
        assert!(
            create.contains("\\-\\-json"),
            "global flags propagate: {create}"
        );
        let bash = std::fs::read_to_string(dir.path().join("completions/bash/tool")).unwrap();
        assert!(bash.contains("complete -F _tool"), "{bash}");
        let zsh = std::fs::read_to_string(dir.path().join("completions/zsh/_tool")).unwrap();
        assert!(zsh.starts_with("#compdef tool"), "{zsh}");
        let fish = std::fs::read_to_string(dir.path().join("completions/fish/tool.fish")).unwrap();
        assert!(fish.contains("complete -c tool"), "{fish}");
    }
}
