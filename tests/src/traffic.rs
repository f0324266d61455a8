//! Servers that run in backend pods and clients that run in client pods.
//!
//! The protocol is one line each way. A client sends `<request>\n`; the
//! server answers `<pod name> <server port> <client address as the server
//! saw it> <request>\n`. So every answer says which backend and which of its
//! ports took the connection, whether the client's address survived the
//! trip (no source NAT), and that the bytes arrived intact. A TCP connection can carry any number of such
//! exchanges, which lets a test keep one open across a change.
//!
//! Every blocking call has a timeout: servers poll for a stop flag at least
//! every [`SERVER_TICK`], clients give up after [`CLIENT_TIMEOUT`].

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::{Result, TestbedError};
use crate::netns::NetNs;
use crate::topology::{ExternalClient, Node, Pod};

/// How long a client waits to connect, and for each answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a server checks whether it was asked to stop.
pub const SERVER_TICK: Duration = Duration::from_millis(50);

/// One answer of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Name of the pod that answered.
    pub server: String,
    /// The port the answering server listens on (the target port).
    pub server_port: u16,
    /// The client's address and port as the server saw them.
    pub client_seen: SocketAddrV4,
    /// The request, echoed.
    pub echo: String,
}

impl Reply {
    fn parse(line: &str) -> Result<Self> {
        let bad = |reason| TestbedError::BadReply {
            reply: line.to_owned(),
            reason,
        };
        let line = line
            .strip_suffix('\n')
            .ok_or_else(|| bad("no newline (connection closed early?)"))?;
        let (server, rest) = line.split_once(' ').ok_or_else(|| bad("no server port"))?;
        let (server_port, rest) = rest
            .split_once(' ')
            .ok_or_else(|| bad("no client address"))?;
        let (client, echo) = rest.split_once(' ').ok_or_else(|| bad("no echo"))?;
        let server_port = server_port
            .parse()
            .map_err(|_| bad("server port does not parse"))?;
        let client_seen = client
            .parse()
            .map_err(|_| bad("client address does not parse"))?;
        Ok(Self {
            server: server.to_owned(),
            server_port,
            client_seen,
            echo: echo.to_owned(),
        })
    }
}

fn format_reply(server: &str, port: u16, client: SocketAddr, request: &str) -> String {
    format!("{server} {port} {client} {request}\n")
}

/// Only IPv4 exists in the testbed; anything else is a bug.
fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(addr) => addr,
        SocketAddr::V6(addr) => panic!("unexpected IPv6 address {addr} in an IPv4-only testbed"),
    }
}

