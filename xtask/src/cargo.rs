//! The pinned toolchain, the process environment every child sees, and
//! helpers that run commands and report them.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, anyhow};

/// The toolchain everything but xtask builds with: aya 0.16 needs Rust 1.98,
/// and its LLVM (22) must match the LLVM bpf-linker links against. Never a
/// floating channel: a newer toolchain brings an LLVM Debian does not ship.
/// `lb-agent/build.rs` pins the same string for the BPF build.
pub const TOOLCHAIN: &str = "1.98.0";

/// Package selection for host builds: every workspace member except
/// `lb-ebpf`, which only builds for the BPF target (lb-agent's build script
/// builds it). `--workspace` alone would ignore `default-members`.
pub const HOST_PACKAGES: [&str; 3] = ["--workspace", "--exclude", "lb-ebpf"];

/// Variables `cargo run` and the rustup proxy set for xtask itself. Passed on,
/// they would describe xtask to its children: RUSTUP_TOOLCHAIN would pin
/// every nested rustup proxy to the default toolchain, and CARGO names the
/// default toolchain's cargo binary.
const VARIABLES_FOR_XTASK_ONLY: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// Build profile of the host binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn from_release_flag(release: bool) -> Self {
        if release { Self::Release } else { Self::Debug }
    }

    /// Directory under the target directory that holds this profile's output.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }

    /// Adds the cargo flag selecting this profile, if it needs one.
    pub fn apply(self, command: &mut Command) {
        if self == Self::Release {
            command.arg("--release");
        }
    }
}

/// A command that exited unsuccessfully. `main` exits with the child's code
/// so that callers (CI) see cargo's own status.
#[derive(Debug)]
pub struct CommandFailed {
    pub command: String,
    pub status: ExitStatus,
}

impl CommandFailed {
    /// The exit code to pass on: the child's, or 128 + signal like a shell.
    pub fn exit_code(&self) -> i32 {
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        }
    }
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed: {}", self.command, self.status)
    }
}

impl std::error::Error for CommandFailed {}

/// The workspace root: xtask's manifest directory is one level below it.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// Cargo's home: `$CARGO_HOME`, else `$HOME/.cargo` (rustup's default).
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// The target directory cargo builds into from the workspace root.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Puts `$CARGO_HOME/bin` first on PATH, so that `cargo`, `rustup` and
/// `bpf-linker` resolve to the rustup proxies and the linker setup installs,
/// and drops the variables that describe xtask itself. Every child inherits
/// the result.
pub fn prepare_process_environment() -> Result<()> {
    let cargo_bin = cargo_home()?.join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.first() != Some(&cargo_bin) {
        dirs.insert(0, cargo_bin);
    }
    let path = env::join_paths(dirs).context("joining PATH with $CARGO_HOME/bin")?;
    let cargo_package_variables: Vec<OsString> = env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_string_lossy().starts_with("CARGO_PKG_"))
        .collect();
    // SAFETY: called from `main` before xtask starts any thread,
    // so nothing reads the environment concurrently.
    unsafe {
        env::set_var("PATH", path);
        for name in VARIABLES_FOR_XTASK_ONLY {
            env::remove_var(name);
        }
        for name in cargo_package_variables {
            env::remove_var(name);
        }
    }
    Ok(())
}

/// `cargo +TOOLCHAIN`, run from the workspace root. "cargo" resolves to the
/// rustup proxy in `$CARGO_HOME/bin`, which understands `+toolchain`.
pub fn cargo() -> Command {
    let mut command = Command::new("cargo");
    command
        .arg(format!("+{TOOLCHAIN}"))
        .current_dir(workspace_root());
    command
}

/// Looks `program` up on PATH the way `execvp` does.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// Prints `running: <command>` and runs it with inherited stdio.
pub fn run(command: &mut Command) -> Result<()> {
    println!("running: {}", describe(command));
    run_silently(command)
}

/// Prints `running: <command>` and replaces xtask with it. For the last step
/// of a task: the command alone then receives the terminal's signals
/// (Ctrl-C reaches its own cleanup instead of killing xtask under it) and
/// its exit status is the task's. Returns only if the exec fails.
pub fn exec(command: &mut Command) -> anyhow::Error {
    println!("running: {}", describe(command));
    let error = command.exec();
    anyhow::Error::new(error).context(format!("executing `{}`", describe(command)))
}

/// Runs `command` with inherited stdio; fails with [`CommandFailed`].
pub fn run_silently(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting `{}`", describe(command)))?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailed {
            command: describe(command),
            status,
        }
        .into())
    }
}

