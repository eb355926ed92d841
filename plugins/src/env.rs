//! Which request environment variables reach a plugin's jobs.
//!
//! A request's `env` passes only through the plugin's allow list
//! (`allow_env`): an interpreter reads too many variables at start-up (and
//! the programs a script calls read more) for a list of forbidden names
//! ever to be complete. The deny list here is a second line under it: names
//! known to load code, change how a shell or interpreter starts, or belong
//! to the worker, which no allow list can open.

use std::fmt;

/// Most names shown in one refusal per kind; the rest are counted.
const SHOWN: usize = 8;
/// Longest name shown as it is; longer ones are cut.
const SHOWN_NAME_LEN: usize = 64;

/// Names no request may set, by why. Prefixes end a name's start
/// (`LD_` covers `LD_PRELOAD`); `PYTHON`, `PERL` and `RUBY` cover every
/// variable of those interpreters, since any of them may be (or become)
/// a start-up hook, as `PYTHONWARNINGS` proved.
struct DenyGroup {
    why: &'static str,
    exact: &'static [&'static str],
    prefixes: &'static [&'static str],
}

const DENIED: &[DenyGroup] = &[
    DenyGroup {
        why: "the worker sets it",
        exact: &[
            "JOB_ID",
            "WORKER_NAME",
            "PATH",
            "HOME",
            "USER",
            "LOGNAME",
            "SHELL",
        ],
        prefixes: &[],
    },
    DenyGroup {
        why: "the dynamic loader or the C library acts on it in every program",
        exact: &[
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "HOSTALIASES",
            "LOCALDOMAIN",
            "RES_OPTIONS",
            "LOCPATH",
            "NLSPATH",
            "TMPDIR",
            "MALLOC_CHECK_",
            "MALLOC_TRACE",
        ],
        prefixes: &["LD_", "DYLD_"],
    },
    DenyGroup {
        why: "a shell runs code or changes its parsing from it",
        exact: &[
            "ENV",
            "SHELLOPTS",
            "BASHOPTS",
            "IFS",
            "PS1",
            "PS2",
            "PS3",
            "PS4",
            "PROMPT_COMMAND",
            "CDPATH",
            "GLOBIGNORE",
            "INPUTRC",
            "ZDOTDIR",
            "FPATH",
            "POSIXLY_CORRECT",
        ],
        // BASH_ENV, BASH_FUNC_name%% (exported functions), BASH_XTRACEFD,
        // BASH_LOADABLES_PATH, ...
        prefixes: &["BASH_"],
    },
    DenyGroup {
        why: "an interpreter loads code or options from it",
        exact: &[
            "CLASSPATH",
            "JAVA_TOOL_OPTIONS",
            "_JAVA_OPTIONS",
            "JDK_JAVA_OPTIONS",
            "PHPRC",
            "PHP_INI_SCAN_DIR",
            "TCLLIBPATH",
            "GEM_HOME",
            "GEM_PATH",
            "R_PROFILE",
            "R_PROFILE_USER",
            "R_ENVIRON",
            "R_ENVIRON_USER",
            "R_LIBS",
            "R_LIBS_USER",
            "R_LIBS_SITE",
            "GUILE_LOAD_PATH",
            "ERL_LIBS",
            "ERL_AFLAGS",
            "ERL_FLAGS",
            "ERL_ZFLAGS",
            "DOTNET_STARTUP_HOOKS",
        ],
        prefixes: &[
            "PYTHON",
            "PERL",
            "RUBY",
            "NODE_",
            "LUA_",
            "NPM_CONFIG_",
            "npm_config_",
        ],
    },
    DenyGroup {
        why: "programs run the command it names or read their configuration from where it points",
        exact: &[
            "BROWSER",
            "EDITOR",
            "VISUAL",
            "PAGER",
            "MANPAGER",
            "SYSTEMD_PAGER",
            "LESSOPEN",
            "LESSCLOSE",
            "SSH_ASKPASS",
            "SUDO_ASKPASS",
            "OPENSSL_CONF",
            "OPENSSL_ENGINES",
            "XDG_CONFIG_HOME",
            "XDG_CONFIG_DIRS",
            "CURL_HOME",
            "WGETRC",
        ],
        prefixes: &["GIT_"],
    },
];

