//! `cargo xtask setup`: checks every prerequisite and installs only what is
//! missing, one line per step, so that a second run installs nothing.

use std::{
    fmt, fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cargo::{
    TOOLCHAIN, cargo, cargo_home, describe, find_on_path, probe, run_silently, stdout_of,
};

/// Toolchain components: rust-src for `-Z build-std=core` on the BPF target,
/// rustfmt and clippy for `cargo xtask fmt|clippy`.
const COMPONENTS: [&str; 3] = ["rust-src", "rustfmt", "clippy"];

/// LLVM major version of Rust [`TOOLCHAIN`]: bpf-linker must link the same
/// LLVM, or it cannot read the bitcode rustc emits.
const LLVM_MAJOR: u32 = 22;
const LLVM_BIN_DIR: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_FEATURE: &str = "llvm-22";

/// bpf-linker release that setup installs; any 0.13.x is accepted.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13";

/// Debian packages and why each is needed.
const APT_PACKAGES: [(&str, &str); 8] = [
    ("llvm-22-dev", "the LLVM bpf-linker links against"),
    ("zlib1g-dev", "linked by bpf-linker's LLVM bindings"),
    ("libzstd-dev", "linked by bpf-linker's LLVM bindings"),
    (
        "g++",
        "compiles the C shim of bpf-linker's LLVM bindings and provides libstdc++ to link",
    ),
    ("bpftool", "inspects loaded programs and maps"),
    (
        "iproute2",
        "`ip`, which the network-namespace testbed drives",
    ),
    (
        "iptables",
        "kube-proxy's iptables rules, which `bench` compares against (in test namespaces only)",
    ),
    (
        "nftables",
        "kube-proxy's nftables rules, which `bench` compares against (in test namespaces only)",
    ),
];

const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// Whether setup installs what is missing or only reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Install,
    Check,
}

/// One setup run: prints a line per step and, in [`Mode::Check`], collects
/// what is missing.
pub struct Setup {
    mode: Mode,
    missing: Vec<String>,
}

