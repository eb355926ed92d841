//! Path confinement (SPEC §7): a job may only run a file inside scripts_dir.

use std::path::{Component, Path, PathBuf};

/// Why a requested path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path must be relative to the scripts directory")]
    Absolute,
    #[error("path must not contain '..'")]
    ParentDir,
    #[error("path leads outside the scripts directory")]
    Escapes,
    #[error("no such script: {0}")]
    NotFound(String),
    #[error("not a regular file: {0}")]
    NotAFile(String),
}

/// Resolves `requested` inside `scripts_dir` (which must be canonical) and
/// returns the canonical script path. Checks the text first (absolute, `..`,
/// NUL), then follows symlinks and checks the real path is still inside.
pub(crate) fn resolve_script(scripts_dir: &Path, requested: &str) -> Result<PathBuf, PathError> {
    if requested.is_empty() {
        return Err(PathError::Empty);
    }
    if requested.contains('\0') {
        return Err(PathError::Nul);
    }
    let rel = Path::new(requested);
    for component in rel.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(PathError::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(PathError::Absolute),
        }
    }
    let joined = scripts_dir.join(rel);
    let real = joined.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PathError::NotFound(requested.to_owned()),
        _ => PathError::Escapes,
    })?;
    if !real.starts_with(scripts_dir) {
        return Err(PathError::Escapes);
    }
    if !real.is_file() {
        return Err(PathError::NotAFile(requested.to_owned()));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes_and_accepts_files_inside() {
        let root = std::env::temp_dir().join(format!("confine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let scripts = root.join("scripts");
        std::fs::create_dir_all(scripts.join("sub")).unwrap();
        std::fs::write(scripts.join("sub/ok.sh"), "echo ok").unwrap();
        std::fs::write(root.join("secret.sh"), "echo secret").unwrap();
        std::os::unix::fs::symlink(root.join("secret.sh"), scripts.join("out.sh")).unwrap();
        std::os::unix::fs::symlink(scripts.join("sub/ok.sh"), scripts.join("in.sh")).unwrap();
        let scripts = scripts.canonicalize().unwrap();

        assert_eq!(
            resolve_script(&scripts, "sub/ok.sh").unwrap(),
            scripts.join("sub/ok.sh")
        );
        assert_eq!(
            resolve_script(&scripts, "./in.sh").unwrap(),
            scripts.join("sub/ok.sh")
        );
        assert_eq!(
            resolve_script(&scripts, "/etc/passwd"),
            Err(PathError::Absolute)
        );
        assert_eq!(
            resolve_script(&scripts, "sub/../../secret.sh"),
            Err(PathError::ParentDir)
        );
        assert_eq!(resolve_script(&scripts, "ok\0.sh"), Err(PathError::Nul));
        assert_eq!(resolve_script(&scripts, "out.sh"), Err(PathError::Escapes));
        assert_eq!(
            resolve_script(&scripts, "sub"),
            Err(PathError::NotAFile("sub".into()))
        );
        assert!(matches!(
            resolve_script(&scripts, "nope.sh"),
            Err(PathError::NotFound(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A scripts directory with files, and symlinks of every kind: inside,
    /// outside, absolute, relative, to directories, looping, dangling.
    struct Tree {
        _tmp: tempfile::TempDir,
        scripts: PathBuf,
    }

    fn tree() -> Tree {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let scripts = root.join("scripts");
        std::fs::create_dir_all(scripts.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(root.join("outdir")).unwrap();
        for file in ["a.sh", "sub/b.sh", "sub/deeper/c.sh"] {
            std::fs::write(scripts.join(file), "true\n").unwrap();
        }
        for file in ["secret.sh", "outdir/evil.sh"] {
            std::fs::write(root.join(file), "true\n").unwrap();
        }
        for (link, target) in [
            ("in.sh", PathBuf::from("sub/b.sh")),
            ("abs_in.sh", scripts.join("a.sh")),
            ("out.sh", PathBuf::from("../secret.sh")),
            ("abs_out.sh", root.join("secret.sh")),
            ("outdir", PathBuf::from("../outdir")),
            ("subln", PathBuf::from("sub")),
            ("loop", PathBuf::from("loop")),
            ("dangling", PathBuf::from("nowhere")),
            ("sub/up", PathBuf::from("..")),
            ("sub/upup", PathBuf::from("../..")),
        ] {
            symlink(target, scripts.join(link)).unwrap();
        }
        Tree { _tmp: tmp, scripts }
    }

    /// Random requests built from the tree's names, `..`, `.`, empty
    /// components, NUL and a leading `/`.
    fn request() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        // Repeats make the telling sequences common ("sub/../a.sh",
        // "../scripts/a.sh", "sub/upup/secret.sh").
        let names = "..|..|..|sub|sub|a.sh|a.sh|scripts|scripts|b.sh|deeper|c.sh|in.sh|abs_in.sh|\
            out.sh|abs_out.sh|outdir|evil.sh|subln|loop|dangling|up|upup|secret.sh|.||x\0y|nope|@SCRIPTS";
        let component = prop::sample::select(names.split('|').collect::<Vec<_>>());
        (
            any::<bool>(),
            prop::collection::vec(component, 1..6),
            any::<bool>(),
        )
            .prop_map(|(absolute, parts, trailing)| {
                let mut path = parts.join("/");
                if absolute {
                    path.insert(0, '/');
                }
                if trailing {
                    path.push('/');
                }
                path
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Whatever is asked, a resolved script is a regular file inside
        /// scripts_dir, reached without `..`, NUL or an absolute path; and
        /// a plain request for a file that really is inside is not refused.
        #[test]
        fn a_resolved_script_is_always_a_file_inside_scripts_dir(requested in request()) {
            thread_local!(static TREE: Tree = tree());
            TREE.with(|t| -> Result<(), proptest::test_runner::TestCaseError> {
                // The real absolute path, which a strategy cannot know.
                let requested = requested.replace("@SCRIPTS", &t.scripts.display().to_string());
                let result = resolve_script(&t.scripts, &requested);
                let rel = Path::new(&requested);
                let textually_fine = !requested.is_empty()
                    && !requested.contains('\0')
                    && rel.is_relative()
                    && !rel.components().any(|c| c == Component::ParentDir);
                match &result {
                    Ok(real) => {
                        proptest::prop_assert!(textually_fine, "{requested:?} resolved");
                        proptest::prop_assert!(real.starts_with(&t.scripts), "{requested:?} -> {real:?}");
                        proptest::prop_assert!(real.is_file(), "{requested:?} -> {real:?}");
                    }
                    Err(PathError::Nul) => proptest::prop_assert!(requested.contains('\0')),
                    Err(PathError::Absolute) => proptest::prop_assert!(rel.is_absolute()),
                    Err(_) => {}
                }
                if requested.contains('\0') {
                    proptest::prop_assert_eq!(&result, &Err(PathError::Nul));
                }
                if textually_fine
                    && let Ok(real) = t.scripts.join(rel).canonicalize()
                    && real.starts_with(&t.scripts)
                    && real.is_file()
                {
                    proptest::prop_assert_eq!(result, Ok(real), "{:?} refused", requested);
                }
                Ok(())
            })?;
        }
    }
}
