//! A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` from the
//! machine's PostgreSQL (Debian's `postgresql` package), in a fresh
//! temporary directory, on a free loopback port, as an unprivileged user
//! (`postgres` when the tests run as root: PostgreSQL refuses root).
//!
//! One shared server per test process, made on first use (and servers of
//! their own for tests that need one, stopped when dropped). It is stopped and its
//! directory removed when the test process ends, however it ends: a shell
//! holds the server and waits for the end of a pipe whose other end only
//! this process holds (its lifeline); the kernel closes that end when the
//! process exits, and the shell then stops the server and removes the
//! directory. Each caller gets a database of its own, dropped when the
//! caller is done with it: a suite run makes hundreds, 7.5 MB each.
//!
//! Shared by the scheduler's store tests and the end-to-end tests
//! (included with `#[path]`); std only.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// A running throwaway server.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    /// Its directory, where its Unix socket is.
    dir: String,
    /// Dropped only with the process: its end closing stops the server.
    _lifeline: Mutex<(Child, ChildStdin)>,
}

/// The stand-in for the server's life: started, it prints `ready DIR` and
/// waits for its standard input to end. With `PG_TLS_CERT` and
/// `PG_TLS_KEY` (PEM) in its environment, TCP connections must be TLS
/// (`hostssl` only); the Unix socket stays open for the harness.
const SCRIPT: &str = r#"
set -eu
bin=$1; port=$2
dir=$(mktemp -d /tmp/jobcluster-pg.XXXXXX)
trap 'rm -rf "$dir"' EXIT
"$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
tls=""
if [ -n "${PG_TLS_CERT:-}" ]; then
  printf '%s' "$PG_TLS_CERT" >"$dir/server.crt"
  (umask 077 && printf '%s' "$PG_TLS_KEY" >"$dir/server.key")
  printf 'local all all trust\nhostssl all all 127.0.0.1/32 trust\n' >"$dir/data/pg_hba.conf"
  tls="-c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
fi
"$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c max_wal_size=96MB -c min_wal_size=32MB $tls" start >/dev/null \
  || { cat "$dir/server.log" >&2; exit 1; }
echo "ready $dir"
cat >/dev/null || true
"$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
"#;

impl Postgres {
    /// The server of this test process, started on first call; `Err` says
    /// why there is none (PostgreSQL not installed, say).
    pub fn shared() -> Result<&'static Postgres, String> {
        static SERVER: OnceLock<Result<Postgres, String>> = OnceLock::new();
        SERVER
            .get_or_init(Postgres::start)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A server of its own whose TCP connections must be TLS, with this
    /// certificate and key (PEM); stopped when dropped.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Postgres, String> {
        Postgres::start_with(&[("PG_TLS_CERT", cert_pem), ("PG_TLS_KEY", key_pem)])
    }

    fn start() -> Result<Postgres, String> {
        Postgres::start_with(&[])
    }

    fn start_with(env: &[(&str, &str)]) -> Result<Postgres, String> {
        let bin = bin_dir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut command = if nix_is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", SCRIPT, "sh"]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", SCRIPT, "sh"]);
            c
        };
        let mut child = command
            .arg(&bin)
            .arg(port.to_string())
            .current_dir("/")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("could not start PostgreSQL's initdb/pg_ctl: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let Some(dir) = line.trim().strip_prefix("ready ") else {
            let _ = child.wait();
            return Err("the throwaway PostgreSQL did not start (its log is above)".into());
        };
        Ok(Postgres {
            port,
            bin,
            dir: dir.to_owned(),
            _lifeline: Mutex::new((child, stdin)),
        })
    }

    /// A new, empty database, dropped with the value returned.
    pub fn database(&'static self) -> Database {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let created = self.tool("createdb").arg(&name).output();
        match created {
            Ok(out) if out.status.success() => {}
            // Its own words and the server's: a failure here fails every
            // test after it, and only these say why.
            Ok(out) => panic!(
                "createdb {name} failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail()
            ),
            Err(e) => panic!("could not run createdb: {e}"),
        }
        Database {
            url: self.url(&name),
            name,
            server: self,
        }
    }

    /// One of the server's client programs (`createdb`, `dropdb`), to its
    /// superuser over TCP.
    fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(self.bin.join(name));
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        command.args(["-U", "postgres"]);
        command
    }

    /// The last lines of the server's log, for a failure's message.
    fn log_tail(&self) -> String {
        match std::fs::read_to_string(format!("{}/server.log", self.dir)) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!("the server's log ends:\n{tail}")
            }
            Err(e) => format!("the server's log is unreadable: {e}"),
        }
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

/// A database of its own on the shared server; dropped (its sessions
/// ended) when this is.
pub struct Database {
    pub url: String,
    name: String,
    server: &'static Postgres,
}

impl Database {
    /// Its URL, the database kept until the server stops with the test
    /// process: for stores the caller cannot outlive (the store suite's,
    /// a few dozen per process).
    pub fn keep(mut self) -> String {
        let url = std::mem::take(&mut self.url);
        std::mem::forget(self);
        url
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // `--force` ends the sessions of schedulers still running (a test
        // that panicked, or schedulers the test held longer).
        let _ = self
            .server
            .tool("dropdb")
            .args(["--force", "--if-exists"])
            .arg(&self.name)
            .stderr(Stdio::null())
            .status();
    }
}

/// Where `initdb` and `pg_ctl` are: `$JOBCLUSTER_PG_BIN`, or the newest
/// of Debian's `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("JOBCLUSTER_PG_BIN") {
        return Ok(dir.into());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
         `apt-get install postgresql`, as scripts/test.sh and .ci/run do, \
         or set JOBCLUSTER_PG_BIN"
            .to_owned()
    })
}

fn nix_is_root() -> bool {
    // The owner of our own /proc entry is our effective user.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}