/// Why no request may set `name`, or `None` if the deny list does not
/// name it (it still needs the plugin's allow list).
pub(crate) fn denied(name: &str) -> Option<&'static str> {
    DENIED
        .iter()
        .find(|g| g.exact.contains(&name) || g.prefixes.iter().any(|p| name.starts_with(p)))
        .map(|g| g.why)
}

/// Letters, digits and `_`, not starting with a digit: what shells and
/// people take for a variable name.
fn portable_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One `allow_env` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// `APP_*`: the text before the `*`, ending in `_`.
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if !portable_name(body) {
            return Err(format!(
                "{text:?} is neither a variable name (letters, digits, '_') nor a PREFIX_* pattern"
            ));
        }
        if !prefix {
            return Ok(Pattern::Exact(body.to_owned()));
        }
        // `A*` or `*` would let in whole namespaces nobody reviewed.
        if !body.ends_with('_') || body.len() < 2 {
            return Err(format!(
                "{text:?}: a pattern is a prefix ending in '_' followed by '*', e.g. \"APP_*\""
            ));
        }
        Ok(Pattern::Prefix(body.to_owned()))
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => name == exact,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }

    /// A denied name or prefix this pattern would match, with why.
    fn overlaps_denied(&self) -> Option<(String, &'static str)> {
        match self {
            Pattern::Exact(name) => denied(name).map(|why| (name.clone(), why)),
            Pattern::Prefix(prefix) => DENIED.iter().find_map(|g| {
                let exact = g
                    .exact
                    .iter()
                    .find(|e| e.starts_with(prefix.as_str()))
                    .map(|e| (*e).to_owned());
                // Two prefixes share names exactly when one starts the other.
                let by_prefix = || {
                    g.prefixes
                        .iter()
                        .find(|d| d.starts_with(prefix.as_str()) || prefix.starts_with(**d))
                        .map(|d| format!("{d}*"))
                };
                exact.or_else(by_prefix).map(|name| (name, g.why))
            }),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A plugin's `allow_env`: the request variables its jobs may receive.
/// Empty (the default) lets none through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowEnv {
    patterns: Vec<Pattern>,
}

impl AllowEnv {
    /// Parses the entries. A pattern that would match a denied name is
    /// refused here rather than silently narrowed at run time: the config
    /// then says exactly what passes.
    pub fn parse(entries: &[String]) -> Result<AllowEnv, String> {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let pattern = Pattern::parse(entry)?;
            if let Some((name, why)) = pattern.overlaps_denied() {
                let hint = match pattern {
                    Pattern::Exact(_) => "; set it in the plugin's `env` if jobs need it",
                    Pattern::Prefix(_) => "; list the variables jobs need by name",
                };
                return Err(format!(
                    "{entry:?} would allow {name}, which no request may set ({why}){hint}"
                ));
            }
            patterns.push(pattern);
        }
        Ok(AllowEnv { patterns })
    }

    /// Whether a request may set `name` for this plugin's jobs: it is a
    /// portable name (`APP_*` must not let in `APP_\n...`), the allow list
    /// names it and the deny list does not.
    pub fn allows(&self, name: &str) -> bool {
        portable_name(name)
            && self.patterns.iter().any(|p| p.matches(name))
            && denied(name).is_none()
    }

    /// Checks every name of a request's `env`; refuses the request if any
    /// one is refused, naming them all.
    pub fn check<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<(), EnvRefused> {
        let mut refused = EnvRefused {
            never: Vec::new(),
            not_allowed: Vec::new(),
            allowed: self.to_string(),
        };
        for name in names {
            if let Some(why) = denied(name) {
                refused.never.push((name.to_owned(), why));
            } else if !self.allows(name) {
                refused.not_allowed.push(name.to_owned());
            }
        }
        if refused.never.is_empty() && refused.not_allowed.is_empty() {
            Ok(())
        } else {
            Err(refused)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Only for tests of the run-time check: patterns that config load
    /// would refuse for overlapping the deny list.
    #[cfg(test)]
    fn unchecked(entries: &[&str]) -> AllowEnv {
        AllowEnv {
            patterns: entries
                .iter()
                .filter_map(|e| Pattern::parse(e).ok())
                .collect(),
        }
    }
}

impl fmt::Display for AllowEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.patterns.is_empty() {
            return f.write_str("none");
        }
        for (i, pattern) in self.patterns.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{pattern}")?;
        }
        Ok(())
    }
}

