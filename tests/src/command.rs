//! Running iproute2 and other tools, with failures that say what ran.

use std::ffi::OsStr;
use std::process::Command;

use crate::error::{Result, TestbedError};

/// Renders a command line for error messages.
pub(crate) fn describe(program: impl AsRef<OsStr>, args: &[impl AsRef<OsStr>]) -> String {
    std::iter::once(program.as_ref())
        .chain(args.iter().map(AsRef::as_ref))
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args...` to completion and returns its stdout; a non-zero
/// exit is an error carrying stderr.
pub fn run(program: impl AsRef<OsStr>, args: &[impl AsRef<OsStr>]) -> Result<String> {
    let command = describe(&program, args);
    let output = Command::new(program.as_ref())
        .args(args)
        .output()
        .map_err(|source| TestbedError::CommandSpawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(TestbedError::CommandFailed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