impl Setup {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            missing: Vec::new(),
        }
    }

    /// Every prerequisite of building, running and testing the project.
    pub fn all(mode: Mode) -> Result<()> {
        let mut setup = Self::new(mode);
        setup.root()?;
        setup.toolchain()?;
        setup.apt_packages()?;
        setup.bpf_linker()?;
        setup.bpffs()?;
        setup.finish()
    }

    /// Fails when a check-only run found something missing.
    pub fn finish(self) -> Result<()> {
        if self.missing.is_empty() {
            Ok(())
        } else {
            bail!(
                "missing: {}; run `cargo xtask setup` to install",
                self.missing.join("; ")
            )
        }
    }

    fn ok(&self, what: impl fmt::Display) {
        println!("ok: {what}");
    }

    /// Runs `command` to install `what` and returns true, or, when only
    /// checking, records `what` as missing and returns false.
    fn install(&mut self, what: &str, command: &mut Command) -> Result<bool> {
        match self.mode {
            Mode::Install => {
                println!("installing: {}", describe(command));
                // CI runs without a terminal: nothing may wait for input.
                run_silently(command.stdin(Stdio::null()))?;
                Ok(true)
            }
            Mode::Check => {
                println!("missing: {what} (would run: {})", describe(command));
                self.missing.push(what.to_owned());
                Ok(false)
            }
        }
    }

    /// Setup installs packages and mounts bpffs; the agent and the tests load
    /// BPF programs. All of that needs root.
    fn root(&self) -> Result<()> {
        let status =
            fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let uid =
            effective_uid(&status).ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
        if uid != 0 {
            bail!(
                "must run as root (effective uid is {uid}): setup installs packages and mounts bpffs, \
                 and the agent and its tests load BPF programs"
            );
        }
        self.ok("running as root");
        Ok(())
    }

    /// The pinned Rust toolchain with its components, through rustup.
    pub fn toolchain(&mut self) -> Result<()> {
        if find_on_path("rustup").is_none() {
            bail!(
                "rustup is not on PATH (nor in {}): install it from https://rustup.rs",
                cargo_home()?.join("bin").display()
            );
        }
        let what = format!("rust {TOOLCHAIN} with {}", COMPONENTS.join(", "));
        let mut command = Command::new("rustup");
        match toolchain_state()? {
            ToolchainState::Complete => {
                self.ok(what);
                return Ok(());
            }
            ToolchainState::Absent => command.args([
                "toolchain",
                "install",
                TOOLCHAIN,
                "--profile",
                "minimal",
                "--component",
                &COMPONENTS.join(","),
            ]),
            ToolchainState::MissingComponents(components) => command
                .args(["component", "add", "--toolchain", TOOLCHAIN])
                .args(components),
        };
        if self.install(&what, &mut command)? {
            match toolchain_state()? {
                ToolchainState::Complete => self.ok(what),
                _ => bail!("`{}` did not install {what}", describe(&command)),
            }
        }
        Ok(())
    }

    /// Debian packages, checked with dpkg-query; `apt-get update` runs once,
    /// and only when something is missing.
    fn apt_packages(&mut self) -> Result<()> {
        let mut missing = Vec::new();
        for (package, purpose) in APT_PACKAGES {
            match installed_package_version(package)? {
                Some(version) => self.ok(format_args!("{package} {version} ({purpose})")),
                None => missing.push(package),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let mut install = apt_get();
        install
            .args(["install", "--yes", "--no-install-recommends"])
            .args(&missing);
        if self.mode == Mode::Install {
            let mut update = apt_get();
            update.arg("update");
            self.install("apt package lists", &mut update)?;
        }
        if self.install(&format!("apt packages {}", missing.join(" ")), &mut install)? {
            for package in missing {
                let version = installed_package_version(package)?.ok_or_else(|| {
                    anyhow!("{package} is not installed after `{}`", describe(&install))
                })?;
                self.ok(format_args!("{package} {version}"));
            }
        }
        Ok(())
    }

    /// bpf-linker of the pinned series, linked against the toolchain's LLVM,
    /// installed into `$CARGO_HOME/bin` (first on PATH, see
    /// `prepare_process_environment`).
    fn bpf_linker(&mut self) -> Result<()> {
        let problem = match inspect_bpf_linker()? {
            Ok(linker) => {
                self.ok(linker);
                return Ok(());
            }
            Err(problem) => problem,
        };
        let cargo_home = cargo_home()?;
        let mut path = std::ffi::OsString::from(format!("{LLVM_BIN_DIR}:"));
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let mut command = cargo();
        command
            // llvm-sys finds LLVM through the llvm-config first on PATH.
            .env("PATH", path)
            // Outside the workspace, so that its .cargo/config.toml does not
            // apply to the linker's build.
            .current_dir(&cargo_home)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--locked",
                "--no-default-features",
                "--features",
                BPF_LINKER_FEATURE,
            ])
            .arg("--root")
            .arg(&cargo_home);
        let what = match &problem {
            LinkerProblem::Missing => format!("bpf-linker {BPF_LINKER_SERIES}"),
            LinkerProblem::Unsuitable { path, reason } => {
                command.arg("--force");
                format!(
                    "bpf-linker {BPF_LINKER_SERIES} ({} is unsuitable: {reason})",
                    path.display()
                )
            }
        };
        if self.install(&what, &mut command)? {
            match inspect_bpf_linker()? {
                Ok(linker) => self.ok(linker),
                Err(LinkerProblem::Missing) => {
                    bail!("bpf-linker is not on PATH after `{}`", describe(&command))
                }
                Err(LinkerProblem::Unsuitable { path, reason }) => bail!(
                    "{} is unsuitable after `{}`: {reason}",
                    path.display(),
                    describe(&command)
                ),
            }
        }
        Ok(())
    }

    /// The BPF filesystem, where the agent pins its maps.
    fn bpffs(&mut self) -> Result<()> {
        let what = format!("bpffs mounted on {BPFFS_MOUNT_POINT}");
        if bpffs_mounted()? {
            self.ok(what);
            return Ok(());
        }
        let mut command = Command::new("mount");
        command.args(["-t", "bpf", "bpf", BPFFS_MOUNT_POINT]);
        if self.install(&what, &mut command)? {
            if !bpffs_mounted()? {
                bail!(
                    "{what}: not in /proc/self/mounts after `{}`",
                    describe(&command)
                );
            }
            self.ok(what);
        }
        Ok(())
    }
}

