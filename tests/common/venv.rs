//! Python virtualenvs for tests that run real Python programs (drivers, pgbouncer_exporter):
//! created under `$CARGO_TARGET_DIR` (default `target/`) once, with packages from PyPI, and
//! reused while their packages import. A file lock next to each venv keeps test processes
//! from setting up the same one at once; `pip` is bounded in time and retries.
//!
//! Environment: each venv's `override_var` puts it elsewhere; `TIDEPOOL_TEST_PYTHON` picks the
//! interpreter that creates it (default `python3`).
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bound on `pip install` (download and install every package).
pub const PIP_TIMEOUT: Duration = Duration::from_secs(300);

/// A venv: where, what goes in, and how to tell it works.
pub struct Spec {
    /// Directory name under the target dir.
    pub dir: &'static str,
    /// An environment variable that, when set, is the venv's directory instead.
    pub override_var: &'static str,
    /// Extra `pip install` arguments before the packages (e.g. `--no-deps`).
    pub pip_args: &'static [&'static str],
    pub packages: &'static [&'static str],
    /// Python code that imports the packages and prints their versions.
    pub probe: &'static str,
    /// For messages: what the venv is for.
    pub what: &'static str,
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(d)
            }
        }
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// Run `cmd` with stdout and stderr into one temp file, killing it after `timeout`.
/// Returns the exit status and the output; `Err` if it could not start or timed out.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(ExitStatus, String), String> {
    let what = format!("{cmd:?}");
    let temp = |e: std::io::Error| format!("temp file for {what}: {e}");
    let mut out = tempfile::tempfile().map_err(temp)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(temp)?)
        .stderr(out.try_clone().map_err(temp)?);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t0.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    let mut bytes = Vec::new();
    let _ = out.seek(SeekFrom::Start(0));
    let _ = out.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match status {
        Some(st) => Ok((st, text)),
        None => Err(format!(
            "{what} did not finish within {timeout:?}; killed. Output:\n{text}"
        )),
    }
}

/// Do the venv's packages import? Returns what the probe printed.
fn probe(python: &Path, code: &str) -> Result<String, String> {
    let mut cmd = Command::new(python);
    cmd.args(["-c", code]);
    match run_bounded(cmd, Duration::from_secs(60))? {
        (st, out) if st.success() => Ok(out.trim().to_string()),
        (st, out) => Err(format!("{st}: {out}")),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `python -m venv dir`; on a Debian python without ensurepip, install `python3-venv` (as
/// root) and use the system python.
fn create_venv(dir: &Path) -> Result<(), String> {
    let python = std::env::var("TIDEPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let venv = |python: &str| {
        let _ = std::fs::remove_dir_all(dir);
        let mut cmd = Command::new(python);
        cmd.args(["-m", "venv"]).arg(dir);
        run_bounded(cmd, Duration::from_secs(180))
    };
    let (st, out) = venv(&python)?;
    if st.success() {
        return Ok(());
    }
    if !out.contains("ensurepip") || !is_root() {
        return Err(format!("`{python} -m venv {}` failed ({st}):\n{out}\n(on Debian/Ubuntu: apt-get install python3-venv)", dir.display()));
    }
    eprintln!("venv: `{python} -m venv` needs ensurepip; installing python3-venv with apt-get");
    for args in [&["update"][..], &["install", "-y", "python3-venv"][..]] {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let (st, out) = run_bounded(cmd, Duration::from_secs(300))?;
        if !st.success() {
            return Err(format!("apt-get {args:?} failed ({st}):\n{out}"));
        }
    }
    let (st, out) = venv("/usr/bin/python3")?;
    if st.success() {
        Ok(())
    } else {
        Err(format!(
            "`/usr/bin/python3 -m venv {}` failed ({st}) even after installing python3-venv:\n{out}",
            dir.display()
        ))
    }
}

/// The venv's directory, set up (or reused) with `spec`'s packages. Blocking: call it from
/// `spawn_blocking` in async tests.
pub fn ensure(spec: &Spec) -> Result<PathBuf, String> {
    let dir = match std::env::var_os(spec.override_var) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => target_dir().join(spec.dir),
    };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let python = dir.join("bin").join("python");
    // Other test processes may set up the same venv: one at a time.
    let lock_path = dir.with_extension("lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;

    if python.exists() {
        if let Ok(v) = probe(&python, spec.probe) {
            eprintln!("{}: reusing {} ({v})", spec.what, dir.display());
            return Ok(dir);
        }
    }
    let t0 = Instant::now();
    create_venv(&dir)?;
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        "30",
        "--retries",
        "2",
    ])
    .args(spec.pip_args)
    .args(spec.packages);
    let (st, out) = run_bounded(cmd, PIP_TIMEOUT)
        .map_err(|e| format!("pip install {:?} (is PyPI reachable?): {e}", spec.packages))?;
    if !st.success() {
        return Err(format!(
            "pip install {:?} into {} failed ({st}); is PyPI reachable?\n{out}",
            spec.packages,
            dir.display()
        ));
    }
    let v = probe(&python, spec.probe)
        .map_err(|e| format!("installed, but the packages do not import: {e}"))?;
    eprintln!(
        "{}: created {} in {:.1}s ({v})",
        spec.what,
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(dir)
}
