//! The testbed: simulated Kubernetes nodes and pods built from network
//! namespaces and veth pairs, servers and clients that run in pods, the
//! agent under test, and the manifests that drive it.
//!
//! Everything here is a guard: namespaces, processes, threads, pin
//! directories and scratch directories are removed on drop, also while a
//! failing test unwinds, and every name is unique (see [`names`]) so tests
//! run in parallel. Nothing touches the root network namespace.
//!
//! ```no_run
//! # fn main() -> lb_tests::error::Result<()> {
//! use lb_tests::topology::Testbed;
//! let mut testbed = Testbed::new("example")?;
//! let node = testbed.add_node("node")?;
//! node.add_pod("client")?;
//! node.add_pod("server")?;
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod bench;
pub mod command;
pub mod dirs;
pub mod error;
pub mod ethtool;
pub mod fake_apiserver;
pub mod fixture;
pub mod manifests;
pub mod names;
pub mod netns;
pub mod packet;
pub mod topology;
pub mod traffic;
pub mod wait;
pub mod xdp_pass;