fn bad_reply_io(error: TestbedError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, count 1.
    match unsafe { libc::poll(&mut pollfd, 1, millis) } {
        -1 => {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(error)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// A TCP server in a pod, listening on `0.0.0.0:<port>`: one thread accepts,
/// one thread per connection answers every request line. Stops on drop.
#[derive(Debug)]
pub struct TcpServer {
    port: u16,
    pod: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        Self::start_in(pod.ns(), pod.name(), port)
    }

    /// A server in any namespace (a node, an external client), answering
    /// as `name`.
    pub fn start_in(ns: &NetNs, name: &str, port: u16) -> Result<Self> {
        let listener = ns
            .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .map_err(|source| {
                TestbedError::io(format!("bind TCP port {port} in {}", ns.name()), source)
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| TestbedError::io("set listener non-blocking", source))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let name = name.to_owned();
        let acceptor = thread::Builder::new()
            .name(format!("tcp-{name}"))
            .spawn({
                let stop = Arc::clone(&stop);
                let accepted = Arc::clone(&accepted);
                let name = name.clone();
                move || accept_loop(&listener, &name, port, &stop, &accepted)
            })
            .map_err(|source| TestbedError::io("spawn TCP server thread", source))?;
        Ok(Self {
            port,
            pod: name,
            stop,
            accepted,
            acceptor: Some(acceptor),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take()
            && acceptor.join().is_err()
        {
            eprintln!(
                "testbed: TCP server of {} on port {} panicked",
                self.pod, self.port
            );
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    name: &str,
    port: u16,
    stop: &Arc<AtomicBool>,
    accepted: &AtomicUsize,
) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        connections.retain(|connection| !connection.is_finished());
        match wait_readable(listener, SERVER_TICK) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(error) => {
                eprintln!("testbed: TCP server {name}: poll: {error}");
                break;
            }
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let name = name.to_owned();
                let stop = Arc::clone(stop);
                let spawned = thread::Builder::new()
                    .name(format!("conn-{name}"))
                    .spawn(move || serve_connection(stream, peer, &name, port, &stop));
                match spawned {
                    Ok(handle) => connections.push(handle),
                    Err(error) => {
                        eprintln!("testbed: TCP server: spawn connection thread: {error}")
                    }
                }
            }
            // A signal (the process stopped and continued) interrupts too.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(error) => eprintln!("testbed: TCP server {name}: accept: {error}"),
        }
    }
    for connection in connections {
        // A connection thread only ends by returning; a panic there is a bug
        // worth seeing, but not a reason to keep the others running.
        if connection.join().is_err() {
            eprintln!("testbed: TCP server {name}: a connection thread panicked");
        }
    }
}

/// Answers request lines on one connection until the client closes it, an
/// error occurs, or the server stops.
fn serve_connection(stream: TcpStream, peer: SocketAddr, name: &str, port: u16, stop: &AtomicBool) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(SERVER_TICK)))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)));
    if let Err(error) = setup {
        eprintln!("testbed: TCP server {name}: configure connection from {peer}: {error}");
        return;
    }
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => {
            eprintln!("testbed: TCP server {name}: clone connection from {peer}: {error}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            // The client closed its side.
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                let request = line.trim_end_matches('\n');
                if writer
                    .write_all(format_reply(name, port, peer, request).as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            // A partial line before EOF: keep it, the next read returns 0.
            Ok(_) => {}
            // Timeouts (and a signal's interruption) only give the stop flag
            // a look; bytes read so far stay in `line`.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // Resets are expected (tests cut connections on purpose).
            Err(_) => return,
        }
    }
}

/// A UDP server in a pod on `0.0.0.0:<port>`: answers every datagram to its
/// source. Stops on drop.
#[derive(Debug)]
pub struct UdpServer {
    port: u16,
    pod: String,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    worker: Option<JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        Self::start_in(pod.ns(), pod.name(), port)
    }

    /// A server in any namespace (a node, an external client), answering
    /// as `name`.
    pub fn start_in(ns: &NetNs, name: &str, port: u16) -> Result<Self> {
        let socket = ns
            .run(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .map_err(|source| {
                TestbedError::io(format!("bind UDP port {port} in {}", ns.name()), source)
            })?;
        socket
            .set_read_timeout(Some(SERVER_TICK))
            .map_err(|source| TestbedError::io("set UDP read timeout", source))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let name = name.to_owned();
        let worker = thread::Builder::new()
            .name(format!("udp-{name}"))
            .spawn({
                let stop = Arc::clone(&stop);
                let received = Arc::clone(&received);
                let name = name.clone();
                move || udp_loop(&socket, &name, port, &stop, &received)
            })
            .map_err(|source| TestbedError::io("spawn UDP server thread", source))?;
        Ok(Self {
            port,
            pod: name,
            stop,
            received,
            worker: Some(worker),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            eprintln!(
                "testbed: UDP server of {} on port {} panicked",
                self.pod, self.port
            );
        }
    }
}

fn udp_loop(socket: &UdpSocket, name: &str, port: u16, stop: &AtomicBool, received: &AtomicUsize) {
    let mut buffer = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buffer) {
            Ok((len, peer)) => {
                received.fetch_add(1, Ordering::Relaxed);
                let request = String::from_utf8_lossy(&buffer[..len]);
                let reply = format_reply(name, port, peer, request.trim_end_matches('\n'));
                if let Err(error) = socket.send_to(reply.as_bytes(), peer) {
                    eprintln!("testbed: UDP server {name}: reply to {peer}: {error}");
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // ICMP errors from earlier replies surface here; not fatal.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(error) => {
                eprintln!("testbed: UDP server {name}: receive: {error}");
                return;
            }
        }
    }
}

