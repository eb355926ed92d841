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
}
