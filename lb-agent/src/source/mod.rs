//! Where Services and EndpointSlices come from. Each source yields plain
//! sets of `k8s-openapi` objects; [`crate::translate`] turns them into the
//! desired state the same way for all of them. [`node`] finds this node's
//! addresses (the NodePort frontends and the SNAT address).

pub mod kube;
pub mod manifests;
pub mod node;
