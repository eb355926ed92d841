//! Manual pages from the binaries' clap definitions, so `man clusterctl`
//! says exactly what `--help` says and never drifts from it.
//!
//! One page per command and one per visible subcommand
//! (`clusterctl-workers-drain.1`, `clusterctl-pki-init.1`, ...), the way git
//! and cargo ship theirs. Hidden commands and flags (this generator's own)
//! get no page.

use std::path::{Path, PathBuf};

/// Writes the page of `command` and of every visible subcommand, in
/// `section`, to `dir` (created if missing). Returns the files written.
pub fn write_pages(
    command: clap::Command,
    section: &str,
    dir: &Path,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // `help` is clap's own, not a command of ours; building fills in each
    // subcommand's full name (`clusterctl-workers-drain`) and usage line.
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    write(command, section, dir, &mut written)?;
    Ok(written)
}

fn write(
    command: clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write(sub.clone(), section, dir, written)?;
    }
    let page = clap_mangen::Man::new(command)
        .section(section)
        .manual("jobcluster");
    written.push(page.generate_to(dir)?);
    Ok(())
}

/// Writes the pages like [`write_pages`] and names each file on stderr, for
/// a binary's hidden `--generate-man DIR`.
pub fn generate(command: clap::Command, section: &str, dir: &Path) -> std::process::ExitCode {
    match write_pages(command, section, dir) {
        Ok(written) => {
            for path in written {
                eprintln!("wrote {}", path.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "cannot write the manual pages to {}: {error}",
                dir.display()
            );
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_visible_subcommand_gets_its_own_page() {
        let command = clap::Command::new("tool")
            .about("A tool")
            .arg(clap::Arg::new("config").long("config"))
            .subcommand(
                clap::Command::new("group")
                    .about("A group")
                    .subcommand(clap::Command::new("leaf").about("A leaf")),
            )
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let mut names: Vec<String> = write_pages(command, "8", dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["tool-group-leaf.8", "tool-group.8", "tool.8"]);
        let leaf = std::fs::read_to_string(dir.path().join("tool-group-leaf.8")).unwrap();
        assert!(leaf.contains(".TH tool-group-leaf 8"), "{leaf}");
        // The usage line names the command as it is typed.
        assert!(leaf.contains("tool group leaf"), "{leaf}");
        let top = std::fs::read_to_string(dir.path().join("tool.8")).unwrap();
        assert!(top.contains("\\-\\-config"), "{top}");
        assert!(!top.contains("secret"), "{top}");
    }
}
