//! The load generator: request/response on one TCP connection, new
//! connections (connect, request, response, close) back to back, and UDP
//! request/response; all against the testbed's servers
//! ([`crate::traffic`]), run on a thread inside the client pod.
//!
//! Bounded in count and in time, single-threaded (one outstanding request:
//! latency, not throughput), and every answer is checked: it must come
//! from one of the expected backend pods, echo the request, and show the
//! client's own address (no source NAT). A wrong answer fails the
//! measurement instead of making a figure.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::{BenchError, Result};
use crate::traffic::CLIENT_TIMEOUT;

/// What every answer must show.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Names of the pods allowed to answer.
    pub servers: Vec<String>,
    /// The client pod's address, as the server must see it.
    pub client: Ipv4Addr,
}

/// Checks one answer line (`<pod> <port> <client> <request>`, see
/// [`crate::traffic`]) against `expect`.
pub fn check_reply(what: &str, line: &str, request: &str, expect: &Expect) -> Result<()> {
    let bad = |detail: String| BenchError::check(what, detail);
    let line = line
        .strip_suffix('\n')
        .ok_or_else(|| bad(format!("answer {line:?} has no newline")))?;
    let mut fields = line.splitn(4, ' ');
    let (Some(server), Some(_port), Some(client), Some(echo)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(bad(format!("answer {line:?} has too few fields")));
    };
    if !expect.servers.iter().any(|name| name == server) {
        return Err(bad(format!(
            "answered by {server}, expected one of {:?}",
            expect.servers
        )));
    }
    let seen: SocketAddrV4 = client
        .parse()
        .map_err(|_| bad(format!("client address {client:?} does not parse")))?;
    if *seen.ip() != expect.client {
        return Err(bad(format!(
            "the server saw the client as {seen}, expected {} (source NAT?)",
            expect.client
        )));
    }
    if echo != request {
        return Err(bad(format!("echo {echo:?} for request {request:?}")));
    }
    Ok(())
}

fn connect(destination: SocketAddrV4) -> Result<TcpStream> {
    let io = |what: &str| {
        let what = format!("{what} ({destination})");
        move |error| BenchError::io(what, error)
    };
    let stream = TcpStream::connect_timeout(&destination.into(), CLIENT_TIMEOUT)
        .map_err(io("TCP connect"))?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io("set read timeout"))?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io("set write timeout"))?;
    stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
    Ok(stream)
}

/// One request line and its answer on `stream`.
fn exchange(
    writer: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    request: &str,
    line: &mut String,
    expect: &Expect,
) -> Result<()> {
    writer
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|error| BenchError::io("TCP send", error))?;
    line.clear();
    reader
        .read_line(line)
        .map_err(|error| BenchError::io("TCP receive", error))?;
    check_reply("TCP answer", line, request, expect)
}

/// Latency of `requests` request/response exchanges on one connection.
pub fn tcp_latency(
    destination: SocketAddrV4,
    requests: usize,
    expect: &Expect,
) -> Result<Vec<Duration>> {
    let mut writer = connect(destination)?;
    let mut reader = BufReader::new(
        writer
            .try_clone()
            .map_err(|error| BenchError::io("clone TCP stream", error))?,
    );
    let mut line = String::new();
    let mut latencies = Vec::with_capacity(requests);
    for n in 0..requests {
        let request = format!("req-{n}");
        let start = Instant::now();
        exchange(&mut writer, &mut reader, &request, &mut line, expect)?;
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

/// New connections: connect, one exchange, close, back to back, until
/// `count` connections or `bound` has passed (at least one). Returns how
/// many were made and how long they took.
pub fn connections(
    destination: SocketAddrV4,
    count: usize,
    bound: Duration,
    expect: &Expect,
) -> Result<(usize, Duration)> {
    let start = Instant::now();
    let mut done = 0usize;
    let mut line = String::new();
    while done < count && (done == 0 || start.elapsed() < bound) {
        let mut writer = connect(destination)?;
        let mut reader = BufReader::new(
            writer
                .try_clone()
                .map_err(|error| BenchError::io("clone TCP stream", error))?,
        );
        exchange(&mut writer, &mut reader, "conn", &mut line, expect)?;
        // Dropping both handles closes the connection (FIN).
        drop(reader);
        drop(writer);
        done += 1;
    }
    Ok((done, start.elapsed()))
}

/// Latency of `requests` UDP request/response exchanges from one
/// connected socket.
pub fn udp_latency(
    destination: SocketAddrV4,
    requests: usize,
    expect: &Expect,
) -> Result<Vec<Duration>> {
    let io = |what: &'static str| move |error| BenchError::io(what, error);
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(io("UDP bind"))?;
    socket
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io("UDP set read timeout"))?;
    socket.connect(destination).map_err(io("UDP connect"))?;
    let mut buffer = [0u8; 2048];
    let mut latencies = Vec::with_capacity(requests);
    for n in 0..requests {
        let request = format!("req-{n}");
        let start = Instant::now();
        socket.send(request.as_bytes()).map_err(io("UDP send"))?;
        let len = socket.recv(&mut buffer).map_err(io("UDP receive"))?;
        latencies.push(start.elapsed());
        let line = String::from_utf8_lossy(&buffer[..len]);
        check_reply("UDP answer", &line, &request, expect)?;
    }
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expect {
        Expect {
            servers: vec!["backend-1".into(), "backend-2".into()],
            client: Ipv4Addr::new(198, 18, 0, 2),
        }
    }

    #[test]
    fn a_good_answer_passes() {
        check_reply(
            "t",
            "backend-2 8080 198.18.0.2:41000 req-1\n",
            "req-1",
            &expect(),
        )
        .expect("good answer");
    }

    #[test]
    fn wrong_answers_fail() {
        for (line, why) in [
            ("backend-9 8080 198.18.0.2:41000 req-1\n", "other pod"),
            ("backend-1 8080 198.18.0.1:41000 req-1\n", "source NAT"),
            ("backend-1 8080 198.18.0.2:41000 req-2\n", "wrong echo"),
            ("backend-1 8080 198.18.0.2:41000 req-1", "no newline"),
            ("backend-1 8080\n", "too short"),
        ] {
            assert!(
                check_reply("t", line, "req-1", &expect()).is_err(),
                "{why}: {line:?} passed"
            );
        }
    }
}
