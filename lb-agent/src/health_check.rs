//! Health-check node ports, served as kube-proxy serves them: for every
//! Service with a `healthCheckNodePort` (type LoadBalancer,
//! `externalTrafficPolicy: Local`), an HTTP listener on `0.0.0.0:<port>`
//! of the agent's network namespace. Any method and any path is answered
//! with
//!
//! ```json
//! {"service":{"namespace":"..","name":".."},"localEndpoints":N,"serviceProxyHealthy":true}
//! ```
//!
//! `200` when N (the Service's ready endpoints on this node) is above 0,
//! `503` when it is 0, so a cloud load balancer sends traffic only to
//! nodes that have somewhere to send it.
//!
//! [`HealthCheckServer::update`] opens listeners for new ports, closes those
//! of ports no longer listed (with their connections) and changes the
//! counts in place. A port that cannot be bound (taken by another process)
//! is logged and retried with backoff, without stopping anything else.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info};

use crate::model::HealthCheck;

/// First retry of a port that could not be bound; doubled up to
/// [`MAX_BIND_RETRY`].
pub const FIRST_BIND_RETRY: Duration = Duration::from_secs(1);
pub const MAX_BIND_RETRY: Duration = Duration::from_secs(30);

const JSON: &str = "application/json";
const X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");

/// The status and body kube-proxy answers a health check with.
pub fn response(check: &HealthCheck) -> (StatusCode, String) {
    let status = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        service: ServiceName {
            namespace: &check.namespace,
            name: &check.name,
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: true,
    };
    let body = serde_json::to_string(&body).expect("plain strings and numbers serialize");
    (status, body)
}

/// The body, its fields in kube-proxy's order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// One port's listener task and the state it answers with.
#[derive(Debug)]
struct Port {
    health: watch::Sender<HealthCheck>,
    task: JoinHandle<()>,
}

/// The health-check listeners, one per port. Dropping it closes them all.
#[derive(Debug)]
pub struct HealthCheckServer {
    /// Address the listeners bind (0.0.0.0, as kube-proxy's default
    /// `nodePortAddresses`; tests use 127.0.0.1).
    bind_addr: Ipv4Addr,
    ports: BTreeMap<u16, Port>,
}

impl Default for HealthCheckServer {
    fn default() -> Self {
        Self::new(Ipv4Addr::UNSPECIFIED)
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for port in self.ports.values() {
            port.task.abort();
        }
    }
}

impl HealthCheckServer {
    pub fn new(bind_addr: Ipv4Addr) -> Self {
        Self {
            bind_addr,
            ports: BTreeMap::new(),
        }
    }

    /// Serves exactly `wanted` from now on. Must run inside a Tokio
    /// runtime (it spawns the listeners).
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.ports.retain(|port, state| {
            let keep = wanted.contains_key(port);
            if !keep {
                state.task.abort();
                info!(port, "health-check node port closed");
            }
            keep
        });
        for (&port, health) in wanted {
            match self.ports.get(&port) {
                Some(state) => {
                    state.health.send_if_modified(|current| {
                        let changed = current != health;
                        if changed {
                            *current = health.clone();
                        }
                        changed
                    });
                }
                None => {
                    let (sender, receiver) = watch::channel(health.clone());
                    let addr = SocketAddr::from((self.bind_addr, port));
                    let task = tokio::spawn(serve_port(addr, receiver));
                    self.ports.insert(
                        port,
                        Port {
                            health: sender,
                            task,
                        },
                    );
                }
            }
        }
    }

    /// The ports served (bound or still trying to bind).
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.keys().copied()
    }
}