enum ToolchainState {
    Absent,
    MissingComponents(Vec<&'static str>),
    Complete,
}

fn toolchain_state() -> Result<ToolchainState> {
    let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]))?;
    if !lists_toolchain(&toolchains, TOOLCHAIN) {
        return Ok(ToolchainState::Absent);
    }
    let installed = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))?;
    let missing: Vec<_> = COMPONENTS
        .into_iter()
        .filter(|component| !lists_component(&installed, component))
        .collect();
    Ok(if missing.is_empty() {
        ToolchainState::Complete
    } else {
        ToolchainState::MissingComponents(missing)
    })
}

/// Whether `rustup toolchain list` output names `toolchain` (listed with its
/// host triple, e.g. "1.98.0-x86_64-unknown-linux-gnu (active)").
fn lists_toolchain(list: &str, toolchain: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| {
            name == toolchain
                || name
                    .strip_prefix(toolchain)
                    .is_some_and(|rest| rest.starts_with('-'))
        })
}

/// Whether `rustup component list --installed` output names `component`,
/// which it lists bare ("rust-src") or with the host triple
/// ("clippy-x86_64-unknown-linux-gnu"). No other component's name starts
/// with one of [`COMPONENTS`] followed by '-'.
fn lists_component(list: &str, component: &str) -> bool {
    list.lines().map(str::trim).any(|name| {
        name == component
            || name
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    command.env("DEBIAN_FRONTEND", "noninteractive");
    command
}

/// The installed version of a Debian package, or None when it is not
/// installed (or unknown to dpkg).
fn installed_package_version(package: &str) -> Result<Option<String>> {
    let mut command = Command::new("dpkg-query");
    command.args([
        "--show",
        "--showformat=${db:Status-Status} ${Version}",
        package,
    ]);
    let output = probe(&mut command)?.ok_or_else(|| {
        anyhow!(
            "dpkg-query not found: setup installs packages with apt on Debian; elsewhere install \
             the equivalents of {} by hand",
            APT_PACKAGES.map(|(package, _)| package).join(", ")
        )
    })?;
    // dpkg-query exits 1 for a package it has never heard of.
    if !output.status.success() {
        return Ok(None);
    }
    Ok(installed_version(&String::from_utf8_lossy(&output.stdout)).map(str::to_owned))
}

/// Parses dpkg-query's "${db:Status-Status} ${Version}" output.
fn installed_version(status: &str) -> Option<&str> {
    let (status, version) = status.trim().split_once(' ')?;
    (status == "installed").then_some(version)
}

/// A bpf-linker fit for the pinned toolchain.
struct BpfLinker {
    path: PathBuf,
    version: String,
}

impl fmt::Display for BpfLinker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bpf-linker {} with LLVM {LLVM_MAJOR} ({})",
            self.version,
            self.path.display()
        )
    }
}

enum LinkerProblem {
    Missing,
    Unsuitable { path: PathBuf, reason: String },
}

/// Finds the bpf-linker rustc will run (the first on PATH) and checks its
/// version and the LLVM it is linked against.
fn inspect_bpf_linker() -> Result<Result<BpfLinker, LinkerProblem>> {
    let Some(path) = find_on_path("bpf-linker") else {
        return Ok(Err(LinkerProblem::Missing));
    };
    let unsuitable = |reason: String| {
        Ok(Err(LinkerProblem::Unsuitable {
            path: path.clone(),
            reason,
        }))
    };
    let Some(output) = probe(Command::new(&path).arg("--version"))? else {
        return unsuitable("cannot be executed".to_owned());
    };
    if !output.status.success() {
        // Typically the dynamic loader failing to find its libLLVM.
        return unsuitable(format!(
            "`--version` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(version) = bpf_linker_version(&stdout) else {
        return unsuitable(format!("unexpected `--version` output {:?}", stdout.trim()));
    };
    if !in_series(version, BPF_LINKER_SERIES) {
        return unsuitable(format!("version {version}, need {BPF_LINKER_SERIES}.x"));
    }
    // ldd fails for a statically linked binary, which has no libLLVM to show.
    let dependencies = probe(Command::new("ldd").arg(&path))?
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    match linked_llvm_major(&dependencies) {
        Some(LLVM_MAJOR) => Ok(Ok(BpfLinker {
            path: path.clone(),
            version: version.to_owned(),
        })),
        Some(major) => unsuitable(format!("linked against LLVM {major}, need {LLVM_MAJOR}")),
        None => unsuitable(format!("not linked against a shared libLLVM {LLVM_MAJOR}")),
    }
}

/// The version in `bpf-linker --version` output ("bpf-linker 0.13.0").
fn bpf_linker_version(output: &str) -> Option<&str> {
    output
        .trim()
        .strip_prefix("bpf-linker ")?
        .split_whitespace()
        .next()
}

/// Whether `version` (e.g. "0.13.2") belongs to `series` (e.g. "0.13").
fn in_series(version: &str, series: &str) -> bool {
    version
        .strip_prefix(series)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The LLVM major version named by the libLLVM line of `ldd` output
/// ("libLLVM.so.22.1 => ..." or "libLLVM-22.so => ...").
fn linked_llvm_major(ldd_output: &str) -> Option<u32> {
    ldd_output.lines().find_map(|line| {
        let library = line.split_whitespace().next()?;
        let version = library
            .strip_prefix("libLLVM.so.")
            .or_else(|| library.strip_prefix("libLLVM-"))?;
        let digits = version
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(version.len());
        version[..digits].parse().ok()
    })
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts_bpffs_at(&mounts, BPFFS_MOUNT_POINT))
}

/// Whether /proc/self/mounts lists a bpf filesystem on `mount_point`.
fn mounts_bpffs_at(mounts: &str, mount_point: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(mount_point) && fields.next() == Some("bpf")
    })
}

