//! The manual pages and completions, from the real binaries.

use std::path::Path;
use std::process::Command;

use crate::cluster::{bin, run_ok, stdout};

/// The page as `man -l` shows it at 80 columns (without hyphenation, so
/// options stay whole), or, where man is not installed, its roff source
/// with the escapes that matter undone.
fn read_page(page: &Path) -> String {
    let shown = Command::new("man")
        .args(["--nh", "--nj", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output();
    match shown {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => {
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        _ => {
            eprintln!("man is not usable here; checking the roff source");
            std::fs::read_to_string(page)
                .unwrap()
                .replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fR", "")
                .replace("\\fI", "")
        }
    }
}

fn generate(dir: &Path) {
    let man1 = dir.join("man1");
    let man8 = dir.join("man8");
    run_ok(&["generate-man", man1.to_str().unwrap()]);
    for daemon in ["schedulerd", "workerd"] {
        let out = Command::new(bin(daemon))
            .arg("--generate-man")
            .arg(&man8)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{daemon} --generate-man: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_binary_and_subcommand_has_a_manual_page_that_man_reads() {
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let page = |name: &str| {
        let section = if name.ends_with('8') { "man8" } else { "man1" };
        let path = tmp.path().join(section).join(name);
        assert!(path.exists(), "{} missing", path.display());
        read_page(&path)
    };

    let top = page("clusterctl.1");
    for needle in [
        "clusterctl",
        "--scheduler",
        "--token-file",
        "--ca",
        "CLUSTERCTL_TOKEN_FILE",
        "run",
        "logs",
        "workers",
        "completion",
        "Ctrl-C",
    ] {
        assert!(
            top.contains(needle),
            "{needle:?} missing from clusterctl.1:\n{top}"
        );
    }
    assert!(
        !top.contains("generate-man"),
        "the hidden command shows:\n{top}"
    );

    let run = page("clusterctl-run.1");
    for needle in [
        "clusterctl run",
        "--worker",
        "--selector",
        "--priority",
        "SCRIPT",
        "Ctrl-C",
        "Idempotency-Key",
    ] {
        assert!(
            run.contains(needle),
            "{needle:?} missing from clusterctl-run.1:\n{run}"
        );
    }
    let logs = page("clusterctl-logs.1");
    assert!(
        logs.contains("--follow") && logs.contains("--offset"),
        "{logs}"
    );
    let drain = page("clusterctl-workers-drain.1");
    assert!(drain.contains("clusterctl workers drain"), "{drain}");
    for sub in [
        "clusterctl-pki-init.1",
        "clusterctl-pki-issue.1",
        "clusterctl-bench-start.1",
        "clusterctl-completion.1",
        "clusterctl-stop.1",
    ] {
        page(sub);
    }
    assert!(!tmp.path().join("man1/clusterctl-generate-man.1").exists());

    for daemon in ["schedulerd.8", "workerd.8"] {
        let text = page(daemon);
        for needle in ["--config", "--check-config", "--version"] {
            assert!(
                text.contains(needle),
                "{needle:?} missing from {daemon}:\n{text}"
            );
        }
        assert!(!text.contains("generate-man"), "{daemon}:\n{text}");
    }
}

#[test]
fn generate_man_takes_one_dir_and_nothing_else() {
    for args in [&["generate-man"][..], &["generate-man", "a", "b"]] {
        let out = Command::new(bin("clusterctl")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let help = stdout(&run_ok(&["--help"]));
    assert!(!help.contains("generate-man"), "{help}");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin("schedulerd"))
        .args(["--generate-man"])
        .arg(tmp.path())
        .args(["--config", "x.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    // Without either, --config is still required.
    let out = Command::new(bin("workerd")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(&["completion", shell]);
        let script = stdout(&out);
        for needle in ["clusterctl", "token-file", "workers", "logs"] {
            assert!(script.contains(needle), "{shell}: {needle:?} missing");
        }
        assert!(
            !script.contains("generate-man"),
            "{shell} completes the hidden command"
        );
    }
}