/// The outcome of one TCP exchange.
#[derive(Clone, Debug)]
pub struct TcpExchange {
    /// The client socket's own address.
    pub local: SocketAddrV4,
    /// `getpeername()` of the client socket: what the client thinks it is
    /// talking to.
    pub peer: SocketAddrV4,
    pub reply: Reply,
}

/// A TCP connection that can carry several exchanges. Create it inside the
/// client pod (e.g. `pod.run(|| TcpSession::connect(..))`); use it anywhere.
#[derive(Debug)]
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpSession {
    /// Connects with [`CLIENT_TIMEOUT`]; the socket is created in the
    /// calling thread's namespace.
    pub fn connect(destination: SocketAddrV4) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&destination.into(), CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub fn local(&self) -> io::Result<SocketAddrV4> {
        self.writer.local_addr().map(v4)
    }

    pub fn peer(&self) -> io::Result<SocketAddrV4> {
        self.writer.peer_addr().map(v4)
    }

    /// Sends one request line and reads the answer.
    pub fn exchange(&mut self, request: &str) -> io::Result<TcpExchange> {
        assert!(!request.contains('\n'), "a request is one line");
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let reply = Reply::parse(&line).map_err(bad_reply_io)?;
        Ok(TcpExchange {
            local: self.local()?,
            peer: self.peer()?,
            reply,
        })
    }
}

impl Drop for TcpSession {
    fn drop(&mut self) {
        // Close politely (FIN), so the server thread ends at once.
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}

/// Opens a connection, makes one exchange, closes it.
pub fn tcp_request(destination: SocketAddrV4, request: &str) -> io::Result<TcpExchange> {
    TcpSession::connect(destination)?.exchange(request)
}

/// The outcome of one UDP exchange.
#[derive(Clone, Debug)]
pub struct UdpExchange {
    /// The address the client socket is bound to: the wildcard address and
    /// the port for an unconnected socket, the source address for a
    /// connected one.
    pub local: SocketAddrV4,
    /// Source address of the answer (`recv_from`), or the connected peer.
    pub from: SocketAddrV4,
    pub reply: Reply,
}

/// Sends one datagram from an unconnected socket and reads the answer with
/// `recv_from`, so the caller sees where the answer came from. An
/// unconnected socket accepts an answer from any source.
pub fn udp_request(destination: SocketAddrV4, request: &str) -> io::Result<UdpExchange> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(request.as_bytes(), destination)?;
    let mut buffer = [0u8; 2048];
    let (len, from) = socket.recv_from(&mut buffer)?;
    let reply = Reply::parse(&String::from_utf8_lossy(&buffer[..len])).map_err(bad_reply_io)?;
    Ok(UdpExchange {
        local: v4(socket.local_addr()?),
        from: v4(from),
        reply,
    })
}

/// Like [`udp_request`] on a connected socket: the kernel only accepts
/// answers from `destination`, and reports an ICMP port unreachable as
/// `ConnectionRefused` on the receive.
pub fn udp_connected_request(destination: SocketAddrV4, request: &str) -> io::Result<UdpExchange> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.connect(destination)?;
    socket.send(request.as_bytes())?;
    let mut buffer = [0u8; 2048];
    let len = socket.recv(&mut buffer)?;
    let reply = Reply::parse(&String::from_utf8_lossy(&buffer[..len])).map_err(bad_reply_io)?;
    Ok(UdpExchange {
        local: v4(socket.local_addr()?),
        from: v4(socket.peer_addr()?),
        reply,
    })
}

/// How many answers each server gave.
pub type Tally = BTreeMap<String, usize>;

/// Opens `count` connections one after the other, one exchange each, and
/// counts which server answered. Stops at the first failure.
pub fn tcp_spread(destination: SocketAddrV4, count: usize) -> io::Result<Tally> {
    let mut tally = Tally::new();
    for n in 0..count {
        let exchange = tcp_request(destination, &format!("spread {n}"))?;
        *tally.entry(exchange.reply.server).or_default() += 1;
    }
    Ok(tally)
}