/// Binds `addr` (retrying with backoff while it cannot), then answers every
/// connection until aborted; the connections end with it.
async fn serve_port(addr: SocketAddr, health: watch::Receiver<HealthCheck>) {
    let mut delay = FIRST_BIND_RETRY;
    let mut failures = 0u32;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(bind_error) => {
                let service = {
                    let health = health.borrow();
                    format!("{}/{}", health.namespace, health.name)
                };
                failures += 1;
                // Every failure is an error line, but after the first few
                // only once per maximum backoff, to keep the log readable.
                if failures <= 3 || delay == MAX_BIND_RETRY {
                    error!(
                        port = addr.port(),
                        service = service.as_str(),
                        "cannot listen on health-check node port {addr} of {service}: {bind_error}; retrying in {delay:?}"
                    );
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BIND_RETRY);
            }
        }
    };
    info!(port = addr.port(), "serving health-check node port {addr}");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let health = health.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |_request| {
                            let response = respond(&health.borrow());
                            async move { Ok::<_, Infallible>(response) }
                        });
                        if let Err(error) = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            debug!(%peer, "health-check connection: {error}");
                        }
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: try again soon.
                    debug!("accepting a health-check connection on {addr}: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn respond(health: &HealthCheck) -> Response<Full<Bytes>> {
    let (status, body) = response(health);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn health(name: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "shop".into(),
            name: name.into(),
            local_endpoints,
        }
    }

    /// A free port on 127.0.0.1 (bound and released at once).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// `method path` over HTTP/1.1 to 127.0.0.1:port, retried until the
    /// listener is up (it binds in its own task); the whole response.
    async fn request(port: u16, method: &str, path: &str) -> String {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match std::net::TcpStream::connect(("127.0.0.1", port)) {
                    Ok(mut stream) => {
                        stream.write_all(request.as_bytes()).unwrap();
                        let mut response = String::new();
                        stream.read_to_string(&mut response).unwrap();
                        return response;
                    }
                    Err(error) if std::time::Instant::now() < deadline => {
                        let _ = error;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(error) => panic!("connecting to 127.0.0.1:{port}: {error}"),
                }
            }
        })
        .await
        .unwrap()
    }

    fn body(response: &str) -> serde_json::Value {
        let (_, body) = response.split_once("\r\n\r\n").expect("a body");
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn response_is_kube_proxys() {
        let (status, body) = response(&health("web", 2));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        let (status, body) = response(&health("web", 0));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["localEndpoints"], 0);
        assert_eq!(body["service"]["name"], "web");
    }

    #[tokio::test]
    async fn listeners_follow_the_services() {
        let mut server = HealthCheckServer::new(Ipv4Addr::LOCALHOST);
        let (web_port, api_port) = (free_port(), free_port());
        let mut wanted = BTreeMap::from([(web_port, health("web", 3))]);
        server.update(&wanted);

        let response = request(web_port, "GET", "/").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let lower = response.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: application/json"),
            "{response}"
        );
        assert!(
            lower.contains("x-content-type-options: nosniff"),
            "{response}"
        );
        assert_eq!(
            body(&response),
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 3,
                "serviceProxyHealthy": true,
            })
        );
        // Any path, any method.
        let response = request(web_port, "POST", "/anything/else").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        // The count changes in place; a second Service gets its own port.
        wanted.insert(web_port, health("web", 0));
        wanted.insert(api_port, health("api", 1));
        server.update(&wanted);
        let response = request(web_port, "GET", "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert_eq!(body(&response)["localEndpoints"], 0);
        let response = request(api_port, "GET", "/").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert_eq!(body(&response)["service"]["name"], "api");
        assert_eq!(server.ports().collect::<Vec<_>>().len(), 2);

        // A port no longer listed is closed (and can be bound again).
        wanted.remove(&web_port);
        server.update(&wanted);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpListener::bind(("127.0.0.1", web_port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {web_port} still bound"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(server);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpListener::bind(("127.0.0.1", api_port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {api_port} still bound"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_until_free() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut server = HealthCheckServer::new(Ipv4Addr::LOCALHOST);
        server.update(&BTreeMap::from([(port, health("web", 1))]));
        // The listener fails to bind, the server keeps the port...
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.ports().collect::<Vec<_>>(), [port]);
        // ...and serves it once the other owner lets go.
        drop(taken);
        let response = request(port, "GET", "/").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}