/// Runs `command` without stdin and captures its output; `Ok(None)` when the
/// program is not installed, so that callers can report it as missing.
pub fn probe(command: &mut Command) -> Result<Option<std::process::Output>> {
    match command.stdin(Stdio::null()).output() {
        Ok(output) => Ok(Some(output)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("running `{}`", describe(command))),
    }
}

/// Like [`probe`], but the command must exist and succeed; returns stdout.
pub fn stdout_of(command: &mut Command) -> Result<String> {
    let output = probe(command)?
        .ok_or_else(|| anyhow!("`{}`: program not found on PATH", describe(command)))?;
    if !output.status.success() {
        return Err(anyhow!(
            "`{}` failed ({}): {}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", describe(command)))
}

/// The command as a shell line a person can copy: variables the command sets
/// first (a PATH prefix shown as `PATH=dir:$PATH`), then program and
/// arguments, quoted where needed.
pub fn describe(command: &Command) -> String {
    let current_path = env::var_os("PATH").unwrap_or_default();
    let mut words = Vec::new();
    for (name, value) in command.get_envs() {
        let Some(value) = value else { continue };
        let value = match path_prefix_of(value, &current_path) {
            Some(prefix) if name == "PATH" => format!("{}:$PATH", quote(&prefix.to_string_lossy())),
            _ => quote(&value.to_string_lossy()),
        };
        words.push(format!("{}={value}", name.to_string_lossy()));
    }
    words.push(quote(&command.get_program().to_string_lossy()));
    words.extend(command.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

/// The directories `path` adds in front of `base`, if it is `prefix:base`.
fn path_prefix_of<'a>(path: &'a OsStr, base: &OsStr) -> Option<&'a OsStr> {
    let path = path.as_encoded_bytes();
    let base = base.as_encoded_bytes();
    let prefix = path.strip_suffix(base)?.strip_suffix(b":")?;
    // SAFETY: `prefix` is a prefix of an `OsStr`'s encoded bytes ending right
    // before an ASCII ':', a valid split point for `from_encoded_bytes_unchecked`.
    Some(unsafe { OsStr::from_encoded_bytes_unchecked(prefix) })
}

/// Quotes a word for a POSIX shell when it contains anything but plain
/// characters.
fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.,/:=+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The absolute path of a binary of this workspace, checked to exist.
pub fn workspace_binary(profile: Profile, name: &str) -> Result<PathBuf> {
    let binary = target_dir().join(profile.dir_name()).join(name);
    if is_executable(&binary) {
        Ok(binary)
    } else {
        Err(anyhow!(
            "{} does not exist after the build (is CARGO_TARGET_DIR or build.target-dir set elsewhere?)",
            binary.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_set_variables_and_quotes_arguments() {
        let mut command = Command::new("cargo");
        command.env("RUSTC_BOOTSTRAP", "1").args([
            "clippy",
            "--",
            "-D",
            "warnings",
            "two words",
            "it's",
        ]);
        assert_eq!(
            describe(&command),
            r"RUSTC_BOOTSTRAP=1 cargo clippy -- -D warnings 'two words' 'it'\''s'"
        );
    }

    #[test]
    fn describe_abbreviates_a_path_prefix() {
        let current = env::var_os("PATH").unwrap_or_default();
        let mut prefixed = OsString::from("/usr/lib/llvm-22/bin:");
        prefixed.push(&current);
        let mut command = Command::new("cargo");
        command.env("PATH", prefixed).arg("install");
        assert_eq!(
            describe(&command),
            "PATH=/usr/lib/llvm-22/bin:$PATH cargo install"
        );
    }

    #[test]
    fn path_prefix_requires_a_separator() {
        let base = OsStr::new("/usr/bin");
        assert_eq!(
            path_prefix_of(OsStr::new("/opt/bin:/usr/bin"), base),
            Some(OsStr::new("/opt/bin"))
        );
        assert_eq!(path_prefix_of(OsStr::new("/opt/usr/bin"), base), None);
        assert_eq!(path_prefix_of(OsStr::new("/usr/bin"), base), None);
    }

    #[test]
    fn quote_leaves_plain_words_alone() {
        assert_eq!(quote("+1.98.0"), "+1.98.0");
        assert_eq!(quote("--features=llvm-22"), "--features=llvm-22");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
    }

    #[test]
    fn release_profile_adds_the_flag() {
        let mut command = Command::new("cargo");
        Profile::Release.apply(&mut command);
        Profile::Debug.apply(&mut command);
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(args, ["--release"]);
        assert_eq!(Profile::from_release_flag(false).dir_name(), "debug");
    }
}
