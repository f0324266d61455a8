//! The command line, without privileges: argument checks and help texts.

use std::process::{Command, Output};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running lb-agent")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn run_outside_a_cluster_without_a_kubeconfig_says_why() {
    let output = Command::new(AGENT)
        .args(["run", "--attach", "lbt-none"])
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("running lb-agent");
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("in-cluster configuration"), "{message}");
    assert!(message.contains("--kubeconfig"), "{message}");
}

#[test]
fn run_with_a_missing_kubeconfig_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kubeconfig");
    let output = agent(&[
        "run",
        "--attach",
        "lbt-none",
        "--kubeconfig",
        missing.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("no-such-kubeconfig"), "{message}");
}

#[test]
fn manifests_and_kubeconfig_exclude_each_other() {
    let output = agent(&[
        "run",
        "--attach",
        "lbt-none",
        "--manifests",
        "/tmp",
        "--kubeconfig",
        "/tmp/k",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
fn run_without_attach_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = agent(&["run", "--manifests", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--attach"));
}

#[test]
fn run_help_documents_every_option() {
    let help = stdout(&agent(&["run", "--help"]));
    for option in [
        "--manifests",
        "--kubeconfig",
        "--node-name",
        "NODE_NAME",
        "--service-proxy-name",
        "--health-addr",
        "--attach",
        "--pin-dir",
        "--keep-pins",
        "--max-services",
        "--max-backends",
        "--max-slots",
        "--max-flows",
        "--tcp-timeout",
        "--tcp-closing-timeout",
        "--udp-timeout",
        "--datapath-log",
        "--log-format",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    assert!(help.contains("/sys/fs/bpf/lb"), "{help}");
}

#[test]
fn inspect_help_lists_what_it_prints() {
    let help = stdout(&agent(&["inspect", "--help"]));
    for word in ["services", "conntrack", "counters", "--json", "--pin-dir"] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
}

#[test]
fn inspect_without_an_agent_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let pin_dir = dir.path().join("no-agent");
    let output = agent(&[
        "inspect",
        "services",
        "--pin-dir",
        pin_dir.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("no-agent"), "{message}");
    assert!(message.contains("is an agent running"), "{message}");
}