/// The effective uid from /proc/self/status ("Uid: real effective saved fs").
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_constants_agree() {
        let major = LLVM_MAJOR.to_string();
        assert_eq!(LLVM_BIN_DIR, format!("/usr/lib/llvm-{major}/bin"));
        assert_eq!(BPF_LINKER_FEATURE, format!("llvm-{major}"));
        assert_eq!(APT_PACKAGES[0].0, format!("llvm-{major}-dev"));
        assert!(in_series(BPF_LINKER_VERSION, BPF_LINKER_SERIES));
    }

    #[test]
    fn toolchain_list_is_matched_by_name_and_triple() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    1.98.0-x86_64-unknown-linux-gnu\n";
        assert!(lists_toolchain(list, "1.98.0"));
        assert!(!lists_toolchain(list, "1.98"));
        assert!(!lists_toolchain(list, "1.95.0"));
        assert!(!lists_toolchain("no installed toolchains\n", "1.98.0"));
    }

    #[test]
    fn components_are_matched_bare_or_with_triple() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n\
                    rust-src\nrust-std-x86_64-unknown-linux-gnu\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(lists_component(list, "rust-src"));
        assert!(lists_component(list, "clippy"));
        assert!(!lists_component(list, "rustfmt"));
    }

    #[test]
    fn dpkg_status_yields_version_only_when_installed() {
        assert_eq!(
            installed_version("installed 1:22.1.8-1~deb12u1"),
            Some("1:22.1.8-1~deb12u1")
        );
        assert_eq!(installed_version("config-files 6.1.0-3"), None);
        assert_eq!(installed_version("not-installed "), None);
        assert_eq!(installed_version(""), None);
    }

    #[test]
    fn bpf_linker_version_is_parsed_and_matched_to_series() {
        assert_eq!(bpf_linker_version("bpf-linker 0.13.0\n"), Some("0.13.0"));
        assert_eq!(bpf_linker_version("something else 0.13.0"), None);
        assert!(in_series("0.13.0", "0.13"));
        assert!(in_series("0.13.4", "0.13"));
        assert!(!in_series("0.130.0", "0.13"));
        assert!(!in_series("0.12.1", "0.13"));
    }

    #[test]
    fn llvm_major_is_read_from_ldd_output() {
        let debian = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                      \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007fba)\n\
                      \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007fba)\n";
        assert_eq!(linked_llvm_major(debian), Some(22));
        assert_eq!(
            linked_llvm_major("\tlibLLVM-21.so => not found\n"),
            Some(21)
        );
        assert_eq!(linked_llvm_major("\tlibz.so.1 => /lib/libz.so.1\n"), None);
        assert_eq!(linked_llvm_major(""), None);
    }

    #[test]
    fn bpffs_is_found_by_mount_point_and_type() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\n\
                      bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n";
        assert!(mounts_bpffs_at(mounts, "/sys/fs/bpf"));
        assert!(!mounts_bpffs_at("sysfs /sys sysfs rw 0 0\n", "/sys/fs/bpf"));
        assert!(!mounts_bpffs_at(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\txtask\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\txtask\n"), None);
    }
}