/// [`tcp_spread`] for UDP: `count` datagrams, each from a new socket (a new
/// source port, so a new flow).
pub fn udp_spread(destination: SocketAddrV4, count: usize) -> io::Result<Tally> {
    let mut tally = Tally::new();
    for n in 0..count {
        let exchange = udp_request(destination, &format!("spread {n}"))?;
        *tally.entry(exchange.reply.server).or_default() += 1;
    }
    Ok(tally)
}

/// The client operations of anything that has a network namespace (a pod,
/// a node, an external client): each runs inside that namespace,
/// flattening "could not enter the namespace" into the I/O error so
/// callers handle one error type and can still match on
/// `ConnectionRefused` and friends.
macro_rules! client_operations {
    ($($host:ty),+) => {$(
        impl $host {
            fn run_io<T: Send>(&self, task: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
                self.ns().run(task).map_err(io::Error::other)?
            }

            pub fn tcp_request(&self, destination: SocketAddrV4, request: &str) -> io::Result<TcpExchange> {
                self.run_io(|| tcp_request(destination, request))
            }

            pub fn tcp_connect(&self, destination: SocketAddrV4) -> io::Result<TcpSession> {
                self.run_io(|| TcpSession::connect(destination))
            }

            pub fn tcp_spread(&self, destination: SocketAddrV4, count: usize) -> io::Result<Tally> {
                self.run_io(|| tcp_spread(destination, count))
            }

            pub fn udp_request(&self, destination: SocketAddrV4, request: &str) -> io::Result<UdpExchange> {
                self.run_io(|| udp_request(destination, request))
            }

            pub fn udp_connected_request(
                &self,
                destination: SocketAddrV4,
                request: &str,
            ) -> io::Result<UdpExchange> {
                self.run_io(|| udp_connected_request(destination, request))
            }

            pub fn udp_spread(&self, destination: SocketAddrV4, count: usize) -> io::Result<Tally> {
                self.run_io(|| udp_spread(destination, count))
            }

            pub fn http_get(&self, destination: SocketAddrV4, path: &str) -> io::Result<HttpResponse> {
                self.run_io(|| http_get(destination, path))
            }
        }
    )+};
}

client_operations!(Pod, Node, ExternalClient);

/// An HTTP/1.1 answer: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// `GET <path>` with `Connection: close`, reading the answer to EOF (the
/// agent's health-check listener is the server this is for), bounded by
/// [`CLIENT_TIMEOUT`] per step.
pub fn http_get(destination: SocketAddrV4, path: &str) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&destination.into(), CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {destination}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&String::from_utf8_lossy(&raw)).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// Status and body of a complete HTTP/1.1 response (body delimited by the
/// end of the connection, or chunked).
fn parse_http_response(text: &str) -> Option<HttpResponse> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        let mut decoded = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n")?;
            let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            decoded.push_str(after.get(..size)?);
            rest = after.get(size..)?.strip_prefix("\r\n")?;
        }
        decoded
    } else {
        body.to_owned()
    };
    Some(HttpResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let client: SocketAddr = "198.18.0.2:40000".parse().expect("address");
        let line = format_reply("backend-1", 8080, client, "hello there");
        let reply = Reply::parse(&line).expect("parse");
        assert_eq!(
            reply,
            Reply {
                server: "backend-1".into(),
                server_port: 8080,
                client_seen: "198.18.0.2:40000".parse().expect("address"),
                echo: "hello there".into(),
            }
        );
    }

    #[test]
    fn http_responses_parse() {
        let plain = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse_http_response(plain),
            Some(HttpResponse {
                status: 503,
                body: "{}".into()
            })
        );
        let chunked =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked),
            Some(HttpResponse {
                status: 200,
                body: "abcde".into()
            })
        );
        assert_eq!(parse_http_response("garbage"), None);
    }

    #[test]
    fn malformed_replies_are_errors() {
        for line in [
            "",
            "backend-1 8080 198.18.0.2:1 cut short",
            "backend-1\n",
            "backend-1 http 198.18.0.2:1 x\n",
            "backend-1 8080 nowhere x\n",
        ] {
            assert!(Reply::parse(line).is_err(), "{line:?} parsed");
        }
    }
}