/// The variables of a request that a plugin refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvRefused {
    /// On the deny list, with why.
    pub never: Vec<(String, &'static str)>,
    /// Not matched by the plugin's allow list.
    pub not_allowed: Vec<String>,
    /// What the plugin allows, as written ("none" when empty).
    pub allowed: String,
}

impl EnvRefused {
    /// Every refused name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.never
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.not_allowed.iter().map(String::as_str))
    }
}

impl fmt::Display for EnvRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        if !self.never.is_empty() {
            f.write_str("never allowed: ")?;
            list(
                f,
                self.never.iter().map(|(n, why)| (n.as_str(), Some(*why))),
            )?;
            first = false;
        }
        if !self.not_allowed.is_empty() {
            if !first {
                f.write_str("; ")?;
            }
            f.write_str("not allowed: ")?;
            list(f, self.not_allowed.iter().map(|n| (n.as_str(), None)))?;
        }
        write!(f, "; its allow_env allows {}", self.allowed)
    }
}

/// `A (why), B, and 3 more`, with names that are not plain quoted and cut.
fn list<'a>(
    f: &mut fmt::Formatter<'_>,
    names: impl ExactSizeIterator<Item = (&'a str, Option<&'static str>)>,
) -> fmt::Result {
    let total = names.len();
    for (i, (name, why)) in names.take(SHOWN).enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        let shown: String = name.chars().take(SHOWN_NAME_LEN).collect();
        let cut = if shown.len() < name.len() { "…" } else { "" };
        if !shown.is_empty() && shown.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            write!(f, "{shown}{cut}")?;
        } else {
            write!(f, "{shown:?}{cut}")?;
        }
        if let Some(why) = why {
            write!(f, " ({why})")?;
        }
    }
    if total > SHOWN {
        write!(f, " and {} more", total - SHOWN)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn allow(entries: &[&str]) -> Result<AllowEnv, String> {
        AllowEnv::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn patterns_are_names_or_prefixes_ending_in_underscore() {
        let ok = allow(&["GREETING", "APP_*", "lower_case", "_X"]).unwrap();
        assert!(ok.allows("GREETING") && ok.allows("APP_") && ok.allows("APP_MODE"));
        assert!(!ok.allows("APPLE") && !ok.allows("GREETINGS") && !ok.allows("greeting"));
        assert_eq!(ok.to_string(), "GREETING, APP_*, lower_case, _X");
        for bad in ["*", "_*", "APP*", "A-B", "", "1X", "A=B", "APP_**", "A*B"] {
            assert!(allow(&[bad]).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(allow(&[]).unwrap().to_string(), "none");
    }

    #[test]
    fn patterns_that_would_open_the_deny_list_are_refused_at_load() {
        for (entry, named) in [
            ("LD_PRELOAD", "LD_PRELOAD"),
            ("LD_*", "LD_*"),
            ("BASH_*", "BASH_"),
            ("PYTHONWARNINGS", "PYTHONWARNINGS"),
            ("PYTHON_GIL", "PYTHON_GIL"),
            ("BROWSER", "BROWSER"),
            ("NODE_*", "NODE_"),
            ("GIT_SSH_*", "GIT_*"),
            ("PATH", "PATH"),
            ("R_*", "R_"),
        ] {
            let err = allow(&[entry]).unwrap_err();
            assert!(err.contains(named), "{entry}: {err}");
            assert!(err.contains("no request may set"), "{entry}: {err}");
        }
        // Near misses stay allowed.
        allow(&["PY_*", "LANG", "LC_*", "TZ", "APP_*", "NODEJS_APP"]).unwrap();
    }

    #[test]
    fn the_reported_attack_is_refused_naming_both_variables() {
        let plugin = allow(&["GREETING"]).unwrap();
        let err = plugin
            .check(["BROWSER", "PYTHONWARNINGS", "OTHER"])
            .unwrap_err();
        let text = err.to_string();
        for part in [
            "BROWSER (",
            "PYTHONWARNINGS (",
            "not allowed: OTHER",
            "allows GREETING",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert_eq!(
            err.names().collect::<Vec<_>>(),
            ["BROWSER", "PYTHONWARNINGS", "OTHER"]
        );
        let none = AllowEnv::default().check(["GREETING"]).unwrap_err();
        assert!(
            none.to_string().ends_with("allow_env allows none"),
            "{none}"
        );
    }

    #[test]
    fn refusals_stay_short_whatever_the_names() {
        let long = "X".repeat(100_000);
        let many: Vec<String> = (0..1000).map(|i| format!("V{i}")).collect();
        let names = many
            .iter()
            .map(String::as_str)
            .chain([long.as_str(), "a\nb"]);
        let text = AllowEnv::default().check(names).unwrap_err().to_string();
        assert!(text.len() < 1000, "{} bytes", text.len());
        assert!(text.contains("and 994 more"), "{text}");
    }

    /// Names drawn so that matches, near misses and deny-list hits are
    /// common: a known fragment, then random name characters.
    fn name() -> impl Strategy<Value = String> {
        let fragments = prop::sample::select(vec![
            "",
            "A",
            "APP_",
            "APP",
            "GREETING",
            "LD_",
            "LD",
            "PYTHON",
            "PYTHONWARNINGS",
            "BROWSER",
            "BASH_",
            "BASH_FUNC_",
            "NODE_",
            "PATH",
            "JOB_ID",
            "GIT_",
            "LC_",
            "PERL5",
            "R_",
            "_",
        ]);
        (fragments, "[A-Za-z0-9_]{0,5}[A-Za-z0-9_\\-\n %.]?")
            .prop_map(|(head, tail)| format!("{head}{tail}"))
    }

    fn patterns() -> impl Strategy<Value = Vec<String>> {
        let pattern = prop_oneof![
            name(),
            name().prop_map(|n| format!("{n}_*")),
            prop::sample::select(vec!["LD_*", "BASH_*", "APP_*", "PYTHON_*", "BROWSER"])
                .prop_map(str::to_owned),
        ];
        prop::collection::vec(pattern, 0..5)
    }

    /// The reference: a pattern matches by equality or by its prefix.
    fn reference_match(patterns: &[String], name: &str) -> bool {
        patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A variable passes iff a pattern allows it and the deny list does
        /// not name it, whether or not config load would have taken the
        /// patterns, and whatever its value.
        #[test]
        fn a_variable_passes_iff_allowed_and_not_denied(
            entries in patterns(),
            names in prop::collection::vec(name(), 0..6),
        ) {
            let valid: Vec<String> =
                entries.iter().filter(|e| Pattern::parse(e).is_ok()).cloned().collect();
            let strs: Vec<&str> = valid.iter().map(String::as_str).collect();
            let plugin = AllowEnv::unchecked(&strs);
            for name in &names {
                let portable = !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                let expected = portable && reference_match(&valid, name) && denied(name).is_none();
                prop_assert_eq!(plugin.allows(name), expected, "{} with {:?}", name, valid);
            }
            let refused: Vec<String> = match plugin.check(names.iter().map(String::as_str)) {
                Ok(()) => Vec::new(),
                Err(e) => e.names().map(str::to_owned).collect(),
            };
            for name in &names {
                prop_assert_eq!(refused.contains(name), !plugin.allows(name), "{}", name);
            }
        }

        /// What config load accepts never lets a denied name through.
        #[test]
        fn accepted_allow_lists_never_match_a_denied_name(
            entries in patterns(),
            names in prop::collection::vec(name(), 0..6),
        ) {
            if let Ok(plugin) = AllowEnv::parse(&entries) {
                for name in &names {
                    if denied(name).is_some() {
                        prop_assert!(!plugin.patterns.iter().any(|p| p.matches(name)),
                            "{} accepted by {}", name, plugin);
                    }
                }
            }
        }
    }
}
